"""Shared fixtures. Everything is local: tests never download weights or datasets."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tofu_mini() -> Path:
    path = Path(os.environ.get("FLAT_RAY_SHARED_DATA", SHARED_DATA)) / "tofu_mini"
    if not (path / "forget.jsonl").is_file():
        pytest.skip(f"real TOFU excerpt not found at {path} (../shared/data/tofu_mini is absent on this checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-init Llama model and tokenizer trained on the demo text plus the built-in templates."""
    from flat_ray.data import BUILTIN_TEMPLATES
    from flat_ray.data.demo import demo_texts
    from flat_ray.models import build_tiny_model

    return build_tiny_model(demo_texts() + list(BUILTIN_TEMPLATES), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from flat_ray.models import load_model_and_tokenizer

    return load_model_and_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory) -> Path:
    """One work dir for the tests that run the embedded demo, so its original model is built once."""
    return tmp_path_factory.mktemp("demo_work")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) for the tests that call run_training in this process."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()
