"""`flat-ray train` for real: local Ray (2 CPUs), 2 Ray Train workers, DeepSpeed on CPU/gloo, MLflow on SQLite,
a tiny transformers model. One ZeRO-3 run (tests/runs.py) is shared by several tests."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flat_ray import tracking
from flat_ray.config import load_config
from flat_ray.engine.checkpoint import verify
from flat_ray.errors import FlatRayError
from flat_ray.launch import driver, records
from flat_ray.launch.driver import run_training, storage_root
from tests.runs import ZERO3, registered
from tests.test_cli import run_main

pytestmark = pytest.mark.slow


def cfg_for(base, *extra):
    return load_config(None, [*base, *extra])


def loss_curve(result):
    return [v for _, v in tracking.metric_history(result.mlflow_uri, result.run_id, "train/loss")]


def test_export_writes_a_kept_epoch_of_a_finished_run(zero3, tmp_path, capsys):
    """`flat-ray export` joins the two ranks' ZeRO-3 shards of a kept checkpoint into a Hugging Face model: the last
    epoch's is the model the workers exported at the end, tensor for tensor; the best is the kept epoch with the
    lowest forget probability as the run evaluated it; each export is tagged and uploaded on the run."""
    cfg, res = zero3
    work = f"paths.workdir={cfg.paths.workdir}"
    code, out, err = run_main(["export", "zero3", work, "--epoch", "last", "--out", str(tmp_path / "last")], capsys)
    assert code == 0 and "exported epoch 4 of zero3" in out, err
    ours, theirs = load_file(tmp_path / "last" / "model.safetensors"), load_file(res.model_dir / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "last" / "tokenizer.json").is_file()

    history = dict(tracking.metric_history(res.mlflow_uri, res.run_id, "eval/forget_prob"))
    best = min((2, 4), key=lambda epoch: (history[epoch], -epoch))  # a tie goes to the later epoch
    run_dir = storage_root(cfg).local / "zero3"
    code, out, err = run_main(["export", str(run_dir), "--epoch", "best"], capsys)  # by its folder, default output
    model_dir = res.model_dir.parent / f"model-epoch{best}"
    assert code == 0 and f"exported epoch {best} of zero3 to {model_dir}" in out, err
    tags = tracking.run_data(res.mlflow_uri, res.run_id).data.tags
    assert tags["model_dir"] == str(model_dir) and tags["model_epoch"] == str(best)
    assert f"model-epoch{best}/model.safetensors" in tracking.list_artifacts(res.mlflow_uri, res.run_id,
                                                                           f"model-epoch{best}")
    if best == 2:  # the epoch 2 weights are not the final ones
        assert not all(torch.equal(v, theirs[k]) for k, v in load_file(model_dir / "model.safetensors").items())
    # launch.export=best: the driver writes the same best epoch as the run's model
    driver._export_best(cfg, storage_root(cfg) / "zero3", str(cfg.model.name_or_path), tmp_path / "run")
    best_model = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(torch.equal(v, load_file(model_dir / "model.safetensors")[k]) for k, v in best_model.items())
    capsys.readouterr()
    code, _, err = run_main(["export", "zero3", work, "--epoch", "1"], capsys)
    assert code == 2 and err.strip() == "flat-ray: error: --epoch 1: choose best, last or a kept epoch (2, 4)"
    code, _, err = run_main(["export", "zero3", work, "--adapter"], capsys)
    assert code == 2 and err.strip() == ("flat-ray: error: --adapter exports a LoRA run's adapter, and this run trained "
                                         "every weight (model.lora_rank=0); export the whole model without --adapter")
    assert not list(res.model_dir.parent.glob("*adapter*"))


def test_zero3_two_workers_changes_parameters_and_logs_everything(zero3, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg, res = zero3
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(res.model_dir / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)  # gathered, not ZeRO-3 partitions
    assert sum(not torch.equal(before[k], after[k]) for k in before) >= len(before) - 2
    # the consolidated export reloads with the Auto classes and generates
    model = AutoModelForCausalLM.from_pretrained(res.model_dir)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()
    assert (res.model_dir / "tokenizer.json").is_file()

    run = tracking.run_data(res.mlflow_uri, res.run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["optim.lr"] == "0.002" and p["method.divergence"] == "total_variation"
    assert p["resolved.world_size"] == "2" and p["resolved.deepspeed_stage"] == "3"
    assert p["resolved.deepspeed_version"] and p["version.torch"].startswith("2.") and p["resolved.git_sha"]
    assert run.data.tags["method"] == "flat" and run.data.tags["divergence"] == "total_variation"
    # what MLflow's UI shows by itself: the commit, a one-paragraph description with the result, the dataset,
    # system metrics sampled on rank 0 and the run's curves as an image
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == p["resolved.git_sha"].removesuffix("-dirty")
    assert tags["mlflow.source.name"] == "flat-ray train"
    note = tags["mlflow.note.content"]
    assert note.startswith("flat with the total_variation divergence on demo/forget05") and "lr 0.002" in note
    assert f"forget_prob {res.before['eval/forget_prob']:.4g} -> {res.after['eval/forget_prob']:.4g}" in note
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "demo/forget05" and dataset.tags[0].value == "train"
    assert json.loads(dataset.dataset.profile)["num_rows"] == 10
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert "plots/training_curves.png" in tracking.list_artifacts(res.mlflow_uri, res.run_id, "plots")
    # 10 questions / (2 per worker x 2 workers) = 3 micro-batches (last one padded) per epoch, 4 epochs
    assert len(loss_curve(res)) == 12
    for key in ("train/score_template", "train/score_forget", "train/weight_template", "train/weight_forget",
                "lr", "grad_norm", "tokens_per_s"):
        assert len(tracking.metric_history(res.mlflow_uri, res.run_id, key)) == 12, key
    lrs = [v for _, v in tracking.metric_history(res.mlflow_uri, res.run_id, "lr")]
    assert max(lrs) == pytest.approx(2e-3) and lrs[-1] < lrs[1]  # warm-up, then linear decay
    steps = [s for s, _ in tracking.metric_history(res.mlflow_uri, res.run_id, "eval/forget_prob")]
    assert steps == [0, 2, 4]  # before training and every eval.every_epochs=2 epochs
    assert [s for s, _ in tracking.metric_history(res.mlflow_uri, res.run_id, "eval_s")] == [0, 2, 4]
    # all 4 questions per split before training and at the end, eval.interim_examples=2 in between
    assert tracking.metric_history(res.mlflow_uri, res.run_id, "eval_examples") == [(0, 4), (2, 2), (4, 4)]
    # the bytes it wrote: each epoch's checkpoint (both ranks' parts, as the storage path holds them) and the export
    written = dict(tracking.metric_history(res.mlflow_uri, res.run_id, "checkpoint_mb"))
    assert sorted(written) == [3, 6, 9, 12]  # after every epoch of 3 steps
    # at each checkpoint, every metric logged before it had reached the server when Ray Train registered it
    assert tracking.metric_history(res.mlflow_uri, res.run_id, "unsent_at_checkpoint") == [(s, 0) for s in written]
    run_dir = storage_root(cfg).local / "zero3"
    # launch.checkpoint_metric=forget_prob with keep_checkpoints=2: Ray Train kept the 2 best by the score the
    # workers reported, the evaluated epochs 2 and 4 (epochs 1 and 3 were not evaluated: NaN, ranked last)
    kept = sorted((run_dir / name for name in registered(run_dir)), key=lambda c: verify(c, 2)["epoch"])

    def mib(folder: Path) -> float:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20

    assert [3 * (verify(c, 2)["epoch"] + 1) for c in kept] == [6, 12]
    assert [written[3 * (verify(c, 2)["epoch"] + 1)] for c in kept] == pytest.approx([mib(c) for c in kept], rel=1e-3)
    # they stay after the run, the others were deleted, and what stays is logged
    assert sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()) == sorted(c.name for c in kept)
    assert not (run_dir / ".staging").exists()  # where the workers staged them, removed at the end
    assert tracking.metric_history(res.mlflow_uri, res.run_id, "checkpoints_kept_mb") == [
        (0, pytest.approx(sum(mib(c) for c in kept), rel=1e-6))]
    # a finished run is never resumed (its checkpoints may be gone): one line naming its model
    with pytest.raises(FlatRayError, match=r"run 'zero3' has already finished \(MLflow run \w+\); its model is in"):
        records.prepare_run(cfg, "zero3")
    export = dict(tracking.metric_history(res.mlflow_uri, res.run_id, "export_mb"))
    assert export == {12: pytest.approx(mib(res.model_dir), rel=1e-6)}
    total = dict(tracking.metric_history(res.mlflow_uri, res.run_id, "written_mb"))
    assert total == {12: pytest.approx(sum(written.values()) + export[12])}
    assert set(res.before) == set(res.after) and "eval/model_utility" in res.before
    # the 12 per-split TOFU numbers, model utility and the derived scores (no forget quality: no reference)
    assert {f"eval/{s}_{m}" for s in ("forget", "retain", "real_authors", "world_facts")
            for m in ("prob", "rougeL_recall", "truth_ratio")} < set(res.before)
    assert {"eval/unlearn_score", "eval/completion_score"} <= set(res.before) and "eval/forget_quality" not in res.before
    # FLAT moved the scores the right way on the forget set
    assert res.after["eval/forget_prob"] < res.before["eval/forget_prob"]
    arts = tracking.list_artifacts(res.mlflow_uri, res.run_id)
    assert {"config.yaml", "model", "templates"} <= set(arts)
    assert "model/model.safetensors" in tracking.list_artifacts(res.mlflow_uri, res.run_id, "model")
    assert (res.model_dir.parent / "templates" / "epoch_1.json").is_file()
    # eval.save_logs: every evaluation's per-question results in TOFU's and open-unlearning's formats, on disk and
    # in MLflow, with the numbers the run logged
    logs = res.model_dir.parent / "eval_logs"
    assert sorted(p.name for p in logs.iterdir()) == ["epoch0", "epoch2", "epoch4"]
    ou = json.loads((logs / "epoch4" / "TOFU_SUMMARY.json").read_text())
    assert ou["forget_Q_A_Prob"] == pytest.approx(res.after["eval/forget_prob"], rel=1e-12)
    assert ou["retain_Q_A_ROUGE"] == pytest.approx(res.after["eval/retain_rougeL_recall"], rel=1e-12)
    assert json.loads((logs / "epoch0" / "summary.json").read_text())["forget_prob"] == res.before["eval/forget_prob"]
    assert {"eval_logs/epoch4/TOFU_EVAL.json", "eval_logs/epoch4/eval_log_forget.json"} <= set(
        tracking.list_artifacts(res.mlflow_uri, res.run_id, "eval_logs/epoch4"))


# ZeRO-2 gives ZeRO-3's loss curve: tests/integration/test_reliability.py, in the run that fills a disk.


def test_a_new_run_from_a_checkpoint_reproduces_the_uninterrupted_run(zero3, base):
    cfg, res = zero3
    storage = storage_root(cfg).local / "zero3"
    checkpoints = sorted(p for p in storage.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2  # the 2 best by forget probability: the evaluated epochs 2 and 4
    resumed = run_training(cfg_for(base, *ZERO3, "tracking.run_name=zero3-from-epoch2", "eval.enabled=false",
                                   "launch.checkpoint_metric=null"), resume_from=str(checkpoints[0]))
    full, part = loss_curve(res), loss_curve(resumed)
    assert len(part) == 6  # only epochs 3 and 4 were trained
    assert part == pytest.approx(full[6:], abs=2e-5)
    a, b = load_file(res.model_dir / "model.safetensors"), load_file(resumed.model_dir / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


PREFLIGHT_MISTAKES = [
    (["model.name_or_path={dir}/missing-model"], "does not exist or has no config.json"),
    (["model.name_or_path=some-org/not-cached-model"], "HF_HUB_OFFLINE=1 and it is not in the local cache"),
    (["data.benchmark=tofu", "data.data_dir={dir}/bad", "data.split=forget01"], "not valid JSON"),
    (["tracking.mlflow_uri=http://127.0.0.1:9"], "MLflow server http://127.0.0.1:9 is unreachable"),
    (["tracking.mlflow_uri=file:///tmp/mlruns"], "is not supported; use sqlite"),
    ([f"launch.num_workers={(os.cpu_count() or 1) + 2}"], f"needs {((os.cpu_count() or 1) + 2) * 0.99:g} CPUs but "
                                                         f"this machine has {os.cpu_count() or 1}"),
    (["launch.gpus_per_worker=1"], "GPU(s); lower launch.gpus_per_worker"),
    (["--resume", "never-ran"], "no run named 'never-ran'"),
    (["model.tokenizer={dir}/missing-tokenizer"], "model.tokenizer '{dir}/missing-tokenizer' does not exist"),
    (["launch.placement_strategy=SPREAD_OUT"], "launch.placement_strategy='SPREAD_OUT' is not valid. Did you mean "
                                              "'SPREAD'? Valid choices: auto, PACK, STRICT_PACK, SPREAD"),
]


@pytest.mark.parametrize(("args", "message"), PREFLIGHT_MISTAKES, ids=[a[0][:40] for a, _ in PREFLIGHT_MISTAKES])
def test_train_refuses_bad_input_before_anything_is_written(args, message, tmp_path, capsys):
    from cli.main import main

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "forget01.jsonl").write_text('{"question": "q", "answer": \n')
    before = sorted(tmp_path.rglob("*"))
    argv = ["train", *[a.format(dir=tmp_path) for a in args], f"paths.workdir={tmp_path}/wd", "model.name_or_path=tiny"
            if not any(a.startswith("model.") for a in args) else "data.max_length=64"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0 and message.format(dir=tmp_path) in err, err
    assert sorted(tmp_path.rglob("*")) == before  # no MLflow store, no Ray results, no model cache


def _meets_targets(before: dict, after: dict) -> bool:
    """The demo's promise (#14's targets for a faithful miniature of TOFU): unlearning raises forget quality at
    least 100-fold and keeps at least 85% of the model utility, and the forget answers lose at least a quarter of
    their probability (halving it while keeping 80% of the retain answers' is what a sweep finds: docs/science.md)."""
    return (after["forget_quality"] >= 100 * before["forget_quality"]
            and after["model_utility"] >= 0.85 * before["model_utility"]
            and after["forget_prob"] <= 0.75 * before["forget_prob"])


def test_embedded_demo_meets_its_promise(ray_local, demo_workdir, capsys):
    """README command 2 (`flat-ray train eval.reference=auto`): builds and fine-tunes the original model and the
    retain model (both with the background split), then FLAT (Jensen-Shannon) unlearns forget10 selectively. The
    original is a faithful miniature of a TOFU original: every utility component above 0, model utility >= 0.4 and
    forget quality <= 1e-3 against the retain model. The promise also holds with the learning rate 20% lower and 20%
    higher (replayed in one process, which gives the real run's numbers: checked here on the real run)."""
    from cli.main import main
    from flat_ray.engine.replica import replay

    with pytest.raises(SystemExit) as exc:
        main(["train", f"paths.workdir={demo_workdir}", "eval.reference=auto"])
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    lines = out.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("metric "))
    end = next(i for i, line in enumerate(lines) if i > top and line.startswith("run "))
    rows = {line.split()[0]: line.split()[1:] for line in lines[top + 1:end]}  # the before/after table
    keys = ("forget_quality", "model_utility", "forget_prob", "retain_prob")
    real = {when: {key: float(rows[key][i]) for key in keys} for i, when in enumerate(("before", "after"))}
    # forget metrics first, then utility, then the objectives (the metric registry's roles and order)
    assert [line.split()[0] for line in lines[top + 1:top + 5]] == [
        "forget_prob", "forget_rougeL_recall", "forget_truth_ratio", "forget_quality"], lines[top:]
    before = real["before"]
    assert before["forget_prob"] > 0.9 and before["retain_prob"] > 0.9  # it learned the authors
    assert before["forget_quality"] <= 1e-3 and before["model_utility"] >= 0.4
    utility = ("retain_prob", "retain_rougeL_recall", "retain_truth_ratio", "real_authors_prob",
               "real_authors_rougeL_recall", "real_authors_truth_ratio", "world_facts_prob",
               "world_facts_rougeL_recall", "world_facts_truth_ratio")
    assert all(float(rows[k][0]) > 0 for k in utility), rows
    assert _meets_targets(before, real["after"]), real
    assert "MLflow run id:" in out and (demo_workdir / "mlflow.db").is_file()
    # rank 0's progress reached this console through the relay: step lines off a terminal, a table per evaluation
    name = next(line.split()[1] for line in out.splitlines() if line.startswith("run ") and " finished in " in line)
    assert f"{name}: step 12/12 (epoch 4)" in out and f"{name}: evaluation after epoch 4" in out
    originals = list((demo_workdir / "models").glob("demo-original-*/model.safetensors"))
    assert len(originals) == 1 and len(list((demo_workdir / "models").glob("demo-retain-*/model.safetensors"))) == 1
    # the original's 16 epochs were checkpointed every 8 (its preset), all deleted once it had finished and exported
    # (launch.keep_checkpoints=0, the default); Ray Train's own files of the run stay
    ray_run = demo_workdir / "ray_results" / originals[0].parent.name
    assert (ray_run / "flat_ray_run.json").is_file() and [p for p in ray_run.glob("checkpoint_*") if p.is_dir()] == []
    state = json.loads((ray_run / "flat_ray_run.json").read_text())
    written = tracking.metric_history(state["mlflow_uri"], state["run_id"], "checkpoint_mb")
    assert len(written) == 2 and all(mb > 0 for _, mb in written)
    assert tracking.metric_history(state["mlflow_uri"], state["run_id"], "checkpoints_kept_mb") == [(0, 0.0)]
    # every evaluation of the run scored forget quality against the retain model's logs
    run_id = next(line.split()[-1] for line in lines if line.startswith("MLflow run id:"))
    assert [s for s, _ in tracking.metric_history(state["mlflow_uri"], run_id, "eval/forget_quality")] == [0, 1, 2, 3, 4]

    (logs,) = (demo_workdir / "models").glob("demo-retain-*/eval-forget10-20q-24t-96-mia")
    # and the membership-inference and memorization metrics (#30), PrivLeak against the retain model's Min-K% AUC
    from flat_ray.eval.mia import privleak
    from flat_ray.eval.tofu import read_reference_mia

    history = {k: dict(tracking.metric_history(state["mlflow_uri"], run_id, f"eval/{k}")) for k in (
        "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_reference", "privleak",
        "extraction_strength", "exact_memorization")}
    assert all(sorted(h) == [0, 1, 2, 3, 4] for h in history.values()), history
    ref_auc = read_reference_mia(logs)["auc"]
    assert 0.2 < ref_auc < 0.8  # the retain model has not seen either side
    assert all(history["privleak"][e] == pytest.approx(privleak(history["mia_min_k"][e], ref_auc)) for e in range(5))
    assert history["mia_loss"][0] > 0.9 and history["extraction_strength"][0] > 0.5  # the original remembers
    cfg = load_config(None, [f"paths.workdir={demo_workdir}", f"eval.reference={logs}"], presets=["demo"])
    start: dict = {}
    for scale in (1.0, 0.8, 1.2):  # the model before unlearning is evaluated once
        scaled = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr * scale))
        replica = replay(scaled, str(originals[0].parent), evaluate_before=not start)
        start = start or replica["before"]
        if scale == 1.0:  # the replica is the real run, to the printed precision
            for when, values in real.items():
                for key, value in values.items():
                    assert replica[when][key] == pytest.approx(value, rel=1e-3, abs=2e-4), (when, key)
        assert _meets_targets(start, replica["after"]), (scale, replica)


