"""`flat-ray tune` for real: Ray Tune on the suite's Ray driving Ray Train trials (DeepSpeed on CPU/gloo), MLflow on
SQLite. A diverged trial is a recorded result, never run again; Optuna + ASHA stop the worst trial and close every
run; the demo sweep as the README runs it, interrupted twice (SIGKILL, then Ctrl-C), resumes with only the missing
trials."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.main import main
from flat_ray import tracking
from flat_ray.launch.records import STATE_FILE
from tests.procs import kill_tree

pytestmark = pytest.mark.slow

SMALL = ("model.name_or_path: {model}, data.split: forget05, data.max_length: 64, optim.micro_batch_size: 2, "
         "optim.epochs: {epochs}, eval.max_examples: 4, eval.max_new_tokens: 6, eval.batch_size: 4")


def _space(tmp_path: Path, model: Path, body: str, epochs: int, extra: str = "") -> Path:
    path = tmp_path / "space.yaml"
    path.write_text("base: [demo]\nset: {" + SMALL.format(model=model, epochs=epochs) + extra + "}\n" + body)
    return path


def _runs(db: Path) -> list[tuple[str, str]]:
    """(name, status) of every run, straight from the SQLite store (no MLflow client in the polling loop)."""
    if not db.is_file():
        return []
    with sqlite3.connect(db) as con:
        try:
            return con.execute("select name, status from runs").fetchall()
        except sqlite3.OperationalError:
            return []


def _tune(cwd: Path, monkeypatch, capsys, *args: str) -> str:
    """`flat-ray tune ARGS` in-process from ``cwd``; asserts exit 0 and returns stdout."""
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", *args])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out[-3000:]
    return out


def _tagged(db: Path, run_name: str, key: str) -> bool:
    if not db.is_file():
        return False
    with sqlite3.connect(db) as con:
        try:
            return con.execute("select count(*) from tags t join runs r on t.run_uuid = r.run_uuid "
                               "where r.name = ? and t.key = ?", (run_name, key)).fetchone()[0] > 0
        except sqlite3.OperationalError:
            return False


def _state_saved(workdir: Path, run_name: str) -> bool:
    """Whether the run's state file, which a resume finds it by, is written."""
    return any(workdir.glob(f"**/{run_name}/{STATE_FILE}"))


def _wait_until(done, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 480
    while not done():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what} did not happen in time"
        time.sleep(0.5)


