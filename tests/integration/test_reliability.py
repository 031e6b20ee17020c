"""Reliability for real (local Ray, 2 Ray Train workers, DeepSpeed ZeRO-3 on CPU, MLflow on SQLite): a lost worker
restarts from its checkpoint and a killed driver resumes without picking up a half-written checkpoint (one run
lives through both), a full or read-only disk fails with one clear line, checkpoints refuse to load when cut
short."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from flat_ray import tracking
from flat_ray.config import load_config
from flat_ray.engine.checkpoint import verify, write_manifest
from flat_ray.errors import FlatRayError, IncompleteCheckpoint, RunFailed
from flat_ray.fileio import atomic_write_text, check_writable
from flat_ray.launch.driver import run_training
from flat_ray.launch.records import STATE_FILE
from tests.runs import ZERO3, tiny_overrides

FLAT_RAY = str(Path(sys.executable).with_name("flat-ray"))


def _overrides(model: Path, work: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(model, work), "deepspeed.stage=3", *extra]


def _runs_named(uri: str, experiment: str, name: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")


# ------------------------------------------------------------------------------------ checkpoints, unit level
def test_a_checkpoint_cut_short_is_refused_with_a_reason(tmp_path):
    ckpt = tmp_path / "ckpt"
    for rank in (0, 1):
        part = tmp_path / f"rank{rank}"
        (part / "ds").mkdir(parents=True)
        (part / "ds" / f"shard_{rank}.pt").write_bytes(os.urandom(1000 + rank))
        write_manifest(part, rank, 2, {"epoch": 1, "global_step": 6})
        shutil.copytree(part, ckpt, dirs_exist_ok=True)  # Ray Train merges the ranks' folders into one
    assert verify(ckpt, 2) == {"epoch": 1, "global_step": 6}
    with pytest.raises(IncompleteCheckpoint, match="written by 2 workers but this run has 4"):
        verify(ckpt, 4)
    with open(ckpt / "ds" / "shard_1.pt", "r+b") as fh:  # a crash in the middle of copying rank 1's shard
        fh.truncate(500)
    with pytest.raises(IncompleteCheckpoint, match=r"incomplete: ds/shard_1.pt is 500, rank 1 wrote 1001 bytes"):
        verify(ckpt, 2)
    (ckpt / "flat_ray_ckpt_rank1.json").unlink()  # rank 1 never finished
    with pytest.raises(IncompleteCheckpoint, match="holds 1 of 2 ranks' parts"):
        verify(ckpt, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IncompleteCheckpoint, match="has no flat_ray manifest"):
        verify(empty, 2)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_text(target, '{"old": 1}')

    def crash(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_text(target, '{"new": 2}')
    assert target.read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind


# --------------------------------------------------------------------------------------- storage on small disks
@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root with CAP_SYS_ADMIN only; skipped elsewhere) to make a disk full or read-only."""
    mounts = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        path = tmp_path / name
        path.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or 'not root'}); the disk-full and "
                        "read-only cases need it")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_storage_path_is_refused_before_anything_is_written(tmp_path, tmpfs, tiny_model_dir):
    ro = tmpfs("ro", "1m", read_only=True)
    with pytest.raises(FlatRayError, match=r"not writable: \[Errno 30\] Read-only file system"):
        check_writable(ro / "ray_results", "the storage path (launch.storage_path)")
    work = tmp_path / "work"
    res = subprocess.run([FLAT_RAY, "train", *_overrides(tiny_model_dir, work, f"launch.storage_path={ro}/results")],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "the storage path (launch.storage_path)" in lines[0] and "Read-only" in lines[0]
    assert "Traceback" not in res.stderr + res.stdout
    assert not work.exists()


def test_file_in_place_of_the_storage_folder_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FlatRayError, match="is a file, not a folder"):
        check_writable(tmp_path / "afile" / "results", "the storage path (launch.storage_path)")


