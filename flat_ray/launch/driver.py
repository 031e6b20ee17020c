"""The driver of one run: checks, the local or remote Ray, the MLflow run, the TorchTrainer, the summary.

``flat-ray train`` and ``flat-ray finetune`` both come here; they differ only in the method (``sft`` for
fine-tuning). Everything a user can get wrong is checked before Ray starts or an MLflow run is created.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flat_ray import tracking
from flat_ray.assets import FineTune, resolve_model_path, workdir
from flat_ray.config import RunConfig
from flat_ray.console import RunConsole
from flat_ray.errors import Diverged, FlatRayError, RunFailed
from flat_ray.eval.run import auto_reference
from flat_ray.eval.tofu import reference_values
from flat_ray.export import (
    choose,
    drop_checkpoints,
    kept_checkpoints,
    record_model,
    write_model,
)
from flat_ray.fileio import check_writable
from flat_ray.launch.cluster import connect_ray, release_orphaned_placement_groups, start_ray
from flat_ray.launch.records import (
    describe,
    history_at,
    open_run,
    prepare_run,
    result_sentence,
    storage_root,
)
from flat_ray.metrics import METRICS
from flat_ray.models import fetch_weights
from flat_ray.placement import ACCELERATOR_PREFIX, worker_bundle
from flat_ray.preflight import absolute_inputs, check_inputs, check_loadable, check_model
from flat_ray.storage import Place

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_name: str
    run_id: str
    mlflow_uri: str
    model_dir: Path
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------- preflight
def preflight(cfg: RunConfig, uri: str | None) -> None:
    """Everything that can be checked without starting Ray or writing anything; with ``uri``, also that its MLflow
    server answers at once (None: a sweep's trial, whose sweep checked that; a trial that starts while the server is
    away for a moment waits for it through MLflow's own retries instead of failing)."""
    check_loadable(cfg)
    if uri:
        tracking.check_reachable(uri)
    storage = storage_root(cfg)
    if storage.local:
        check_writable(storage.local, "the storage path (launch.storage_path)")
    else:
        check_bucket(storage)
    check_writable(Path(cfg.paths.output_dir) if cfg.paths.output_dir else workdir(cfg), "the output folder")
    if cfg.launch.address is None:
        cpus = os.cpu_count() or 1
        want = cfg.launch.num_workers * cfg.launch.cpus_per_worker
        if want > cpus:
            raise FlatRayError(f"launch.num_workers={cfg.launch.num_workers} x launch.cpus_per_worker="
                               f"{cfg.launch.cpus_per_worker:g} needs {want:g} CPUs but this machine has {cpus}; "
                               "lower them or pass --address of a cluster")
        if cfg.launch.gpus_per_worker > 0:
            import torch

            gpus = torch.cuda.device_count()
            if cfg.launch.num_workers * cfg.launch.gpus_per_worker > gpus:
                raise FlatRayError(f"{cfg.launch.num_workers} workers x {cfg.launch.gpus_per_worker:g} GPUs requested "
                                   f"but this machine has {gpus} GPU(s); lower launch.gpus_per_worker or num_workers")


def check_bucket(storage: Place) -> None:
    """Cloud storage: its bucket exists and answers with these credentials (an object store has no folders to
    create; Ray would fail on the first checkpoint, after a GPU node had been paid for)."""
    bucket = Place("/".join(storage.uri.split("/", 3)[:3]))
    try:
        found = bucket.is_dir()
    except OSError as exc:  # no credentials, an endpoint that does not answer
        raise FlatRayError(f"storage {storage} cannot be reached ({str(exc).splitlines()[0][:200]}); check the "
                           "credentials and AWS_ENDPOINT_URL") from None
    if not found:
        raise FlatRayError(f"storage {storage}: bucket {bucket} does not exist (or these credentials cannot see "
                           "it); create it or fix launch.storage_path / --storage-path")


# ----------------------------------------------------------------------------------------------- demo models
def finetuner(console: bool = False) -> FineTune:
    """How the launch layer fine-tunes (the demo's original model): a Ray Train run of the config."""
    return lambda cfg: run_training(cfg, console=console).model_dir


# --------------------------------------------------------------------------------------------------- running
def _worker_error(exc: BaseException) -> str:
    """The line that says what went wrong in a worker: flat_ray's own message if it raised one, else the last
    ``SomethingError: message`` line of the worker's traceback (Ray's headers name no cause)."""
    text = str(exc)
    ours = re.search(r"flat_ray\.errors\.\w+: (.+)", text)
    if ours:
        return ours.group(1).strip()[:400]
    causes = re.findall(r"^\s*([\w.]*(?:Error|Exception|Interrupt)\b:? .+)$", text, flags=re.M)
    return (causes[-1] if causes else type(exc).__name__).strip()[:300]


def _fit(cfg: RunConfig, name: str, storage: Place, payload: dict[str, Any], callbacks: list | None,
         console: RunConsole | None) -> Exception | None:
    """Ray Train's TorchTrainer over the workers; returns what ``fit`` raised, if anything."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flat_ray.launch.relay import Relay
    from flat_ray.launch.worker import train_fn_per_worker

    gpus = cfg.launch.gpus_per_worker
    # CPUs, GPUs and host memory (the memory plan's, so Ray never puts more ranks on a node than its RAM holds);
    # Ray Train adds the accelerator type's resource itself
    resources = {k: v for k, v in worker_bundle(cfg, payload["model_path"]).items()
                 if not k.startswith(ACCELERATOR_PREFIX)}

    def fit(console_handle: Any) -> None:
        TorchTrainer(
            train_fn_per_worker,
            train_loop_config={**payload, "console": console_handle},
            scaling_config=ScalingConfig(num_workers=cfg.launch.num_workers, use_gpu=gpus > 0,
                                         resources_per_worker=resources,
                                         placement_strategy=cfg.launch.strategy(),
                                         accelerator_type=cfg.launch.accelerator_type),
            run_config=ray.train.RunConfig(name=name, storage_path=str(storage),
                                           checkpoint_config=_checkpoint_config(cfg, CheckpointConfig),
                                           failure_config=FailureConfig(max_failures=cfg.launch.max_failures),
                                           callbacks=callbacks),
        ).fit()

    try:
        if console is None:
            fit(None)
        else:
            with Relay(console) as handle:
                fit(handle)
    except Exception as exc:  # noqa: BLE001 - reported by the caller, after the divergence check
        return exc
    return None


def _checkpoint_config(cfg: RunConfig, CheckpointConfig: type) -> Any:  # noqa: N803 - Ray's class, imported late
    """Ray Train keeps the latest checkpoint and, with ``launch.checkpoint_metric``, the best ones by the score
    the workers report with each checkpoint (``checkpoint_score``: that metric, NaN where the epoch was not
    evaluated, which Ray ranks last)."""
    keep = max(1, cfg.launch.keep_checkpoints)
    metric = cfg.launch.checkpoint_metric
    if metric is None:
        return CheckpointConfig(num_to_keep=keep)
    return CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute="checkpoint_score",
                            checkpoint_score_order=METRICS[metric].mode)


def run_training(cfg: RunConfig, *, resume: str | None = None, resume_from: str | None = None,
                 tags: dict[str, str] | None = None, callbacks: list | None = None,
                 console: bool = False, stopping: Callable[[], bool] | None = None,
                 placed_by_sweep: bool = False, original_cache: str | None = None) -> TrainResult:
    """Run one job to the end and return its summary. ``resume`` continues the Ray run of that name from its
    latest checkpoint (same MLflow run); ``resume_from`` starts a new run from a checkpoint directory. A sweep
    trial passes extra MLflow ``tags`` (its parent run), Ray Train ``callbacks`` (reporting to Tune) and
    ``stopping`` (true once the sweep has stopped it: a run cut off then is KILLED, not FAILED);
    ``console`` shows rank 0's progress on this process's terminal. A sweep's trial (``placed_by_sweep``) skips
    what its sweep did once for all trials: the cluster check, probing the MLflow server and fetching the weights;
    its epoch-0 evaluation comes from (or goes to) its cell's ``original_cache`` (flat_ray.eval.original)."""
    started = time.monotonic()
    cfg, uri, storage, name, state = prepare_run(cfg, resume)
    if not placed_by_sweep:  # a sweep checked the files of each cell once, where it started
        check_inputs(cfg)
        check_model(cfg)
    preflight(cfg, None if placed_by_sweep else uri)
    if placed_by_sweep:
        connect_ray(cfg.launch.address)
    else:  # before the demo's original is built or weights are fetched
        start_ray(cfg, name)
        fetch_weights(cfg)
    # what an earlier run of this Ray job left behind (a controller that died while starting its worker group: a
    # stopped trial, a worker-group start that timed out) would keep this run's workers waiting forever
    release_orphaned_placement_groups()
    model_path = resolve_model_path(cfg, finetuner(console))
    cfg = absolute_inputs(auto_reference(cfg, finetuner(console)))  # as the workers, in their own folders, see them
    tracker, output_dir = open_run(cfg, uri, storage, name, state, model_path, tags)
    payload = {"run": cfg.to_dict(), "model_path": model_path, "output_dir": str(output_dir),
               # the forget-quality reference's values, read here: workers on other nodes need no copy of its file
               "reference": reference_values(cfg.eval.reference) if cfg.eval.enabled and cfg.eval.reference else None,
               "storage_dir": str(storage / name),
               "mlflow": {"uri": uri, "run_id": tracker.run_id},
               # Ray Train V2 dropped resume_from_checkpoint: a starting checkpoint travels in the config
               "restore_from": str(Path(resume_from).resolve()) if resume_from else None,
               "original_cache": original_cache}
    log.info("run %s: %d workers, ZeRO-%d, MLflow run %s", name, cfg.launch.num_workers, cfg.deepspeed.stage, tracker.run_id)
    fit_started = time.monotonic()
    failure = _fit(cfg, name, storage, payload, callbacks, RunConsole(name) if console else None)
    fit_done = time.monotonic()
    run_tags = tracker.tags()
    if run_tags.get("diverged") == "true":  # the workers stop cleanly on divergence; nothing was exported
        tracker.finish("FAILED")
        raise Diverged(f"run {name} diverged: {run_tags.get('diverged_reason')} (MLflow run {tracker.run_id})") from None
    if failure is not None and stopping is not None and stopping():  # a scheduler's stop or the sweep's Ctrl-C
        tracker.finish("KILLED")
        raise RunFailed(f"run {name} was stopped by the sweep") from failure
    if failure is not None:
        tracker.finish("FAILED")
        raise RunFailed(f"run {name} failed: {_worker_error(failure)} (MLflow run {tracker.run_id}; the workers' "
                        "logs are in Ray's session folder, or rerun with flat-ray --verbose)") from failure
    if cfg.launch.export == "best":
        _export_best(cfg, storage / name, model_path, output_dir)
    result = _summarize(cfg, tracker, name, uri, output_dir, started)
    # a run that exported no model keeps its best (or last) checkpoint for `flat-ray export` (a sweep's trials)
    keep = cfg.launch.keep_checkpoints if cfg.launch.export != "none" else max(1, cfg.launch.keep_checkpoints)
    tracker.log_metrics({"checkpoints_kept_mb": drop_checkpoints(storage / name, keep, cfg.launch.checkpoint_metric)},
                        step=0)
    # where a run's time goes: set-up before Ray Train (checks, model path, MLflow), the Ray Train run (worker
    # start + the workers' own worker_s), and the summary after it
    tracker.log_metrics({"duration_s": result.seconds, "setup_s": fit_started - started,
                         "fit_s": fit_done - fit_started, "finish_s": time.monotonic() - fit_done}, step=0)
    tracker.finish("FINISHED")
    return result


def _export_best(cfg: RunConfig, run_dir: Place, model_path: str, output_dir: Path) -> None:
    """``launch.export=best``: the best kept checkpoint becomes ``<output_dir>/model``, consolidated here."""
    best = choose(kept_checkpoints(run_dir), "best", cfg.launch.checkpoint_metric)
    write_model(best, cfg, model_path, output_dir / "model")
    log.info("exported epoch %d (best %s) to %s", best.epoch, cfg.launch.checkpoint_metric, output_dir / "model")


def _summarize(cfg: RunConfig, tracker: tracking.Tracker, name: str, uri: str, output_dir: Path,
               started: float) -> TrainResult:
    """Artifacts, the before/after metrics, the training-curve figure and the run's description."""
    model_dir = output_dir / "model"
    if (output_dir / "templates").is_dir():
        tracker.log_artifact(output_dir / "templates", "templates")
    if cfg.launch.export != "none":
        record_model(tracker, cfg, model_dir)
    keys = [f"eval/{m}" for m in METRICS]
    result = TrainResult(name, tracker.run_id, uri, model_dir,
                         before=history_at(uri, tracker.run_id, keys, first=True),
                         after=history_at(uri, tracker.run_id, keys, first=False),
                         seconds=time.monotonic() - started)
    from flat_ray.report import run_curves

    try:
        figure = run_curves(uri, tracker.run_id, name)
        if figure is not None:
            tracker.log_figure(figure, "plots/training_curves.png")
    except Exception as exc:  # noqa: BLE001 - a figure never fails a finished run
        log.warning("run %s: could not log its training curves (%s)", name, str(exc).splitlines()[0][:200])
    tracker.set_tags({"mlflow.note.content": describe(cfg, result_sentence(result.before, result.after))})
    return result
