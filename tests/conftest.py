"""Shared fixtures. Everything is local: tests never download weights or datasets."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default: at the start and the end of every run, a
# wait of up to 2 s that runs of seconds feel. The suite's Ray (and every Ray a test's subprocess starts, which
# inherits this) polls every 0.25 s instead; behaviour is the same, only the waits are shorter.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# S3 is the suite's own moto server on 127.0.0.1 (fixture s3_bucket), for this process and every Ray process it
# starts: the endpoint the way pyarrow (Ray's storage) and boto read it, and moto's dummy credentials
S3_PORT = _free_port()
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "moto",
                   "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"})
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "moto")

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
def s3_bucket() -> str:
    """A bucket on a real S3 server on 127.0.0.1 (moto in server mode, started here); returns ``s3://BUCKET``."""
    import sys

    import boto3

    from tests.procs import start_server

    proc = start_server([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(S3_PORT)],
                        f"http://127.0.0.1:{S3_PORT}/", "moto_server", timeout=60)
    boto3.client("s3").create_bucket(Bucket="flat-ray-test")
    yield "s3://flat-ray-test"
    proc.kill()
    proc.wait(30)


@pytest.fixture(scope="session")
def ray_local() -> str:
    """The suite's one Ray (2 CPUs, whatever the machine), started in this process; returns its address. Tests call
    run_training here, and the `flat-ray` processes they start join it with ``--address``: no test's run starts a
    second Ray (tests/launch/test_connect.py starts one on purpose, beside this one, for half a minute). Every Ray process holds the secrets of tests/runs.py in its environment, as a cluster's nodes would hold
    credentials; this process does not."""
    import ray

    from flat_ray.launch.cluster import start_local_ray
    from tests.runs import secret_env

    if not ray.is_initialized():  # (moto's dummy S3 secret stays in this process)
        start_local_ray(2, env=secret_env(), logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


# ------------------------------------------------------------------------------ shared end-to-end runs (runs.py)
@pytest.fixture(scope="session")
def base(tmp_path_factory, tiny_model_dir):
    """Overrides for a small, fast run on the tiny model (10 forget questions, 2 epochs)."""
    from tests.runs import tiny_overrides

    return tiny_overrides(tiny_model_dir, tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="session")
def zero3(ray_local, base):
    """The uninterrupted 2-worker ZeRO-3 run: (config, TrainResult)."""
    from flat_ray.config import load_config
    from flat_ray.launch.driver import run_training
    from tests.runs import ZERO3

    cfg = load_config(None, [*base, *ZERO3, "tracking.run_name=zero3", "eval.save_logs=true"])
    return cfg, run_training(cfg)


@pytest.fixture(scope="session")
def interrupted(ray_local, zero3, tmp_path_factory, s3_bucket):
    """``zero3``'s config run again in a subprocess holding secrets, its Ray state in the suite's S3 bucket: a worker
    lost, the driver killed, resumed."""
    from tests.runs import run_interrupted

    cfg, res = zero3
    work = tmp_path_factory.mktemp("interrupted") / "work"
    work.mkdir()
    return run_interrupted(res.model_dir.parent / "config.yaml", work, "interrupted", ray_local, f"{s3_bucket}/runs",
                           res.model_dir.parent / "eval_logs" / "epoch0")