def test_a_trial_is_its_best_epoch_and_a_diverged_trial_is_a_recorded_result(tmp_path, ray_local, tiny_model_dir,
                                                                              monkeypatch, capsys):
    """Two trials. lr 2e-3 finishes, and its best epoch by the objective (retain_prob, which FLAT lowers a little
    each epoch) is epoch 1 of 2: Tune's result, the console line, the report's row and Pareto point, the parent's
    summary and the exported model all are that epoch, while its curves in MLflow go on to epoch 2. lr 1e30
    diverges: a result of the search, not an error (its MLflow run FAILED with the step and the reason, nothing
    exported, listed among the trials that did not finish); the sweep exits 0 and a resume runs neither again."""
    space = _space(tmp_path, tiny_model_dir, """grid: {method: [flat]}
params: {optim.lr: {grid: [1.0e+30, 2.0e-3]}, optim.max_grad_norm: 0, optim.warmup_ratio: 0}
objective: retain_prob
report: {forget: [forget_prob], utility: [retain_prob], pareto: [forget_prob, retain_prob]}
""", epochs=2)
    out = _tune(tmp_path, monkeypatch, capsys, "--space", str(space), "--name", "dv")
    assert "sweep dv: 2 trials, 0 errored" in out
    import json

    sweep = tmp_path / "flat_ray_work" / "sweeps" / "dv"
    state = json.loads((sweep / "sweep.json").read_text())
    uri = tracking.default_uri(tmp_path / "flat_ray_work")
    bad, good = sorted(tracking.child_runs(uri, state["parent_run_id"]), key=lambda r: r.info.run_name)
    assert bad.info.status == "FAILED" and bad.data.tags["diverged"] == "true" and "model_dir" not in bad.data.tags
    assert bad.info.run_name.endswith("-demo_forget05-flat-00000") and bad.data.params["optim.lr"] == "1e+30"
    step = int(bad.data.tags["diverged_step"])
    assert step >= 1 and f"at step {step} (epoch 1)" in bad.data.tags["diverged_reason"]
    assert not list((tmp_path / "flat_ray_work").rglob(f"{bad.info.run_name}/model"))  # nothing exported
    report = (sweep / "report" / "report.md").read_text()
    assert "## Trials that did not finish" in report and "1 diverged" in report
    assert f"at its best epoch (the one its cell would export; epoch 0 is the model before unlearning). MLflow " \
           f"parent run {state['parent_run_id']} in {uri}." in report
    (line,) = [x for x in report.splitlines() if x.startswith(f"| {bad.info.run_name} |")]
    assert "| diverged |" in line and f"at step {step}" in line and "lower optim.lr" in line

    # the finished trial: best epoch 1, not its last (2)
    curve = dict(tracking.metric_history(uri, good.info.run_id, "eval/retain_prob"))
    forget = dict(tracking.metric_history(uri, good.info.run_id, "eval/forget_prob"))
    assert sorted(curve) == [0, 1, 2] and curve[1] > curve[2]
    assert f"trial {good.info.run_name} done: optim.lr=0.002 -> retain_prob={curve[1]:.4g} (best epoch 1)" in out
    (bench,) = json.loads((sweep / "report" / "report.json").read_text())["tables"].values()
    (row,) = [r for r in bench if r["method"].startswith("flat/")]
    assert row["epoch"] == 1 and row["retain_prob"] == curve[1] and row["forget_prob"] == forget[1]
    trials = {t["name"]: t for t in json.loads((sweep / "report" / "report.json").read_text())["trials"]}
    kept = trials[good.info.run_name]  # what the Pareto plot places
    assert kept["epoch"] == 1 and kept["last_epoch"] == 2 and kept["final"]["forget_prob"] == forget[1]
    parent = tracking.run_data(uri, state["parent_run_id"])
    assert parent.data.metrics["best/demo/forget05/retain_prob"] == curve[1]
    assert parent.data.metrics["best/demo/forget05/epoch"] == 1
    assert "(epoch 1)" in parent.data.tags["mlflow.note.content"]
    assert good.data.tags["model_epoch"] == "1" and Path(good.data.tags["model_dir"], "config.json").is_file()
    assert f"best trial {good.info.run_name} (epoch 1, retain_prob" in out

    out = _tune(tmp_path, monkeypatch, capsys, "--resume", "dv")  # nothing left to run
    assert "sweep dv: 2 trials, 0 errored" in out
    again = sorted(tracking.child_runs(uri, state["parent_run_id"]), key=lambda r: r.info.run_name)
    assert [r.info.end_time for r in again] == [bad.info.end_time, good.info.end_time]
    assert not any("resumed" in r.data.tags for r in again)