@pytest.mark.slow
def test_zero2_gives_zero3s_losses_until_a_full_disk_fails_the_run_with_one_clear_line(tmp_path, tmpfs, zero3, base):
    """One ZeRO-2 run of the shared ZeRO-3 run's recipe (no evaluation), its storage on a tmpfs with room for Ray's
    run files but not for a checkpoint, which it writes only after the last epoch: its 12 steps give the ZeRO-3
    run's losses and scores, then the checkpoint fills the disk and the run fails with one line that says where."""
    full = tmpfs("full", "256k")  # megabytes of checkpoint do not fit
    cfg = load_config(None, [*base, *ZERO3, "deepspeed.stage=2", "eval.enabled=false", "launch.checkpoint_metric=null",
                             "launch.export=none", "launch.checkpoint_every_epochs=4", "launch.max_failures=0",
                             f"launch.storage_path={full}", "tracking.run_name=zero2"])
    with pytest.raises(RunFailed) as err:
        run_training(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    # each rank stages its checkpoint in the run's storage folder (not the node's /tmp): that is where it ran out
    assert f"could not write the epoch 4 checkpoint to {full}/zero2/.staging/flat-ray-ckpt-r" in msg
    assert "in the storage path (launch.storage_path)" in msg
    assert "No space left on device" in msg and "free space or fix its permissions" in msg
    state = json.loads((full / "zero2" / STATE_FILE).read_text())
    uri, run_id = state["mlflow_uri"], state["run_id"]
    assert tracking.run_data(uri, run_id).info.status == "FAILED"

    _, res3 = zero3  # every step before the failure, as ZeRO-3 took it
    c2, c3 = ([v for _, v in tracking.metric_history(u, r, "train/loss")] for u, r in ((uri, run_id),
                                                                                      (res3.mlflow_uri, res3.run_id)))
    assert len(c2) == len(c3) == 12
    assert c2 == pytest.approx(c3, abs=2e-5)
    assert c3[-1] < c3[0] - 1e-4  # the curve moves (FLAT's TV loss starts near 0 on an untrained model)
    s2, s3 = ([v for _, v in tracking.metric_history(u, r, "train/score_forget")] for u, r in ((uri, run_id),
                                                                                            (res3.mlflow_uri,
                                                                                             res3.run_id)))
    assert s2 == pytest.approx(s3, rel=1e-3)


# ------------------------------------------------------------------- lost worker, then killed driver, resumed
@pytest.mark.slow
def test_a_lost_worker_and_a_killed_driver_end_where_the_uninterrupted_run_ends(interrupted, zero3):
    """One run lives through both (tests/runs.py), its checkpoints and run state in cloud storage (the suite's S3
    server): a Ray Train worker SIGKILLed after the first checkpoint (Ray Train restarts the workers from it, in the
    same MLflow run), then the driver and every process of its run SIGKILLed after the second, with a cut-short
    newer checkpoint left behind; `flat-ray train --resume` finds the run in the bucket and finishes it from the
    last complete checkpoint. It ends where the uninterrupted run ends, and nothing went to a local ray_results."""
    run = interrupted
    assert run.resumed.returncode == 0, run.resumed.stderr[-3000:]
    assert run.checkpoints_at_worker_kill == 1, "the worker was killed after the second checkpoint already"
    assert not psutil.pid_exists(run.killed_worker) or psutil.Process(run.killed_worker).status() == psutil.STATUS_ZOMBIE
    assert "is incomplete" in run.half_written_refusal  # flat_ray's check refused it before the resume
    assert not run.half_written.exists()  # and the finished run dropped it first (launch.keep_checkpoints)

    state = json.loads((run.run_dir / STATE_FILE).read_text())
    uri, run_id = state["mlflow_uri"], state["run_id"]
    data = tracking.run_data(uri, run_id)
    assert data.info.status == "FINISHED" and data.data.tags["resumed"] == "true"
    # two restores, both counted in the one MLflow run: Ray Train's after the lost worker, then --resume from the
    # last registered checkpoint (not the newer, half-written one)
    assert data.data.tags["restores"] == "2"
    assert int(data.data.tags["resumed_from_epoch"]) == run.last_epoch + 1 >= 2
    assert len(_runs_named(uri, "flat-ray", "interrupted")) == 1
    assert run.run_dir.uri.startswith("s3://") and not (run.work / "ray_results").exists()

    # and it ends where the uninterrupted run ends: same steps, losses, evaluation and weights
    _, clean = zero3

    def by_step(u: str, rid: str, key: str) -> dict[int, float]:
        return dict(tracking.metric_history(u, rid, key))  # a step trained again after a restore: its last value

    a, b = by_step(clean.mlflow_uri, clean.run_id, "train/loss"), by_step(uri, run_id, "train/loss")
    assert sorted(b) == sorted(a) == list(range(1, 13))  # 4 epochs x 3 steps, none missing
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], abs=2e-5)
    for key in ("eval/forget_prob", "eval/retain_prob", "eval/forget_truth_ratio"):
        ea, eb = by_step(clean.mlflow_uri, clean.run_id, key), by_step(uri, run_id, key)
        assert sorted(ea) == sorted(eb) == [0, 2, 4] and [eb[s] for s in ea] == pytest.approx(list(ea.values()), abs=1e-4)
    # forget quality against the uninterrupted run's epoch-0 logs, named relative to the driver's folder and read by
    # the driver only (the restarted workers ran while that folder was away): the same model on the same questions
    # before training gives truth ratios whose two-sample KS test has p-value 1
    quality = by_step(uri, run_id, "eval/forget_quality")
    assert sorted(quality) == [0, 2, 4] and quality[0] == pytest.approx(1.0) and all(0 < q <= 1 for q in quality.values())
    model_dir = Path(state["output_dir"]) / "model"
    wa, wb = load_file(clean.model_dir / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)
