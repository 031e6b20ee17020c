"""Models from a run's checkpoints: ``flat-ray export``, ``launch.export=best`` and a sweep's best trial.

A run's storage folder (``<storage>/<run>``) holds Ray Train's checkpoint folders, each with every rank's DeepSpeed
shards, the ranks' manifests (:mod:`flat_ray.engine.checkpoint`) and rank 0's ``flat_ray_epoch.json``: the epoch,
the step, the metrics reported with it and the dtype the weights were trained in. Exporting one of them joins the
shards into the whole fp32 model on this process's CPU (any ZeRO stage and world size, no process group), casts it
to the training dtype and writes a Hugging Face directory (safetensors, config, tokenizer), the same layout as the
export the workers write at the end of a run.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flat_ray import lora, tracking
from flat_ray.config import RunConfig, load_config
from flat_ray.engine.checkpoint import ANY_MANIFEST, EPOCH_FILE, verify_listing
from flat_ray.errors import FlatRayError, IncompleteCheckpoint
from flat_ray.metrics import rank_value
from flat_ray.storage import Place

RUN_STATE = "flat_ray_run.json"  # in <storage>/<run>: which MLflow run, output folder and model a Ray run belongs to


@dataclass(frozen=True)
class Kept:
    """One complete checkpoint of a run."""

    epoch: int  # counted from 1, as the run reports epochs
    path: Place
    metrics: dict[str, Any]
    dtype: str


@dataclass(frozen=True)
class Exported:
    epoch: int
    model_dir: Path
    run_id: str
    uploaded: bool


def kept_checkpoints(run_dir: Place) -> list[Kept]:
    """The run's complete checkpoints, oldest epoch first (one cut short by a crash is left out)."""
    kept = []
    for path in run_dir.dirs("checkpoint_"):
        files = path.files()
        manifests = sorted(rel for rel in files if Path(rel).match(ANY_MANIFEST))
        if EPOCH_FILE not in files or not manifests:
            continue
        try:
            world = json.loads((path / manifests[0]).read_text())["world_size"]
            verify_listing(str(path), files, lambda rel, at=path: (at / rel).read_text(), world)
            info = json.loads((path / EPOCH_FILE).read_text())
        except (OSError, ValueError, KeyError, IncompleteCheckpoint):
            continue
        kept.append(Kept(info["epoch"] + 1, path, info["metrics"], info["dtype"]))
    return sorted(kept, key=lambda k: k.epoch)


def score_key(kept: Kept, metric: str) -> float:
    """A kept checkpoint's ``metric`` turned so that larger is better (its registry direction); -inf without it.
    Choosing the best epoch, the best trial of a sweep and the checkpoints to keep all rank by this."""
    return rank_value(metric, kept.metrics.get(metric))


def choose(kept: list[Kept], epoch: str, metric: str | None) -> Kept:
    """``last``, ``best`` (by ``metric``, in its registry direction; a tie goes to the later epoch) or an epoch
    number, among the kept checkpoints."""
    have = ", ".join(str(k.epoch) for k in kept) or "none"
    if not kept:
        raise FlatRayError("the run kept no complete checkpoint (launch.keep_checkpoints=0 deletes them once a run "
                           "has exported its model); set launch.keep_checkpoints or launch.export=none")
    if epoch == "last":
        return kept[-1]
    if epoch == "best":
        if metric is None:
            raise FlatRayError("--epoch best needs the run's launch.checkpoint_metric, and this run has none; give "
                               f"an epoch number (kept: {have}) or last")
        scored = [k for k in kept if score_key(k, metric) > -math.inf]
        if not scored:
            raise FlatRayError(f"no kept checkpoint has {metric} (kept epochs: {have}); give an epoch number or last")
        return max(scored, key=lambda k: (score_key(k, metric), k.epoch))
    if not epoch.isdigit() or int(epoch) not in {k.epoch for k in kept}:
        raise FlatRayError(f"--epoch {epoch}: choose best, last or a kept epoch ({have})")
    return next(k for k in kept if k.epoch == int(epoch))