def test_optuna_with_asha_runs_parallel_trials_and_stops_the_worst(tmp_path, ray_local, tiny_model_dir, monkeypatch,
                                                                   capsys, s3_bucket):
    """Optuna samples three trials (seed 6 gives lr 2e-3, 2e-3, then 1e-7); on the suite's Ray (2 CPUs, whatever the
    machine) two run at a time. Both first trials have reported epoch 1 before the third starts, so when the third
    reaches ASHA's rung its forget probability (an lr of 1e-7 barely moves it) is worse than theirs and ASHA stops
    it; the two others finish. Every MLflow run is closed and no placement group is left behind. With accumulation
    3 over 2 epochs of 5 micro-batches, each finished trial takes the 3 optimizer steps the dry run counts. Tune's and
    the trials' state is in cloud storage (--storage-path s3://… on the suite's local S3 server): the best trial is
    exported from there and every checkpoint there is deleted at the end."""
    space = _space(tmp_path, tiny_model_dir, """grid: {method: [flat]}
params: {optim.lr: {choice: [2.0e-3, 1.0e-7]}}
num_samples: 3
search: {algorithm: optuna, seed: 6}
scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
objective: forget_prob
resources: {num_workers: 1, deepspeed_stage: 2}
""", epochs=2, extra=", optim.grad_accum_steps: 3")
    out = _tune(tmp_path, monkeypatch, capsys, "--space", str(space), "--name", "oa", "--storage-path",
                f"{s3_bucket}/sweeps")
    assert "| model" in out
    lines = out.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("cell ") and "concurrent" in line)
    header, row = lines[top], lines[top + 1]  # the trial table printed at the start (fixed-width columns)

    def column(name: str) -> str:
        return row[header.index(name):].split()[0]

    assert column("trials") == "3" and column("concurrent") == "2", lines[top:top + 2]
    uri = tracking.default_uri(tmp_path / "flat_ray_work")
    import json

    state = json.loads((tmp_path / "flat_ray_work" / "sweeps" / "oa" / "sweep.json").read_text())
    assert state["objective"] == ["forget_prob"] and state["modes"] == ["min"]
    children = sorted(tracking.child_runs(uri, state["parent_run_id"]), key=lambda r: r.info.start_time)
    assert [r.data.tags["sampled.optim.lr"] for r in children] == ["0.002", "0.002", "1e-07"]  # Optuna, seed 6
    assert [r.info.status for r in children] == ["FINISHED", "FINISHED", "KILLED"]
    stopped = children[2]
    assert stopped.data.tags["stopped_early"] == "true" and "model_dir" not in stopped.data.tags
    # the cell's original evaluated once: the first two trials start together, one evaluates it while the other
    # waits for its values with its workers already placed (on a cold cluster its nodes start meanwhile), and the
    # third reads them at once; all three log the same numbers as their epoch-0 evaluation
    assert sorted(r.data.tags.get("original_eval") for r in children) == ["cached", "cached", "evaluated"]
    evaluator = next(i for i in (0, 1) if children[i].data.tags["original_eval"] == "evaluated")
    from mlflow.tracking import MlflowClient

    evaluated = min(m.timestamp for m in MlflowClient(uri).get_metric_history(children[evaluator].info.run_id,
                                                                              "eval/forget_prob") if m.step == 0)
    assert children[1 - evaluator].info.start_time < evaluated, "the second trial started only once it was evaluated"
    assert all("original_wait_s" in r.data.metrics for r in children)  # how long each waited, logged at epoch 0
    for key in ("eval/forget_prob", "eval/model_utility", "eval/retain_truth_ratio", "eval/unlearn_score"):
        assert len({dict(tracking.metric_history(uri, r.info.run_id, key))[0] for r in children}) == 1, key
    rung = [dict(tracking.metric_history(uri, r.info.run_id, "eval/forget_prob"))[1] for r in children]
    assert rung[2] > max(rung[:2])  # what ASHA compared after epoch 1
    from flat_ray.dryrun import dry_run
    from flat_ray.sweep import load_space

    steps = dry_run(load_space(str(space)).cells[0].config)["optimizer_steps"]
    # the sweep exported the best epoch (by forget_prob) of the better finished trial, and only that
    best_prob = {r.info.run_name: min(v for s, v in tracking.metric_history(uri, r.info.run_id, "eval/forget_prob") if s)
                 for r in children[:2]}
    exported = [r for r in children if "model_dir" in r.data.tags]
    assert [r.info.run_name for r in exported] == [min(best_prob, key=best_prob.get)]
    assert Path(exported[0].data.tags["model_dir"], "config.json").is_file()
    assert "flat_ray_work/sweeps/oa/trials/" in exported[0].data.tags["model_dir"]
    from flat_ray.storage import Place

    trial_dirs = (Place.of(f"{s3_bucket}/sweeps") / "oa" / "train").dirs()
    assert sorted(d.name for d in trial_dirs) == sorted(r.info.run_name for r in children)  # in the bucket
    assert not any(d.dirs("checkpoint_") for d in trial_dirs)  # every checkpoint dropped at the end
    assert not (tmp_path / "flat_ray_work" / "ray_results").exists()
    for r in children[:2]:
        logged = [s for s, _ in tracking.metric_history(uri, r.info.run_id, "train/loss")]
        assert logged == list(range(1, steps + 1)) and steps == 3  # 10 micro-batches // 3
    for r in children:
        assert r.data.params["deepspeed.stage"] == "2" and r.data.params["launch.num_workers"] == "1"
    assert tracking.run_data(uri, state["parent_run_id"]).data.params["sweep.algorithm"] == "optuna"
    # nothing of the stopped trial holds the suite's CPUs after the sweep (its Ray Train controller can die while
    # starting a worker group and leave that group to this process: CI once saw it stall the next sweep)
    from flat_ray.launch import cluster

    assert cluster._actor_created_groups() == []


NOISE = ("Token authentication", "core_worker.cc", "PreemptionWatcher", "Setting accelerator to CPU",
         "built successfully", "Using default tokenizer", "(RayTrainWorker", "(TrainController", "(pid=",
         "Traceback", "WARNING", "Warning:")


