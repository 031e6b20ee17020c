"""The suite's shared end-to-end runs: built once per session (fixtures in conftest.py), checked by several tests.

- ``zero3``: an uninterrupted 2-worker ZeRO-3 `flat-ray train` run on the tiny model (in process, the suite's Ray).
- ``interrupted``: the same config run by the `flat-ray` console script (joined to the suite's Ray, whose processes
  hold secrets in their environment, as does the script's own), evaluated from the ZeRO-3 shards
  (``eval.gathered=false``) where ``zero3`` evaluates from a copy gathered once. A Ray Train worker is SIGKILLed
  after the first checkpoint (Ray Train restarts the workers from it), the driver and every process of its run are
  SIGKILLed after the second, a cut-short newer checkpoint is planted, and `flat-ray train --resume` finishes the
  run. Reliability tests compare it with ``zero3``; security tests scan
  everything it wrote and printed for the secrets. Its forget-quality reference (``zero3``'s epoch-0 evaluation
  logs) is a path relative to its own working directory, which is not the Ray processes' (as a cluster job's is
  not), and that folder is gone while Ray Train restarts the workers after the lost one: it is read by the driver
  only, as a file on the head's own disk would have to be.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

from flat_ray.storage import Place
from tests.procs import job_processes, kill_tree

FLAT_RAY = str(Path(sys.executable).with_name("flat-ray"))
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it has registered
SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
           "AWS_SECRET_ACCESS_KEY")
SENTINEL = f"sk-sentinel-{uuid.uuid4().hex[:12]}"  # every secret's value starts with this


def secret_env() -> dict[str, str]:
    return {secret: f"{SENTINEL}-{secret}" for secret in SECRETS}


# the shared run's knobs on top of the tiny-model base: 4 epochs of 3 steps, evaluated every 2 epochs; Ray Train
# keeps the latest checkpoint and the 2 best by forget probability (the interrupted run keeps the latest 2)
ZERO3 = ("deepspeed.stage=3", "optim.epochs=4", "eval.every_epochs=2", "eval.interim_examples=2",
         "launch.keep_checkpoints=2", "launch.checkpoint_metric=forget_prob")


def tiny_overrides(model: Path, work: Path) -> list[str]:
    """A small, fast run on the tiny model (10 forget questions; 3 micro-batches of 2 per worker and epoch)."""
    return [f"model.name_or_path={model}", "data.split=forget05", "data.max_length=64", "optim.micro_batch_size=2",
            "optim.epochs=2", "optim.lr=2e-3", "optim.warmup_ratio=0.1", "eval.max_examples=4",
            "eval.max_new_tokens=6", "eval.batch_size=4", f"paths.workdir={work}"]


def registered(run_dir: Path | Place) -> list[str]:
    """Checkpoint folders Ray Train has registered for a run (the ones a restore may use), from its own record in
    the run's storage folder (a local folder or a bucket)."""
    try:
        snap = json.loads((Place.of(str(run_dir)) / SNAPSHOT).read_text())
    except (OSError, ValueError):
        return []
    return [r["checkpoint_dir_name"] for r in snap.get("checkpoint_results", [])]


