"""The MLflow record of a run and of a sweep: their names, params, descriptions, datasets and state files.

One rule holds for both: the state file that lets a resume find a run (``<storage>/<run>/flat_ray_run.json``) or a
sweep (``<workdir>/sweeps/<name>/sweep.json``) is written as soon as its MLflow run exists, before anything else is
logged; a resume logs the inputs again, which is a no-op for what is there. A driver killed at any point is then
resumed into the same MLflow run, never into a second one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flat_ray import sweep_state, tracking
from flat_ray.assets import workdir
from flat_ray.config import RunConfig, load_config
from flat_ray.data import load_split
from flat_ray.envinfo import package_versions
from flat_ray.errors import FlatRayError
from flat_ray.export import RUN_STATE, known_runs
from flat_ray.fileio import atomic_write_text
from flat_ray.losses import METHODS
from flat_ray.placement import host_bytes_per_worker
from flat_ray.report import write_report
from flat_ray.storage import Place
from flat_ray.sweep import Space, space_summary

# ------------------------------------------------------------------------------------------------- a run
STATE_FILE = RUN_STATE  # next to Ray's own files: which MLflow run, output dir and model a Ray run belongs to


def storage_root(cfg: RunConfig) -> Place:
    """Where the run's Ray state goes: ``launch.storage_path`` (a folder, a shared mount or cloud storage), else
    ``<workdir>/ray_results``."""
    return Place.of(cfg.launch.storage_path or workdir(cfg) / "ray_results")


def divergence_of(cfg: RunConfig) -> str | None:
    """The run's f-divergence when its method has one (FLAT), else None."""
    return cfg.method.divergence if "divergence" in METHODS[cfg.method.name].knobs else None


def run_name(cfg: RunConfig) -> str:
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    knob = f"-{divergence_of(cfg)}" if divergence_of(cfg) else ""
    return f"{cfg.method.name}{knob}-lr{cfg.optim.lr:g}-{stamp}"


def run_params(cfg: RunConfig, model_path: str) -> dict[str, Any]:
    """Every config field and what it resolved to here; DeepSpeed's version and the precision are logged by
    rank 0, where the run really happens."""
    params: dict[str, Any] = dict(cfg.flat())
    params.update({
        "resolved.model_path": model_path,
        "resolved.world_size": cfg.launch.num_workers,
        "resolved.deepspeed_stage": cfg.deepspeed.stage,
        "resolved.seed": cfg.optim.seed,
        "resolved.git_sha": tracking.git_sha() or "unknown",
        "resolved.effective_batch": cfg.optim.micro_batch_size * cfg.optim.grad_accum_steps * cfg.launch.num_workers,
        # what each worker asked Ray for beyond the config's CPUs and GPUs
        "resolved.host_memory_per_worker_gib": round(host_bytes_per_worker(cfg, model_path) / 2**30, 2),
        "resolved.placement_strategy": cfg.launch.strategy(),
    })
    params.update({f"version.{k}": v for k, v in package_versions().items()})
    return params


def history_at(uri: str, run_id: str, keys: list[str], first: bool) -> dict[str, float]:
    out = {}
    for key in keys:
        hist = tracking.metric_history(uri, run_id, key)
        if hist:
            out[key] = hist[0][1] if first else hist[-1][1]
    return out


def describe(cfg: RunConfig, result: str = "") -> str:
    """One paragraph saying what a run is (MLflow's run description, ``mlflow.note.content``)."""
    detail = f" with the {divergence_of(cfg)} divergence" if divergence_of(cfg) else ""
    if cfg.model.lora_rank:
        detail += f", LoRA rank {cfg.model.lora_rank} on {cfg.model.lora_target_modules}"
    text = (f"{cfg.method.name}{detail} on {cfg.data.benchmark}/{cfg.data.split}, model {cfg.model.name_or_path}: "
            f"lr {cfg.optim.lr:g}, {cfg.optim.epochs} epochs, micro-batch {cfg.optim.micro_batch_size} x "
            f"{cfg.optim.grad_accum_steps} accumulation x {cfg.launch.num_workers} workers, DeepSpeed ZeRO-"
            f"{cfg.deepspeed.stage}, seed {cfg.optim.seed}.")
    return text + (f" Result: {result}." if result else "")


def result_sentence(before: dict[str, float], after: dict[str, float]) -> str:
    keys = [k for k in ("forget_prob", "retain_prob", "model_utility", "forget_quality") if f"eval/{k}" in after]
    return ", ".join(f"{k} {before[f'eval/{k}']:.4g} -> {after[f'eval/{k}']:.4g}" if f"eval/{k}" in before
                     else f"{k} {after[f'eval/{k}']:.4g}" for k in keys)


