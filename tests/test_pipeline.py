"""flat_ray.pipeline: from a config to the objects a run needs; the dataset carries the splits its method reads
(templates and retain examples only for methods that read them), and text benchmarks get the raw prompt profile."""

from __future__ import annotations

import dataclasses

import pytest

from flat_ray.config import load_config
from flat_ray.losses import METHODS
from flat_ray.pipeline import prepare, profile_for


@pytest.mark.parametrize("method", ["flat", "grad_diff", "idk", "npo"])
def test_each_example_carries_the_splits_its_method_reads(method, tiny_model_dir):
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "data.split=forget05", f"method.name={method}"])
    prep = prepare(cfg, load_model=False)
    assert prep.model is None and prep.model_path == str(tiny_model_dir) and len(prep.dataset) == 10
    splits = set(METHODS[method].splits(vars(cfg.method)))
    item = set(prep.dataset[0])
    assert splits <= item and all((k in item) == (k in splits) for k in ("template", "retain"))  # nothing unread
    batch = prep.collator([prep.dataset[i] for i in range(2)])
    assert all(batch[k]["input_ids"].shape[0] == 2 for k in splits)


def test_a_text_benchmark_uses_the_raw_profile_and_a_question_benchmark_the_models(tiny_model_dir):
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}"])
    tokenizer = prepare(cfg, load_model=False).tokenizer
    text = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, benchmark="muse_news", split="forget"))
    assert profile_for(text, str(tiny_model_dir), tokenizer).name == "raw"
    assert profile_for(cfg, str(tiny_model_dir), tokenizer).name == "generic"
