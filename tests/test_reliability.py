"""Reliability for real (local Ray, 2 Ray Train workers, DeepSpeed ZeRO-3 on CPU, MLflow on SQLite): a lost worker
restarts from its checkpoint, a killed driver resumes without picking up a half-written checkpoint, a full or
read-only disk fails with one clear line, checkpoints refuse to load when cut short."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
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
from flat_ray.launch.driver import STATE_FILE, run_training, storage_root
from tests.procs import kill_tree

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it has registered
FLAT_RAY = str(Path(sys.executable).with_name("flat-ray"))


def _overrides(model: Path, work: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={model}", "data.split=forget05", "data.max_length=64", "optim.micro_batch_size=2",
            "optim.lr=2e-3", "optim.warmup_ratio=0.1", "eval.max_examples=4", "eval.max_new_tokens=6",
            "eval.batch_size=4", "deepspeed.stage=3", f"paths.workdir={work}", *extra]


def _registered(run_dir: Path) -> list[str]:
    """Checkpoint folders Ray Train has registered for a run (the ones a restore may use)."""
    try:
        snap = json.loads((run_dir / SNAPSHOT).read_text())
    except (OSError, ValueError):
        return []
    return [r["checkpoint_dir_name"] for r in snap.get("checkpoint_results", [])]


def _wait_for_checkpoints(run_dir: Path, n: int, alive, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(_registered(run_dir)) < n:
        assert alive(), "the run ended before it was interrupted"
        assert time.monotonic() < deadline, f"no {n} registered checkpoint(s) in {run_dir}"
        time.sleep(0.05)


def _runs_named(uri: str, experiment: str, name: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")


def _train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmd:
            found.append(proc)
    return found


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
def test_a_full_disk_fails_the_run_with_one_clear_line(tmp_path, tmpfs, ray_local, tiny_model_dir):
    full = tmpfs("full", "256k")  # room for Ray's run files, not for a checkpoint (megabytes)
    cfg = load_config(None, _overrides(tiny_model_dir, tmp_path / "work", "optim.epochs=1", "eval.enabled=false",
                                       "launch.max_failures=0", f"launch.storage_path={full}",
                                       "tracking.run_name=full"))
    with pytest.raises(RunFailed) as err:
        run_training(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert "could not write the epoch 1 checkpoint to the storage path" in msg
    assert "No space left on device" in msg and "free space or fix its permissions" in msg
    state = json.loads((full / "full" / STATE_FILE).read_text())
    assert tracking.run_data(state["mlflow_uri"], state["run_id"]).info.status == "FAILED"


# ------------------------------------------------------------------------------------------------ lost worker
@pytest.mark.slow
def test_a_lost_worker_restarts_from_its_checkpoint_and_matches_the_uninterrupted_run(tmp_path, ray_local,
                                                                                      tiny_model_dir):
    common = _overrides(tiny_model_dir, tmp_path / "work", "optim.epochs=5", "eval.every_epochs=5",
                        "launch.max_failures=1")
    clean = run_training(load_config(None, [*common, "tracking.run_name=clean"]))
    cfg = load_config(None, [*common, "tracking.run_name=lost"])
    run_dir = storage_root(cfg) / "lost"
    killed: list[int] = []
    done = threading.Event()

    started = time.time()

    def kill_a_worker_after_the_second_checkpoint():
        _wait_for_checkpoints(run_dir, 2, lambda: not done.is_set())
        # this run's two ranks: the first two RayTrainWorker processes created since it started (Ray may have
        # started another one since, e.g. a worker it keeps warm)
        workers = sorted((p for p in _train_workers() if p.create_time() >= started - 1), key=lambda p: p.create_time())
        assert len(workers) >= 2, workers
        victim = workers[1]
        killed.append(victim.pid)
        victim.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker_after_the_second_checkpoint, daemon=True)
    killer.start()
    try:
        lost = run_training(cfg)
    finally:
        done.set()
        killer.join(10)
    assert killed, "no worker was killed"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE

    # the same MLflow run carried on: no duplicate, the restart recorded
    runs = _runs_named(lost.mlflow_uri, cfg.tracking.experiment, "lost")
    assert len(runs) == 1 and runs[0].info.run_id == lost.run_id
    run = tracking.run_data(lost.mlflow_uri, lost.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["restores"] == "1" and int(run.data.tags["resumed_from_epoch"]) >= 2

    # and it ends where the uninterrupted run ends: same steps, losses, evaluation and weights
    def curve(res):
        return dict(tracking.metric_history(res.mlflow_uri, res.run_id, "train/loss"))

    a, b = curve(clean), curve(lost)
    assert sorted(a) == sorted(b) and len(a) == 15
    assert [b[s] for s in sorted(b)] == pytest.approx([a[s] for s in sorted(a)], abs=2e-5)
    assert lost.after and lost.after == pytest.approx(clean.after, abs=1e-4)
    wa, wb = load_file(clean.model_dir / "model.safetensors"), load_file(lost.model_dir / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


# ------------------------------------------------------------------------------------- killed driver, resumed
@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_complete_checkpoint_not_a_half_written_one(tmp_path, tiny_model_dir):
    work = tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = _overrides(tiny_model_dir, work, "optim.epochs=4", "eval.enabled=false", "tracking.run_name=dk")
    run_dir = work / "ray_results" / "dk"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([FLAT_RAY, "train", *args], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        _wait_for_checkpoints(run_dir, 2, lambda: first.poll() is None)
    finally:
        kill_tree(first)  # nothing of the killed run registers a checkpoint after this
    registered = _registered(run_dir)
    last = run_dir / registered[-1]
    last_epoch = verify(last, 2)["epoch"]
    # a newer checkpoint folder whose copy was cut short by the crash: Ray Train never registered it, and
    # flat_ray's manifest check would refuse it anyway
    half = run_dir / "checkpoint_2099-01-01_00-00-00.000000"
    shutil.copytree(last, half)
    biggest = max((p for p in half.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as fh:
        fh.truncate(biggest.stat().st_size // 2)
    with pytest.raises(IncompleteCheckpoint, match="is incomplete"):
        verify(half, 2)

    res = subprocess.run([FLAT_RAY, "train", "--resume", "dk", f"paths.workdir={work}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((run_dir / STATE_FILE).read_text())
    run = tracking.run_data(state["mlflow_uri"], state["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert int(run.data.tags["resumed_from_epoch"]) == last_epoch + 1  # the last registered one, not the newer one
    steps = {s for s, _ in tracking.metric_history(state["mlflow_uri"], state["run_id"], "train/loss")}
    assert steps == set(range(1, 13))  # 4 epochs x 3 steps, none missing
    assert len(_runs_named(state["mlflow_uri"], "flat-ray", "dk")) == 1
    assert (Path(state["output_dir"]) / "model" / "model.safetensors").is_file()