def test_the_demo_sweep_killed_and_interrupted_ends_with_the_report(ray_local, demo_workdir):
    """README command 1 as a user runs it (`flat-ray tune --space demo`, the original model shared with the train demo
    test; joined to the suite's Ray), interrupted twice: the driver is SIGKILLed once the second trial has started (as
    a lost head would be); the resumed sweep is stopped with SIGINT (Ctrl-C: a resume hint, exit 1, no traceback) once it
    runs that trial again; the second resume finishes it and the two trials left. The first trial is not run
    again, the second goes on in its own MLflow run, and the sweep ends as an uninterrupted one would: a console
    with flat-ray's own lines only, the report, and MLflow runs that tell the story, none twice."""
    env = {**os.environ, "FLAT_RAY_VERBOSE": "0"}
    cmd = [str(Path(sys.executable).parent / "flat-ray"), "tune", "--address", ray_local]
    db, cell = demo_workdir / "mlflow.db", "demo-demo_forget10-flat"
    first_trial, second = f"{cell}-00000", f"{cell}-00001"

    log = demo_workdir / "first.log"
    first = subprocess.Popen([*cmd, "--space", "demo", "--name", "demo-sweep", f"paths.workdir={demo_workdir}"],
                             cwd=demo_workdir, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:  # SIGKILL the driver once the second trial has started (its MLflow run is open, its state file written)
        _wait_until(lambda: dict(_runs(db)).get(second) == "RUNNING" and _state_saved(demo_workdir, second),
                    f"{second} running", first, log)
        killed_at = time.time()
    finally:
        kill_tree(first)  # the driver, its trial function, Ray Train's controller and workers
    before = dict(_runs(db))
    assert before[first_trial] == "FINISHED" and before[second] == "RUNNING"
    (first_done,) = [line for line in log.read_text().splitlines() if " done: " in line]

    resume = [*cmd, "--resume", "demo-sweep", "--workdir", str(demo_workdir)]
    log = demo_workdir / "second.log"
    resumed = subprocess.Popen(resume, cwd=demo_workdir, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:  # Ctrl-C once the second trial runs again (its MLflow run reopened)
        _wait_until(lambda: _tagged(db, second, "resumed"), f"{second} resumed", resumed, log)
        resumed.send_signal(signal.SIGINT)
        resumed.wait(timeout=300)
    finally:
        if resumed.poll() is None:
            kill_tree(resumed)
    out = log.read_text()
    assert resumed.returncode == 1, out[-3000:]
    # lines of Ray's own actors come prefixed "(Name pid=N)"; one of them (PlacementGroupCleaner) can print a
    # traceback of its own while Ray shuts down: flat-ray's process itself prints none
    own = [line for line in out.splitlines() if not re.search(r"\(\w+ pid=\d+\)", line)]
    assert not any("Traceback" in line for line in own), "\n".join(own)[-3000:]
    assert "flat-ray: error: sweep demo-sweep was interrupted" in out and "flat-ray tune --resume demo-sweep" in out
    assert dict(_runs(db))[second] == "KILLED"  # cut off by the sweep's stop, closed by its own process
    # where Tune had not saved the first trial's end before the kill, the resume shows that trial's result again
    # (read back from its finished MLflow run, not trained again)
    assert all(line == first_done for line in out.splitlines() if " done: " in line)

    proc = subprocess.run(resume, cwd=demo_workdir, capture_output=True, text=True, timeout=1200, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert [line for line in out.splitlines() if any(n in line for n in NOISE)] == []
    assert "sweep demo-sweep: 4 trials, 0 errored" in out and "/#/experiments/" in out
    assert sum(line.startswith("trial ") and " done: " in line for line in out.splitlines()) == 3  # not the first
    rows = [line for line in out.splitlines() if line.startswith("| demo ")]
    assert [r.split("|")[2].strip() for r in rows] == ["(before unlearning)", "(retain model)", "flat/total_variation",
                                                        "flat/kl", "flat/jensen_shannon", "flat/pearson"]
    import json

    sweep = demo_workdir / "sweeps" / "demo-sweep"
    report = json.loads((sweep / "report" / "report.json").read_text())
    (table,) = report["tables"].values()
    before, retain, methods = table[0], table[1], table[2:]
    assert all(row["trials"] == "1 finished" for row in methods)
    # #14's targets: the original far from the retain model and useful; the best FLAT trial close to it and as useful
    assert before["forget_quality"] <= 1e-3 and before["model_utility"] >= 0.4 and retain["forget_quality"] == 1.0
    best = max(methods, key=lambda row: row["tofu_score"])
    assert best["forget_quality"] >= 100 * before["forget_quality"]
    assert best["model_utility"] >= 0.85 * before["model_utility"]
    # the report as one self-contained page: every table row and the plots inline
    page = (sweep / "report" / "report.html").read_text()
    assert page.count("<tr>") == 1 + len(table) and page.count('src="data:image/png;base64,') == 2
    assert all(f"<td>{row['method']}</td>" in page for row in table)
    # MLflow: every run (the original's, the parent, the four trials) has system metrics, the commit and a
    # description; the parent carries the best result as metrics and the report as artifacts
    state = json.loads((sweep / "sweep.json").read_text())
    uri, parent_id = state["mlflow_uri"], state["parent_run_id"]
    parent = tracking.run_data(uri, parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["resumed"] == "true"
    children = tracking.child_runs(uri, parent_id)
    assert sorted(r.info.run_name for r in children) == [f"{cell}-0000{i}" for i in range(4)]  # none twice
    by_name = {r.info.run_name: r for r in children}
    assert "resumed" not in by_name[first_trial].data.tags and by_name[first_trial].info.end_time / 1000 < killed_at
    run = by_name[second]  # continued in its own MLflow run, to the end
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert [s for s, _ in tracking.metric_history(uri, run.info.run_id, "eval/forget_prob")][-1] == 4
    for run in [parent, *children]:
        assert any(k.startswith("system/cpu") for k in run.data.metrics), run.info.run_name
        assert run.data.tags["mlflow.source.git.commit"] and len(run.data.tags["mlflow.note.content"]) > 80
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent_id for r in children)
    # the best trial's best epoch is the one model the sweep exported (export: best_trial, the default)
    best_epoch = {r.info.run_name: max(v for s, v in tracking.metric_history(uri, r.info.run_id, "eval/tofu_score")
                                       if s) for r in children}
    (exported,) = [r for r in children if "model_dir" in r.data.tags]
    assert exported.info.run_name == max(best_epoch, key=best_epoch.get)
    assert Path(exported.data.tags["model_dir"], "config.json").is_file()
    assert parent.data.tags[f"best_model.{cell}"] == exported.data.tags["model_dir"]
    # the original evaluated once for the cell (by the first trial; the others read its values), every trial's
    # epoch-0 numbers the same, forget quality included
    assert [by_name[f"{cell}-0000{i}"].data.tags.get("original_eval") for i in range(4)] == [
        "evaluated", "cached", "cached", "cached"]
    for key in ("eval/forget_quality", "eval/model_utility", "eval/tofu_score"):
        assert len({dict(tracking.metric_history(uri, r.info.run_id, key))[0] for r in children}) == 1, key
    # consistent parameters across trials: the MLflow compare view lines them up
    assert len({frozenset(r.data.params) for r in children}) == 1
    assert {r.data.params["method.divergence"] for r in children} == {"total_variation", "kl", "jensen_shannon",
                                                                      "pearson"}
    assert parent.data.metrics["best/demo/forget10/tofu_score"] == pytest.approx(best["tofu_score"])
    assert parent.data.metrics["best/demo/forget10/forget_prob"] == pytest.approx(best["forget_prob"])
    assert {"report/report.html", "report/pareto_demo_forget10.png"} <= set(tracking.list_artifacts(uri, parent_id, "report"))
    assert {"space.yaml", "trials.txt"} <= set(tracking.list_artifacts(uri, parent_id))
    assert all("plots/training_curves.png" in tracking.list_artifacts(uri, r.info.run_id, "plots") for r in children)
    assert all(r.inputs.dataset_inputs[0].dataset.name == "demo/forget10" for r in [parent, *children])
    # `flat-ray report` finds the sweep by name
    report_cmd = subprocess.run([cmd[0], "report", "demo-sweep", "--workdir", str(demo_workdir)], cwd=demo_workdir,
                                capture_output=True, text=True, timeout=300)
    assert report_cmd.returncode == 0 and "flat/pearson" in report_cmd.stdout, report_cmd.stderr[-2000:]