def run_uri(cfg: RunConfig) -> str:
    """The MLflow tracking URI a run records to: ``tracking.mlflow_uri``, else the work folder's SQLite file."""
    return cfg.tracking.mlflow_uri or tracking.default_uri(workdir(cfg))


def prepare_run(cfg: RunConfig, resume: str | None) -> tuple[RunConfig, str, Place, str, dict[str, str]]:
    """The config to run (a resumed run's own), its MLflow URI, storage, name and saved state."""
    uri = run_uri(cfg)
    storage = storage_root(cfg)
    name = resume or run_name(cfg)
    state_path = storage / name / STATE_FILE
    if resume and not state_path.is_file():
        raise FlatRayError(f"no run named {resume!r} under {storage}; runs there: "
                           f"{', '.join(known_runs(storage)) or 'none'}")
    if not resume and (storage / name).exists():
        raise FlatRayError(f"a run named {name!r} already exists under {storage}; pass --resume {name} to continue it "
                           "or choose another tracking.run_name")
    state: dict[str, str] = {}
    if resume:
        state = json.loads(state_path.read_text())
        # a resumed run continues with the config it started with, whatever the command line says now
        cfg = load_config(Path(state["output_dir"]) / "config.yaml")
        uri = state["mlflow_uri"]
        if tracking.run_data(uri, state["run_id"]).info.status == "FINISHED":  # its checkpoints may be gone
            raise FlatRayError(f"run {resume!r} has already finished (MLflow run {state['run_id']}); its model is "
                               f"in {Path(state['output_dir']) / 'model'}")
    return cfg, uri, storage, name, state


def open_run(cfg: RunConfig, uri: str, storage: Place, name: str, state: dict[str, str], model_path: str,
              tags: dict[str, str] | None) -> tuple[tracking.Tracker, Path]:
    """Reopen a resumed run's MLflow run, or start a new one with its params, tags, dataset and config. The state
    file that lets a resume find the run is written as soon as the run exists, before anything else is logged: a
    driver killed from then on is resumed into the same run, never into a second one."""
    if state:
        tracker = tracking.reopen_run(uri, state["run_id"])
        tracker.set_tags({"resumed": "true"})
        output_dir = Path(state["output_dir"])
        # the driver may have died anywhere in logging them (params but no dataset yet): logging them again is a
        # no-op for what is there (same params, a dataset input MLflow dedups by digest, the same config file)
        log_inputs(tracker, cfg, model_path, output_dir)
        return tracker, output_dir
    output_dir = Path(cfg.paths.output_dir).expanduser().resolve() if cfg.paths.output_dir else workdir(cfg) / "runs" / name
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "config.yaml", cfg.to_yaml())  # what a resume reads back
    tags = {"model": cfg.model.name_or_path, "benchmark": f"{cfg.data.benchmark}/{cfg.data.split}",
            "method": cfg.method.name,
            "divergence": divergence_of(cfg) or "-",
            "flat_ray.ray_run": name, "mlflow.note.content": describe(cfg),
            **tracking.standard_tags("flat-ray " + ("finetune" if cfg.method.name == "sft" else "train")),
            **(tags or {})}
    tracker = tracking.start_run(uri, cfg.tracking.experiment, name, workdir(cfg) / "mlartifacts", tags)
    (storage / name).mkdir()
    (storage / name / STATE_FILE).write_text(json.dumps({"run_id": tracker.run_id, "mlflow_uri": uri,
                                                         "output_dir": str(output_dir), "model_path": model_path}))
    log_inputs(tracker, cfg, model_path, output_dir)
    return tracker, output_dir


def log_inputs(tracker: tracking.Tracker, cfg: RunConfig, model_path: str, output_dir: Path) -> None:
    """The run's params, its training split as a dataset and its config file."""
    tracker.log_params(run_params(cfg, model_path))
    log_split(tracker, cfg)
    tracker.log_artifact(output_dir / "config.yaml")


def log_split(tracker: tracking.Tracker, cfg: RunConfig) -> None:
    """The run's training split as an MLflow dataset input."""
    rows = load_split(cfg.data.benchmark, cfg.data.split, cfg.data.data_dir)
    tracker.log_dataset(f"{cfg.data.benchmark}/{cfg.data.split}", rows,
                        {"benchmark": cfg.data.benchmark, "split": cfg.data.split, "data_dir": cfg.data.data_dir or "-"})



# ----------------------------------------------------------------------------------------------- a sweep
def describe_sweep(space: Space, name: str, result: str = "") -> str:
    """The sweep's one-paragraph description (the parent run's ``mlflow.note.content``)."""
    text = (f"Sweep {name} of search space {space.name}: {space.total_trials()} trials in {len(space.cells)} "
            f"cell(s) ({', '.join(c.name for c in space.cells)}); search {space.algorithm}, scheduler "
            f"{space.scheduler}, objective {', '.join(f'{m} ({o})' for m, o in zip(space.objective, space.modes, strict=True))}."
            f" {space.description}")
    return text + (f" Best: {result}." if result else "")


