"""WMDP: its corpora from a data folder (a small fixture written here; the real ones are not redistributable), the
training batch RMU and FLAT build from them on the tiny model, and the lm-eval wiring: WMDP's own task names are in
lm-eval's index, and the suite's accuracies come from lm-eval on a local task (WMDP's data is not offline)."""

from __future__ import annotations

import json
import math

import pytest

from flat_ray.config import load_config
from flat_ray.data import BENCHMARKS, load_split
from flat_ray.errors import FlatRayError
from flat_ray.preflight import check_inputs
from tests.eval.test_runner import local_task  # noqa: F401 - the module-scoped fixture

TOPICS = {"bio": "a fictional pathogen that spreads through river water in spring",
          "cyber": "a made-up exploit chain against an imaginary router firmware",
          "bio_retain": "the life cycle of ordinary garden plants and their pollinators",
          "cyber_retain": "how public-key signatures let a browser trust a website"}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """WMDP's file names in a wmdp-corpora/ folder, eight short made-up documents each."""
    from flat_ray.data.wmdp import CORPORA

    root = tmp_path_factory.mktemp("wmdp")
    folder = root / "wmdp-corpora"
    folder.mkdir()
    for split, name in CORPORA.items():
        docs = [{"text": f"Document {i} is about {TOPICS[split]}. " * 6} for i in range(8)]
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    return root


def test_the_corpora_load_from_the_folder_or_its_wmdp_corpora_subfolder(corpora, tmp_path):
    bench = BENCHMARKS["wmdp"]
    assert bench.text and bench.retain_of == {"bio": "bio_retain", "cyber": "cyber_retain"}
    rows = load_split("wmdp", "cyber", str(corpora))
    assert len(rows) == 8 and "exploit chain" in rows[0]["text"]
    assert "garden plants" in load_split("wmdp", "bio_retain", str(corpora / "wmdp-corpora"))[0]["text"]
    with pytest.raises(FlatRayError, match=r"^benchmark wmdp needs data.data_dir: a folder with WMDP's corpora "
                                           r"\(bio-forget-corpus.jsonl, cyber-forget-corpus.jsonl, bio-retain-corpus.jsonl"):
        load_split("wmdp", "cyber", None)
    with pytest.raises(FlatRayError, match="has no cyber-forget-corpus.jsonl .*expected there or in its "
                                           "wmdp-corpora/ folder: bio-forget-corpus.jsonl"):
        check_inputs(load_config(None, ["data.benchmark=wmdp", f"data.data_dir={tmp_path}"]))


@pytest.mark.parametrize("method", ["rmu", "flat"])
def test_rmu_and_flat_build_their_batch_from_the_corpora(method, corpora, tiny_model_dir, tmp_path):
    from flat_ray.dryrun import dry_run

    cfg = load_config(None, ["data.benchmark=wmdp", f"data.data_dir={corpora}", f"method.name={method}",
                             "method.rmu_layer=1", f"model.name_or_path={tiny_model_dir}", "data.chunk_tokens=32",
                             "data.max_length=40", "optim.micro_batch_size=2", f"paths.workdir={tmp_path}"])
    assert cfg.retain_split() == "cyber_retain"
    summary = dry_run(cfg)
    assert set(summary["first_batch"]) == set(METHODS_SPLITS[method]) and math.isfinite(summary["first_batch_loss"])


METHODS_SPLITS = {"rmu": ("forget", "retain"), "flat": ("forget", "template")}


def test_the_suite_runs_lm_eval_on_the_forget_and_utility_tasks(tiny, local_task):  # noqa: F811
    from flat_ray.eval.harness import task_manager
    from flat_ray.eval.suites import suite_for
    from flat_ray.models import PROFILES

    default = load_config(None, ["data.benchmark=wmdp", "data.split=bio"])
    assert suite_for(default).rows(default, 10) == {"forget": ["wmdp_bio"], "utility": ["mmlu"]}
    task_manager(["wmdp_bio", "wmdp_cyber", "mmlu"])  # WMDP's and MMLU's tasks are lm-eval's own
    cfg = load_config(None, ["data.benchmark=wmdp", "eval.forget_tasks=flatray_toy",
                             "eval.utility_tasks=flatray_toy", f"eval.tasks_include={local_task}",
                             "eval.max_examples=4", "eval.batch_size=2"])
    model, tok = tiny
    out = suite_for(cfg).run(model, tok, PROFILES["raw"], suite_for(cfg).rows(cfg, 4), cfg)
    assert 0 <= out["forget_acc"] <= 1 and out["forget_acc"] == out["utility_acc"] == out["flatray_toy_acc"]
    assert out["wmdp_score"] == pytest.approx(2 * (1 - out["forget_acc"]) * out["utility_acc"]
                                              / (1 - out["forget_acc"] + out["utility_acc"]))
    misspelt = load_config(None, ["data.benchmark=wmdp", "eval.utility_tasks=mmluu"])
    with pytest.raises(FlatRayError, match="unknown lm-eval task.*mmluu"):
        suite_for(misspelt).rows(misspelt, 4)