def write_model(kept: Kept, cfg: RunConfig, model_path: str, out_dir: Path, adapter_only: bool = False) -> Path:
    """The checkpoint's whole model as a Hugging Face directory at ``out_dir``, moved into place once written. A
    LoRA run's checkpoint holds its adapter: the model is the base model (``model_path``) with the adapter merged,
    and the adapter alone goes to its ``adapter`` folder, or is all that is written with ``adapter_only``."""
    import torch

    from flat_ray.engine import ds
    from flat_ray.models import load_model_and_tokenizer

    if adapter_only and not lora.enabled(cfg):
        raise FlatRayError("--adapter exports a LoRA run's adapter, and this run trained every weight "
                           "(model.lora_rank=0); export the whole model without --adapter")
    load = {"trust_remote_code": cfg.model.trust_remote_code, "revision": cfg.model.revision}
    _, tokenizer = load_model_and_tokenizer(model_path, load_model=False, tokenizer=cfg.model.tokenizer, **load)
    dtype = getattr(torch, kept.dtype)
    with tempfile.TemporaryDirectory(prefix="flat-ray-export-") as tmp_dir:  # a cloud checkpoint is fetched first
        local = kept.path.download(Path(tmp_dir) / "checkpoint")
        state = ds.consolidated_state_dict(local / "ds")
    tmp = out_dir.with_name(f".{out_dir.name}-partial")
    shutil.rmtree(tmp, ignore_errors=True)
    adapter = {k: v for k, v in state.items() if lora.is_adapter_key(k)} if lora.enabled(cfg) else None
    if adapter is not None:
        saved = {k: v.to(dtype) for k, v in adapter.items()}
        lora.save_adapter(tmp if adapter_only else tmp / "adapter", saved, lora.adapter_config(cfg, saved, model_path))
    if not adapter_only:
        model = _model_with(state, adapter, cfg, model_path, dtype, kept.path)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _model_with(state: dict[str, Any], adapter: dict[str, Any] | None, cfg: RunConfig, model_path: str, dtype: Any,
                source: Place) -> Any:
    """The model with a checkpoint's weights: all of them, or with a LoRA ``adapter`` (its fp32 tensors) the base
    model's with the adapter merged."""
    from transformers import AutoConfig, AutoModelForCausalLM

    load = {"trust_remote_code": cfg.model.trust_remote_code, "revision": cfg.model.revision}
    if adapter is not None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **load)
        state = lora.merge(model.state_dict(), adapter, lora.scaling(cfg))
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path, **load), dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise FlatRayError(f"checkpoint {source} does not fit model {model_path}: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    return model


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def record_model(tracker: tracking.NullTracker, cfg: RunConfig, model_dir: Path, epoch: int | None = None) -> bool:
    """Tag where the run's latest export is (``model_dir``, and ``model_epoch`` for one from a checkpoint; an
    adapter alone: ``adapter_dir`` and ``adapter_epoch``) and upload it as an artifact named like its folder when it
    is at most ``tracking.log_model_max_mb``; returns whether it was uploaded."""
    kind = "adapter" if (model_dir / lora.ADAPTER_CONFIG).is_file() else "model"
    tracker.set_tags({f"{kind}_dir": str(model_dir), **({f"{kind}_epoch": epoch} if epoch is not None else {})})
    if folder_mb(model_dir) > cfg.tracking.log_model_max_mb:
        return False
    tracker.log_artifact(model_dir, model_dir.name)
    return True


def known_runs(storage: Place) -> list[str]:
    """The names of the runs in a storage folder."""
    return [d.name for d in storage.dirs() if (d / RUN_STATE).is_file()]


def run_state(run_dir: Place) -> dict[str, str]:
    path = run_dir / RUN_STATE
    if not path.is_file():
        raise FlatRayError(f"no run named {run_dir.name!r} under {run_dir.parent}; runs there: "
                           f"{', '.join(known_runs(run_dir.parent)[:20]) or 'none'}")
    return json.loads(path.read_text())


def export_run(run_dir: Place, epoch: str = "best", out_dir: Path | None = None, adapter_only: bool = False
               ) -> Exported:
    """Export the chosen epoch of the run in ``run_dir`` (its storage folder) and record it on its MLflow run.
    ``out_dir`` defaults to ``<output_dir>/model-epoch<N>`` (``adapter-epoch<N>`` with ``adapter_only``)."""
    state = run_state(run_dir)
    output_dir = Path(state["output_dir"])
    cfg = load_config(output_dir / "config.yaml")
    kept = choose(kept_checkpoints(run_dir), epoch, cfg.launch.checkpoint_metric)
    default = f"{'adapter' if adapter_only else 'model'}-epoch{kept.epoch}"
    out = Path(out_dir).expanduser().resolve() if out_dir else output_dir / default
    out.parent.mkdir(parents=True, exist_ok=True)
    model_path = state.get("model_path") or tracking.run_data(state["mlflow_uri"], state["run_id"]).data.params[
        "resolved.model_path"]
    write_model(kept, cfg, model_path, out, adapter_only)
    uploaded = record_model(tracking.Tracker(state["mlflow_uri"], state["run_id"]), cfg, out, kept.epoch)
    return Exported(kept.epoch, out, state["run_id"], uploaded)


def drop_checkpoints(run_dir: Place, keep: int, metric: str | None) -> float:
    """Delete all but ``keep`` of a run's checkpoints (the best by ``metric`` when it has one, else the latest) and
    its staging folder; returns the MiB of checkpoints left."""
    (run_dir / ".staging").rmtree()  # the workers' staging folder (left over by a crash)
    complete = {k.path: k for k in kept_checkpoints(run_dir)}

    def rank(p: Place) -> tuple[bool, float, int]:  # one cut short ranks last, then by score, then by epoch
        kept = complete.get(p)
        return (kept is not None, score_key(kept, metric) if kept and metric else 0.0, kept.epoch if kept else -1)

    every = sorted(run_dir.dirs("checkpoint_"), key=rank)
    left = every[len(every) - keep:] if keep else []
    for old in every:
        if old not in left:
            old.rmtree()
    return sum(sum(c.files().values()) for c in left) / 2**20