def open_parent(space: Space, name: str, sweep_dir: Path, storage: Place, uri: str, table: str,
                 address: str | None, storage_path: str | None, state: dict[str, Any]) -> tracking.Tracker:
    """Reopen a resumed sweep's parent run, or start it with the space, the trial table and the sweep state. The
    sweep state, which a resume finds the sweep by, is written as soon as the parent run exists: a driver killed
    from then on is resumed into that parent run (its inputs completed), never leaves it behind for a second one."""
    if state:
        parent = tracking.reopen_run(uri, state["parent_run_id"])
        parent.set_tags({"resumed": "true"})
    else:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "space.yaml").write_text(space.text)
        (sweep_dir / "trials.txt").write_text(table + "\n")
        parent = tracking.start_run(uri, name, name, workdir(space.cells[0].config) / "mlartifacts",
                                    {"flat_ray.role": "sweep", "flat_ray.sweep": name, "flat_ray.space": space.name,
                                     "mlflow.note.content": describe_sweep(space, name),
                                     **tracking.standard_tags("flat-ray tune")})
        sweep_state.write(sweep_dir, {
            "name": name, "space": space.name, "space_path": space.path, "overrides": space.overrides,
            "parent_run_id": parent.run_id, "mlflow_uri": uri, "storage": str(storage),
            "storage_path": str(storage.parent) if storage_path else None, "address": address,
            "objective": space.objective, "modes": space.modes, "report": space.report,
            "cells": [c.name for c in space.cells]})
    log_parent_inputs(parent, space, sweep_dir)
    return parent


def log_parent_inputs(parent: tracking.Tracker, space: Space, sweep_dir: Path) -> None:
    """The sweep's params, its cells' training splits as datasets, the space and the trial table. Logging them
    again on a resume is a no-op for what is there (params are logged once, MLflow dedups a dataset input by its
    digest, the files are the same)."""
    params = {**space_summary(space), "resolved.git_sha": tracking.git_sha() or "unknown",
              **{f"version.{k}": v for k, v in package_versions().items()}}
    parent.log_params(params)
    for cfg in {(c.config.data.benchmark, c.config.data.split): c.config for c in space.cells}.values():
        log_split(parent, cfg)
    parent.log_artifact(sweep_dir / "space.yaml")
    parent.log_artifact(sweep_dir / "trials.txt")


def close_parent(parent: tracking.Tracker, space: Space, sweep_dir: Path, started: float, errored: int):
    """The report (files and figures on the parent), each benchmark's best result as parent metrics, the
    description with the result, and the parent's end status."""
    report = write_report(sweep_dir)
    for path in report.files:
        parent.log_artifact(path, "report")
    best = report.best_metrics()
    parent.log_metrics({"sweep_s": time.monotonic() - started, "trials_errored": errored, **best}, step=0)
    summary = "; ".join(f"{k} {v:.4g} (epoch {best.get(k.rsplit('/', 1)[0] + '/epoch', 0):.0f})"
                        for k, v in best.items() if k.endswith("/" + space.objective[0]))
    parent.set_tags({"mlflow.note.content": describe_sweep(space, sweep_dir.name, summary)})
    parent.finish("FINISHED" if errored == 0 else "FAILED")
    return report


def close_stopped_trials(uri: str, parent_run_id: str, states: dict[str, str]) -> None:
    """A trial the scheduler stopped early is TERMINATED for Tune, but its ``run_training`` never finished (it
    was cut off: its MLflow run is KILLED by its own process, or still RUNNING where that process was killed
    first): mark it KILLED with ``stopped_early=true``."""
    for run in tracking.child_runs(uri, parent_run_id):
        tags = run.data.tags
        stopped = states.get(tags.get("flat_ray.trial", "")) == "TERMINATED" and tags.get("diverged") != "true"
        if stopped and run.info.status in ("RUNNING", "FAILED", "KILLED"):
            tracking.set_status(uri, run.info.run_id, "KILLED", {"stopped_early": "true"})


def close_cut_off_trials(uri: str, parent_run_id: str) -> None:
    """An interrupted sweep's trials have all stopped, but one stopped while starting up never closed its MLflow run:
    mark every run still RUNNING as KILLED (a resume reopens it)."""
    for run in tracking.child_runs(uri, parent_run_id):
        if run.info.status == "RUNNING":
            tracking.set_status(uri, run.info.run_id, "KILLED", {})