def test_two_worker_evaluation_equals_one_process_on_the_same_weights(zero3):
    """The last per-epoch evaluation of the 2-worker ZeRO-3 run (sharded, gathered) equals a single-process
    evaluation of the exported model, the membership-inference and memorization metrics included."""
    from flat_ray.eval.runner import eval_split_rows, evaluate_tofu
    from flat_ray.eval.tofu import summarize
    from flat_ray.models import load_model_and_tokenizer, resolve_profile

    cfg, res = zero3
    model, tok = load_model_and_tokenizer(str(res.model_dir))
    rows = eval_split_rows(cfg.data.benchmark, cfg.data.split, None, cfg.eval.max_examples, cfg.eval.mia)
    values = evaluate_tofu(model, tok, resolve_profile(cfg.model.profile, cfg.model.name_or_path, tok), rows,
                           max_length=cfg.data.max_length, batch_size=cfg.eval.batch_size,
                           max_new_tokens=cfg.eval.max_new_tokens)
    single = summarize(values)
    logged = {k.removeprefix("eval/"): v for k, v in res.after.items()}
    assert {"forget_prob", "retain_prob", "forget_truth_ratio", "model_utility", "mia_min_k", "privleak",
            "extraction_strength"} <= set(logged)
    for key, value in logged.items():
        assert value == pytest.approx(single[key], abs=1e-4), key


# One baseline end to end: NPO (a reference engine sharded like the model, retain batches, gradient checkpointing
# under ZeRO-3), on MUSE-News: tests/eval/test_text_benchmarks.py. Every method's direction is checked in process
# (tests/losses/test_method_steps.py).