def wait_for_checkpoints(run_dir: Path | Place, n: int, alive, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(registered(run_dir)) < n:
        assert alive(), "the run ended before it was interrupted"
        assert time.monotonic() < deadline, f"no {n} registered checkpoint(s) in {run_dir}"
        time.sleep(0.05)


def verify_in(checkpoint: Place, world_size: int = 2) -> dict:
    """flat_ray's completeness check of a checkpoint folder wherever it is (a local folder or a bucket)."""
    from flat_ray.engine.checkpoint import verify_listing

    return verify_listing(str(checkpoint), checkpoint.files(), lambda rel: (checkpoint / rel).read_text(), world_size)


def train_workers() -> list[psutil.Process]:
    """Ray Train worker processes alive on the suite's Ray, oldest first."""
    found = [p for p in job_processes() if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    return sorted(found, key=lambda p: p.create_time())


@dataclass
class Interrupted:
    work: Path
    run_dir: Place  # in the suite's S3 bucket
    killed_worker: int  # pid of the Ray Train worker that was SIGKILLed
    checkpoints_at_worker_kill: int  # registered checkpoints when the worker was killed
    last_epoch: int  # the 0-based epoch of the last registered checkpoint when the driver was killed
    half_written: Place  # the planted, cut-short newer checkpoint folder
    half_written_refusal: str  # what flat_ray's check said of it before the resume
    first_log: str  # everything the killed driver printed
    resumed: subprocess.CompletedProcess


def run_interrupted(config_yaml: Path, work: Path, name: str, address: str, storage: str,
                    reference: Path) -> Interrupted:
    """The ``interrupted`` run (module docstring) on the Ray at ``address``, its Ray state in cloud storage at
    ``storage`` (``s3://…``). ``config_yaml`` is the uninterrupted run's config, ``reference`` the eval logs it
    scores forget quality against (copied beside ``work`` and named by a relative path)."""
    from pyarrow import fs

    from flat_ray.errors import IncompleteCheckpoint

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           **secret_env()}
    shutil.copytree(reference, work.parent / "retain_logs")
    # evaluated from the shards (the uninterrupted run evaluates from a gathered copy): the numbers must agree
    args = ["--address", address, str(config_yaml), f"paths.workdir={work}", f"tracking.run_name={name}", "launch.max_failures=1",
            "eval.gathered=false", "launch.checkpoint_metric=null", f"launch.storage_path={storage}",
            "eval.reference=retain_logs"]
    run_dir = Place.of(storage) / name
    log_path = work.parent / f"{name}-first.log"
    with log_path.open("w") as log:
        first = subprocess.Popen([FLAT_RAY, "train", *args], cwd=work.parent, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        alive = lambda: first.poll() is None  # noqa: E731
        wait_for_checkpoints(run_dir, 1, alive)
        at_kill = len(registered(run_dir))
        (work.parent / "retain_logs").rename(work.parent / "retain_logs.away")  # the restarted workers cannot read it
        victim = train_workers()[-1]
        victim.send_signal(signal.SIGKILL)
        wait_for_checkpoints(run_dir, at_kill + 1, alive)  # written by the restarted workers
    finally:
        kill_tree(first)  # nothing of the killed run registers a checkpoint after this
    if (work.parent / "retain_logs.away").exists():  # the resumed driver reads it again
        (work.parent / "retain_logs.away").rename(work.parent / "retain_logs")
    last = run_dir / registered(run_dir)[-1]
    last_epoch = verify_in(last)["epoch"]
    # a newer checkpoint folder whose copy was cut short by the crash: Ray Train never registered it, and
    # flat_ray's manifest check would refuse it anyway
    half = run_dir / "checkpoint_2099-01-01_00-00-00.000000"
    s3, _ = fs.FileSystem.from_uri(storage)
    bucket_path = lambda place: place.uri.removeprefix("s3://")  # noqa: E731
    fs.copy_files(bucket_path(last), bucket_path(half), source_filesystem=s3, destination_filesystem=s3)
    rel, size = max(half.files().items(), key=lambda item: item[1])
    with s3.open_input_stream(bucket_path(half / rel)) as fh:
        data = fh.read()
    with s3.open_output_stream(bucket_path(half / rel)) as fh:
        fh.write(data[:size // 2])
    try:
        verify_in(half)
        refusal = ""
    except IncompleteCheckpoint as exc:
        refusal = str(exc)
    resumed = subprocess.run([FLAT_RAY, "train", "--address", address, "--resume", name, f"paths.workdir={work}",
                              f"launch.storage_path={storage}"], cwd=work.parent, env=env,
                             capture_output=True, text=True, timeout=600)
    return Interrupted(work, run_dir, victim.pid, at_kill, last_epoch, half, refusal, log_path.read_text(), resumed)
