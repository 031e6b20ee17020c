"""eval.reference=auto: the demo's retain model as a pipeline stage (built with the original's recipe on the forget
split's complement, cached, evaluated once with the run's evaluation settings) and its row in sweep reports.

The fine-tune function is passed in, as the driver passes its Ray Train fine-tune: here it trains the recipe's tiny
model for one epoch in this process (flat_ray.engine.replica), which is enough to tell the stage's bookkeeping
apart. A sweep's cells take the same path (tested here from the cache); building it with the real Ray Train
fine-tune is `flat-ray train eval.reference=auto` (about 1 minute more than the demo, so not part of the suite)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from mlflow import MlflowClient

from flat_ray.assets import demo_finetune_config, demo_original_path, demo_retain_path
from flat_ray.config import load_config
from flat_ray.eval.tofu import LOG_FILES, forget_quality, read_reference


def quick_finetune(calls, out_root):
    def finetune(ft):
        from flat_ray.assets import tiny_model_path
        from flat_ray.data import Collator
        from flat_ray.engine.replica import train
        from flat_ray.models import load_model_and_tokenizer
        from flat_ray.pipeline import build_dataset, profile_for

        calls.append(ft)
        short = dataclasses.replace(ft, optim=dataclasses.replace(ft.optim, epochs=1))
        path = str(tiny_model_path(short))
        model, tok = load_model_and_tokenizer(path)
        train(short, model, build_dataset(short, tok, profile_for(short, path, tok)), Collator(tok.pad_token_id), 1)
        out = out_root / f"finetuned-{len(calls)}"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return out
    return finetune


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from flat_ray.eval.run import auto_reference

    wd = tmp_path_factory.mktemp("auto_ref")
    cfg = load_config(None, [f"paths.workdir={wd}", "eval.reference=auto", "eval.max_examples=4",
                             "eval.max_new_tokens=4", f"tracking.mlflow_uri=sqlite:///{wd}/mlflow.db"],
                      presets=["demo"])
    calls: list = []
    resolved = auto_reference(cfg, quick_finetune(calls, wd))
    return cfg, resolved, calls, wd


def test_the_retain_model_is_the_originals_recipe_on_the_forget_splits_complement(built):
    cfg, resolved, calls, wd = built
    (ft,) = calls
    original = demo_finetune_config(cfg)
    assert original.data.split == "full_with_background" and ft.data.split == "retain90_with_background"
    assert dataclasses.replace(ft.data, split="full_with_background") == original.data
    assert (ft.model, ft.method, ft.optim, ft.deepspeed) == (original.model, original.method, original.optim,
                                                               original.deepspeed)
    retain_dir = demo_retain_path(cfg)
    assert retain_dir.parent == wd / "models" and retain_dir.name.startswith("demo-retain-")
    assert retain_dir != demo_original_path(cfg) and (retain_dir / "config.json").is_file()
    # the cache key follows the recipe's data: forget05's retain model is another one; the unlearning lr is not in it
    other = load_config(None, [f"paths.workdir={wd}", "data.split=forget05"], presets=["demo"])
    faster = load_config(None, [f"paths.workdir={wd}", "optim.lr=1e-5"], presets=["demo"])
    assert demo_retain_path(other) != retain_dir and demo_retain_path(faster) == retain_dir


def test_the_reference_is_the_retain_models_eval_logs_with_the_runs_settings(built):
    cfg, resolved, calls, wd = built
    logs = resolved.eval.reference
    assert logs.startswith(str(demo_retain_path(cfg))) and resolved.eval.max_examples == 4
    assert dataclasses.replace(resolved, eval=cfg.eval) == cfg  # nothing else changes
    values, source = read_reference(logs)
    assert len(values) == 4 and source.startswith("tofu-log:")  # the run's 4 forget questions
    assert forget_quality(values, values) == pytest.approx(1.0)
    summary = json.loads((wd / logs / "summary.json").read_text())
    assert summary["model_path"] == str(demo_retain_path(cfg)) and summary["questions"]["forget"] == 4
    # evaluated once, as an MLflow run of its own
    client = MlflowClient(cfg.tracking.mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    evals = [r for r in runs if r.data.tags.get("kind") == "eval"]
    assert [r.info.run_name for r in evals] == [f"eval-{demo_retain_path(cfg).name}"]


def test_a_second_run_reuses_the_model_and_its_logs(built):
    from flat_ray.eval.run import auto_reference

    cfg, resolved, calls, wd = built
    forget_log = wd / resolved.eval.reference / LOG_FILES["forget"]
    stamp = forget_log.stat().st_mtime_ns
    again = auto_reference(cfg, quick_finetune(calls, wd))
    assert again == resolved and len(calls) == 1 and forget_log.stat().st_mtime_ns == stamp
    explicit = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, reference="/some/logs"))
    assert auto_reference(explicit, None) is explicit  # any other reference passes through


def test_the_sweep_report_has_a_retain_model_row_with_forget_quality_1(built):
    from flat_ray.report import Trial, table_rows

    cfg, resolved, calls, wd = built
    def trial(lr, fq, ref):
        return Trial(name=f"t{lr}", run_id="x", status="finished", model="demo", benchmark="demo/forget10",
                     method="flat", divergence="kl", lr=lr, final={"forget_quality": fq, "model_utility": 0.1},
                     before={"forget_quality": 1e-5, "model_utility": 0.2}, reference=ref)
    rows = table_rows([trial(1e-4, 0.01, resolved.eval.reference), trial(2e-4, 0.5, resolved.eval.reference)],
                      "forget_quality", ["model_utility"])
    assert [r["method"] for r in rows] == ["(before unlearning)", "(retain model)", "flat/kl"]
    ref_row = rows[1]
    assert ref_row["forget_quality"] == pytest.approx(1.0) and ref_row["lr"] is None
    assert ref_row["model_utility"] == pytest.approx(json.loads(
        (wd / resolved.eval.reference / "summary.json").read_text())["model_utility"])
    assert rows[2]["forget_quality"] == 0.5
    # a reference that is not a folder of eval logs (an open-unlearning JSON, or gone) adds no row
    rows = table_rows([trial(1e-4, 0.01, str(wd / "gone"))], "forget_quality", ["model_utility"])
    assert [r["method"] for r in rows] == ["(before unlearning)", "flat/kl"]


def test_a_sweep_cell_with_auto_gets_the_cached_logs_before_its_trials_start(built):
    from flat_ray.launch.tune import _with_reference
    from flat_ray.sweep import load_space

    cfg, resolved, calls, wd = built
    space = load_space("demo", [f"paths.workdir={wd}", "eval.reference=auto", "eval.max_examples=4",
                                "eval.max_new_tokens=4", f"tracking.mlflow_uri={cfg.tracking.mlflow_uri}"])
    (cell,) = space.cells
    assert cell.config.eval.reference == "auto"
    ready = _with_reference(cell, space.base)  # cached: nothing is fine-tuned or evaluated again
    assert ready.config.eval.reference == resolved.eval.reference and len(calls) == 1
    assert ready.constants["eval.reference"] == resolved.eval.reference  # what every trial of the cell is built from


def test_a_sweep_cell_builds_models_that_are_exported(tmp_path):
    """A sweep's trials export nothing themselves and rank checkpoints by the objective; the demo's original and
    retain model, built from a cell's config, keep their recipe's checkpointing and are exported (a fresh clone's
    `./scripts/demo.sh` builds both from the demo space's cell)."""
    from flat_ray.assets import demo_retain_config
    from flat_ray.sweep import load_space

    (cell,) = load_space("demo", [f"paths.workdir={tmp_path}"]).cells
    assert cell.config.launch.export != "last" and cell.config.launch.checkpoint_metric == "tofu_score"
    for ft in (demo_finetune_config(cell.config), demo_retain_config(cell.config)):
        assert ft.launch.export == "last" and ft.launch.checkpoint_metric is None and ft.launch.keep_checkpoints == 0
        assert ft.launch.checkpoint_every_epochs == 8 and ft.launch.num_workers == cell.config.launch.num_workers
