"""The training loop run by every worker, written out: data, engine, per-step logging, per-epoch evaluation
and checkpoints, final export. Framework glue (Ray) stays outside: the launcher passes ``report`` (called the
same number of times on every rank) and the directory to restore from.

The loop reads hyperparameters only from its payload; rank and world size arrive as ints.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from flat_ray import tracking
from flat_ray.config import config_from_dict
from flat_ray.data import Collator, load_split
from flat_ray.distributed import all_reduce
from flat_ray.engine import ds
from flat_ray.engine.checkpoint import verify, write_manifest
from flat_ray.engine.schedule import lr_multiplier, warmup_steps
from flat_ray.engine.step import method_loss
from flat_ray.errors import StorageError
from flat_ray.eval.suites import suite_for
from flat_ray.eval.tofu import read_reference
from flat_ray.losses import METHODS
from flat_ray.models import load_model_and_tokenizer
from flat_ray.pipeline import build_dataset, profile_for

log = logging.getLogger("flat_ray.train")

Report = Callable[[dict[str, Any], "str | None"], None]
Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int


def _to(batch: Any, device: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _rss_now_mb() -> float:
    """Resident set size of this process now (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return 0.0


@contextmanager
def _writing(what: str) -> Iterator[None]:
    """Turn a disk-full, permission or other OS error while writing ``what`` into one clear message."""
    try:
        yield
    except OSError as exc:
        reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno else str(exc).splitlines()[0][:200]
        raise StorageError(f"could not write {what}: {reason}; free space or fix its permissions") from exc


def _divergence(loss: float, grad_norm: float | None) -> str | None:
    """Why training cannot go on, or None. DeepSpeed reports an overflowed gradient norm as the largest float."""
    if not math.isfinite(loss):
        return f"loss became {loss}"
    if grad_norm is not None and (not math.isfinite(grad_norm) or grad_norm >= 1e300):
        return "gradient norm overflowed"
    return None


def train_worker(payload: Mapping[str, Any], ctx: WorkerContext, report: Report, restore_dir: str | None = None,
                 emit: Emit | None = None) -> None:
    """Run one training job on this rank. ``payload`` = {"run": RunConfig dict, "model_path", "output_dir",
    "mlflow": {"uri", "run_id"}}. ``emit`` (rank 0, when a console follows the run) receives progress events
    (:mod:`flat_ray.console`)."""
    tracker = tracking.open_run(payload["mlflow"]["uri"], payload["mlflow"]["run_id"], ctx.rank)
    with tracker.system_metrics():
        _train(payload, ctx, report, restore_dir, emit or (lambda event: None), tracker)


def _train(payload: Mapping[str, Any], ctx: WorkerContext, report: Report, restore_dir: str | None, show: Emit,
           tracker: tracking.NullTracker) -> None:
    loop_started = time.perf_counter()
    cfg = config_from_dict(payload["run"])
    rank, world = ctx.rank, ctx.world_size
    out_dir = Path(payload["output_dir"])
    ds.init_distributed(rank, world, ctx.local_rank)

    def info(message: str, *args: Any) -> None:  # progress lines from rank 0 only: its log and the console
        if rank == 0:
            log.info(message, *args)
            show({"kind": "line", "text": message % args})
    torch.manual_seed(cfg.optim.seed)

    # ---- data
    method = METHODS[cfg.method.name]
    _, tokenizer = load_model_and_tokenizer(payload["model_path"], trust_remote_code=cfg.model.trust_remote_code,
                                            load_model=False)
    profile = profile_for(cfg, cfg.model.name_or_path, tokenizer)
    rows = load_split(cfg.data.benchmark, cfg.data.split, cfg.data.data_dir)
    dataset = build_dataset(cfg, tokenizer, profile, rows)
    # drop_last=False pads every rank to the same number of micro-batches, which the collectives need
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.optim.seed)
    loader = DataLoader(dataset, batch_size=cfg.optim.micro_batch_size, sampler=sampler,
                        collate_fn=Collator(tokenizer.pad_token_id))
    accum = cfg.optim.grad_accum_steps
    total_steps = max(1, (len(loader) * cfg.optim.epochs) // accum)
    warmup = warmup_steps(total_steps, cfg.optim.warmup_ratio)

    # ---- engine
    ds_config = ds.build_config(cfg, world)
    model = ds.load_model(payload["model_path"], ds_config, trust_remote_code=cfg.model.trust_remote_code)
    engine = ds.build_engine(model, ds_config, lambda s: lr_multiplier(s, total_steps, warmup, cfg.optim.schedule))
    device = engine.device
    # what the workers really run with (the driver may sit on a CPU-only head)
    tracker.log_params({"resolved.deepspeed_version": ds.version(), "resolved.precision": ds.precision(cfg)})
    # FLAT and the reference-free baselines hold one model; NPO/DPO also a frozen reference (the start weights)
    ref_model = ds.build_reference(ds.load_model(payload["model_path"], ds_config,
                                                 trust_remote_code=cfg.model.trust_remote_code), ds_config) \
        if method.needs_reference else None
    start_epoch, global_step = 0, 0
    if restore_dir:
        verify(restore_dir, world)  # refuses a checkpoint that was cut short while being written
        state = ds.load_checkpoint(engine, Path(restore_dir) / "ds")
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        info("resumed after epoch %d (step %d)", start_epoch, global_step)
        # every start from a checkpoint is counted: after a lost worker Ray Train restarts the workers here, in
        # the same MLflow run; steps after the checkpoint are logged again at their same step numbers
        restores = int(tracker.tags().get("restores", 0)) + 1
        tracker.set_tags({"resumed_from_epoch": start_epoch, "restores": restores})

    show({"kind": "start", "total_steps": total_steps, "epochs": cfg.optim.epochs, "step": global_step})

    # ---- evaluation: the benchmark's suite on bounded subsets of its splits, sharded over the ranks
    suite = suite_for(cfg)
    eval_rows = suite.rows(cfg, cfg.eval.max_examples) if cfg.eval.enabled else {}
    reference_tr = read_reference(cfg.eval.reference)[0] if cfg.eval.enabled and cfg.eval.reference else None

    def evaluate(epoch: int) -> dict[str, float]:
        due = epoch in (0, cfg.optim.epochs) or epoch % cfg.eval.every_epochs == 0
        if not cfg.eval.enabled or not due:
            return {}
        def progress(split: str, done: int, total: int) -> None:
            show({"kind": "eval", "epoch": epoch, "split": split, "done": done, "total": total})

        summary = suite.run(engine.module, tokenizer, profile, eval_rows, cfg, rank=rank, world_size=world,
                            device=device, reference_tr=reference_tr, progress=progress)
        metrics = {k: v for k, v in summary.items() if isinstance(v, float)}  # metric-registry names
        tracker.log_metrics({**{f"eval/{k}": v for k, v in metrics.items()}, "epoch": epoch}, step=epoch)
        if rank == 0:
            log.info("epoch %d eval: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            show({"kind": "metrics", "epoch": epoch, "metrics": metrics})
        return metrics

    if start_epoch == 0:
        report({"epoch": 0, "global_step": 0, **evaluate(0)}, None)

    # ---- train
    knobs = vars(cfg.method)
    engine.train()
    diverged: str | None = None
    for epoch in range(start_epoch, cfg.optim.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        if rank == 0 and dataset.assignment:
            (out_dir / "templates").mkdir(parents=True, exist_ok=True)
            (out_dir / "templates" / f"epoch_{epoch + 1}.json").write_text(json.dumps(dataset.assignment, indent=0))
        window_start, window_tokens = time.perf_counter(), 0
        for batch in loader:
            window_tokens += sum(int(batch[k]["attention_mask"].sum()) for k in method.splits(knobs))  # on the host
            batch = _to(batch, device)
            boundary = engine.is_gradient_accumulation_boundary()
            out = method_loss(engine, batch, method, knobs, ref_model)
            engine.backward(out.loss)
            engine.step()
            if not boundary:
                continue
            global_step += 1
            metrics = out.metrics  # one host sync per optimizer step, where we log anyway
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else None
            problem = _divergence(metrics["loss"], grad_norm)
            # one collective per step: any rank's divergence stops every rank, and tokens are summed
            flags = all_reduce(torch.tensor([1.0 if problem else 0.0, float(window_tokens)]))
            if flags[0] > 0:
                diverged = f"{problem or 'another rank diverged'} at step {global_step} (epoch {epoch + 1}); lower optim.lr"
                break
            elapsed = time.perf_counter() - window_start
            step_metrics = {f"train/{k}": v for k, v in metrics.items()}
            step_metrics.update({"lr": engine.get_lr()[0], "tokens_per_s": flags[1].item() / max(elapsed, 1e-9),
                                 **({"grad_norm": grad_norm} if grad_norm is not None else {})})
            tracker.log_metrics(step_metrics, step=global_step)
            if rank == 0:
                show({"kind": "step", "step": global_step, "epoch": epoch + 1, "loss": metrics["loss"],
                      "lr": step_metrics["lr"]})
                if global_step % max(1, total_steps // 20) == 0 or global_step == total_steps:
                    log.info("epoch %d/%d step %d/%d loss %.5f lr %.2e", epoch + 1, cfg.optim.epochs, global_step,
                             total_steps, metrics["loss"], step_metrics["lr"])
            window_start, window_tokens = time.perf_counter(), 0
        if diverged:
            # a result, not a failure: the workers end normally (so Ray never restarts them from a checkpoint
            # that would diverge again) and the driver reads the tags; nothing is exported
            tracker.set_tags({"diverged": "true", "diverged_step": global_step, "diverged_reason": diverged})
            info("stopped: %s", diverged)
            return
        epoch_metrics = {"epoch": epoch + 1, "global_step": global_step, **evaluate(epoch + 1)}
        # staged locally, manifest last, then handed to Ray Train, which copies it to the storage path and
        # registers it only once the copy is complete (flat_ray.engine.checkpoint)
        ckpt = Path(tempfile.mkdtemp(prefix=f"flat-ray-ckpt-r{rank}-"))
        try:
            state = {"epoch": epoch, "global_step": global_step}
            with _writing(f"the epoch {epoch + 1} checkpoint to the local staging folder {ckpt}"):
                ds.save_checkpoint(engine, ckpt / "ds", state)
                write_manifest(ckpt, rank, world, state)
            with _writing(f"the epoch {epoch + 1} checkpoint to the storage path {payload.get('storage_dir')} "
                          "(launch.storage_path)"):
                report(epoch_metrics, str(ckpt))
        finally:
            shutil.rmtree(ckpt, ignore_errors=True)

    # ---- peak memory of the busiest rank (host RSS; device memory when on GPU)
    peak = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # Linux reports KiB
            torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
            _rss_now_mb()]
    peak_t = all_reduce(torch.tensor(peak), op="max")
    tracker.log_metrics({"peak_rss_mb": peak_t[0].item(), "rss_end_of_training_mb": peak_t[2].item(),
                         **({"peak_gpu_mem_mb": peak_t[1].item()} if torch.cuda.is_available() else {})},
                        step=global_step)

    # ---- consolidated export (all ranks gather, rank 0 writes)
    final = out_dir / "model"
    tmp = out_dir / ".model-partial"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    with _writing(f"the final model to {tmp} (paths.output_dir)"):
        written = ds.export_hf(engine, tokenizer, tmp, rank)
    if written is not None:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # moved into place only once complete
        info("exported %s", final)
    if dist.is_initialized():
        dist.barrier()
    # the worker's own time (engine, data, training, evaluation, export), without Ray's start-up around it
    tracker.log_metrics({"worker_s": time.perf_counter() - loop_started}, step=global_step)
