"""Cloud storage for real: a run's Ray state on ``s3://`` against a local S3 server (moto in server mode, started by
the ``s3_bucket`` fixture; Ray Train and flat-ray reach it through pyarrow with ``AWS_ENDPOINT_URL``). The sweep on
``s3://``: tests/integration/test_tune.py (Optuna with ASHA)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from flat_ray import tracking
from flat_ray.export import RUN_STATE, kept_checkpoints
from flat_ray.storage import Place
from tests.procs import kill_tree
from tests.runs import FLAT_RAY, tiny_overrides, train_workers
from tests.test_cli import run_main

pytestmark = pytest.mark.slow


def _wait(check, what: str, alive, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert alive(), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _tag(run: Place, key: str) -> str | None:
    if not (run / RUN_STATE).is_file():
        return None
    state = json.loads((run / RUN_STATE).read_text())
    return tracking.run_data(state["mlflow_uri"], state["run_id"]).data.tags.get(key)


def test_a_run_on_s3_restores_after_a_lost_worker_resumes_after_a_killed_driver_and_exports(
        s3_bucket, ray_local, tiny_model_dir, tmp_path, capsys):
    """`flat-ray train` with launch.storage_path=s3://…: its checkpoints and run state are in the bucket, and nothing
    under the work folder's ray_results. A Ray Train worker SIGKILLed after the first checkpoint: the workers restore
    from the bucket; the driver and its run SIGKILLed once a checkpoint after that restore is in the bucket:
    `--resume` finds the run there and finishes it, every step and evaluation logged, in one MLflow run. The two
    best checkpoints stay in the bucket, and `flat-ray export` makes the best one a model."""
    storage, work = f"{s3_bucket}/runs", tmp_path / "work"
    run = Place.of(storage) / "s3run"
    args = [*tiny_overrides(tiny_model_dir, work), "optim.epochs=3", "launch.num_workers=1", "launch.max_failures=1",
            f"launch.storage_path={storage}", "tracking.run_name=s3run", "launch.checkpoint_metric=forget_prob",
            "launch.keep_checkpoints=2"]
    log = tmp_path / "first.log"
    first = subprocess.Popen([FLAT_RAY, "train", "--address", ray_local, *args], cwd=tmp_path, stdout=log.open("w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    alive = lambda: first.poll() is None  # noqa: E731
    try:
        _wait(lambda: kept_checkpoints(run), "a checkpoint in the bucket", alive)
        train_workers()[-1].kill()
        _wait(lambda: _tag(run, "restores") == "1", "the restore from the bucket", alive)
        _wait(lambda: max(k.epoch for k in kept_checkpoints(run)) >= 2, "a checkpoint after the restore", alive)
    finally:
        kill_tree(first)
    resumed = subprocess.run([FLAT_RAY, "train", "--address", ray_local, "--resume", "s3run", f"paths.workdir={work}",
                              f"launch.storage_path={storage}"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]

    state = json.loads((run / RUN_STATE).read_text())
    uri, run_id = state["mlflow_uri"], state["run_id"]
    data = tracking.run_data(uri, run_id)
    assert data.info.status == "FINISHED" and data.data.tags["restores"] == "2" and data.data.tags["resumed"] == "true"
    assert {s for s, _ in tracking.metric_history(uri, run_id, "train/loss")} == set(range(1, 16))  # 3 x 5 steps
    evaluated = dict(tracking.metric_history(uri, run_id, "eval/forget_prob"))
    assert sorted(evaluated) == [0, 1, 2, 3]
    kept = kept_checkpoints(run)
    assert sorted(k.epoch for k in kept) == sorted(sorted((1, 2, 3), key=lambda e: (evaluated[e], -e))[:2])
    assert not (work / "ray_results").exists() and (tmp_path / "work" / "runs" / "s3run" / "model").is_dir()

    code, out, err = run_main(["export", "s3run", f"launch.storage_path={storage}", f"paths.workdir={work}"], capsys)
    best = min(kept, key=lambda k: (k.metrics["forget_prob"], -k.epoch)).epoch
    assert code == 0 and f"exported epoch {best} of s3run" in out, err
    assert (work / "runs" / "s3run" / f"model-epoch{best}" / "model.safetensors").is_file()
