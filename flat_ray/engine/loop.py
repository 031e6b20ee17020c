"""The training loop run by every worker, written out: data, engine, per-step logging, per-epoch evaluation
and checkpoints, final export. Framework glue (Ray) stays outside: the launcher passes ``report`` (called the
same number of times on every rank) and the directory to restore from.

The loop reads hyperparameters only from its payload; rank and world size arrive as ints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.utils.data import DataLoader, DistributedSampler

from flat_ray import lora, tracking
from flat_ray.config import config_from_dict
from flat_ray.data import load_split
from flat_ray.distributed import all_reduce, broadcast_object
from flat_ray.engine import ds
from flat_ray.engine.checkpoint import EPOCH_FILE, verify, write_manifest
from flat_ray.engine.step import method_loss, to_device
from flat_ray.envinfo import forwarded_env
from flat_ray.errors import StorageError
from flat_ray.eval import original
from flat_ray.eval.suites import PER_QUESTION, interim_rows, scored, suite_for, write_tofu_logs
from flat_ray.eval.tofu import summarize
from flat_ray.fileio import atomic_write_text
from flat_ray.losses import METHODS
from flat_ray.models import load_model_and_tokenizer, train_only
from flat_ray.pipeline import build_dataset, profile_for, train_collator
from flat_ray.schedule import lr_multiplier, optimizer_steps, warmup_steps

log = logging.getLogger("flat_ray.train")
CLAIM_POLL_S = 2.0  # how often a trial waiting for its cell's original asks again
FLUSH_S = 5.0  # how long rank 0 waits at a checkpoint for MLflow to take the metrics logged before it

Report = Callable[[dict[str, Any], "str | None"], None]
Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    node: str = ""  # the cluster node this rank runs on (Ray's node id), when known


def _rss_now_mb() -> float:
    """Resident set size of this process now (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return 0.0


def _room_bytes() -> float:
    """Memory this rank may still use: free GPU memory, or available host memory shared by this node's ranks."""
    if torch.cuda.is_available():
        return float(torch.cuda.mem_get_info()[0])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return psutil.virtual_memory().available / max(local, 1)


@contextmanager
def _writing(what: str, folder: Path | None = None) -> Iterator[None]:
    """Turn a disk-full, permission or other OS error while writing ``what`` into one clear message. torch.save's
    zip writer reports a failed write as a RuntimeError, not an OSError: with ``folder`` given, one of those is
    turned into the same message (saying so when the disk is full)."""
    try:
        yield
    except OSError as exc:
        reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno else str(exc).splitlines()[0][:200]
        raise StorageError(f"could not write {what}: {reason}; free space or fix its permissions") from exc
    except RuntimeError as exc:
        if folder is None or not any(m in str(exc) for m in ("inline_container", "PytorchStreamWriter", "iostream")):
            raise
        full = folder.is_dir() and shutil.disk_usage(folder).free < 2**20
        reason = "[Errno 28] No space left on device" if full else str(exc).splitlines()[0][:200]
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
    if ctx.node:  # where rank 0 runs now (a restart after a lost node moves it)
        tracker.set_tags({"rank0_node": ctx.node})
    try:
        with tracker.system_metrics():
            _train(payload, ctx, report, restore_dir, emit or (lambda event: None), tracker)
    finally:  # rank 0's metrics kept while the tracking server was away reach it before the run ends
        tracker.close()


def _train(payload: Mapping[str, Any], ctx: WorkerContext, report: Report, restore_dir: str | None, show: Emit,
           tracker: tracking.NullTracker) -> None:
    """The recipe: set up, restore, evaluate, then per epoch train, evaluate and checkpoint; export."""
    started = time.perf_counter()
    job = _Job.setup(payload, ctx, tracker, show)
    start_epoch = job.restore(restore_dir) if restore_dir else 0
    show({"kind": "start", "total_steps": job.total_steps, "epochs": job.cfg.optim.epochs, "step": job.global_step})
    if start_epoch == 0:
        report({"epoch": 0, "global_step": 0, **job.evaluate(0)}, None)
    job.engine.train()
    for epoch in range(start_epoch, job.cfg.optim.epochs):
        diverged = job.train_epoch(epoch)
        if diverged:
            # a result, not a failure: the workers end normally (so Ray never restarts them from a checkpoint
            # that would diverge again) and the driver reads the tags; nothing is exported
            tracker.set_tags({"diverged": "true", "diverged_step": job.global_step, "diverged_reason": diverged})
            job.info("stopped: %s", diverged)
            return
        metrics = {"epoch": epoch + 1, "global_step": job.global_step, **job.evaluate(epoch + 1)}
        if job.checkpoint_due(epoch):
            job.checkpoint(epoch, metrics, report)
        else:  # every rank reports every epoch (a sweep's scheduler sees each one), without a checkpoint
            report(metrics, None)
    job.log_peak_memory()
    if job.cfg.launch.export == "last":  # else the driver exports the best checkpoint, or nothing is exported
        job.export()
    # the worker's own time (engine, data, training, evaluation, export), without Ray's start-up around it; what
    # this start of the run wrote: its checkpoints (handed to the storage path) and the export
    tracker.log_metrics({"worker_s": time.perf_counter() - started, "written_mb": job.written_mb},
                        step=job.global_step)


@dataclass
class _Job:
    """One rank's training job: what it was built with and where it stands."""

    cfg: Any
    payload: Mapping[str, Any]
    rank: int
    world: int
    tracker: tracking.NullTracker
    show: Emit
    tokenizer: Any
    profile: Any
    dataset: Any
    sampler: DistributedSampler
    loader: DataLoader
    total_steps: int
    engine: Any = None
    ref_model: Any = None
    global_step: int = 0
    eval_rows: dict = field(default_factory=dict)
    reference_tr: Any = None
    reference_mia: Any = None  # the reference (retain) model's Min-K% AUC and losses (PrivLeak, Reference attack)
    written_mb: float = 0.0  # checkpoints and export written by all ranks since this start

    @property
    def method(self):
        return METHODS[self.cfg.method.name]

    @property
    def knobs(self) -> dict[str, Any]:
        return vars(self.cfg.method)

    def info(self, message: str, *args: Any) -> None:
        """A progress line from rank 0 only: its log and the console."""
        if self.rank == 0:
            log.info(message, *args)
            self.show({"kind": "line", "text": message % args})

    # ---- set-up
    @classmethod
    def setup(cls, payload: Mapping[str, Any], ctx: WorkerContext, tracker: tracking.NullTracker, show: Emit) -> _Job:
        """Data (the method's splits, sharded over the ranks), the DeepSpeed engine, the evaluation rows."""
        cfg = config_from_dict(payload["run"])
        ds.init_distributed(ctx.rank, ctx.world_size, ctx.local_rank)
        torch.manual_seed(cfg.optim.seed)
        _, tokenizer = load_model_and_tokenizer(payload["model_path"], trust_remote_code=cfg.model.trust_remote_code,
                                                revision=cfg.model.revision, load_model=False,
                                                tokenizer=cfg.model.tokenizer)
        profile = profile_for(cfg, cfg.model.name_or_path, tokenizer)
        dataset = build_dataset(cfg, tokenizer, profile, load_split(cfg.data.benchmark, cfg.data.split, cfg.data.data_dir))
        # drop_last=False pads every rank to the same number of micro-batches, which the collectives need
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.optim.seed)
        loader = DataLoader(dataset, batch_size=cfg.optim.micro_batch_size, sampler=sampler,
                            collate_fn=train_collator(cfg, tokenizer))
        # the lr schedule needs at least one step even when a run is too short to take one
        total_steps = max(1, optimizer_steps(len(loader), cfg.optim.epochs, cfg.optim.grad_accum_steps))
        job = cls(cfg, payload, ctx.rank, ctx.world_size, tracker, show, tokenizer, profile, dataset, sampler, loader,
                  total_steps)
        job._build_engine()
        if cfg.eval.enabled:  # the benchmark's suite on bounded subsets of its splits
            job.eval_rows = suite_for(cfg).rows(cfg, cfg.eval.max_examples)
            reference = payload.get("reference") or {}  # read by the driver (the file may be on its node only)
            job.reference_tr, job.reference_mia = reference.get("truth_ratios"), reference.get("mia")
        return job

    def _build_engine(self) -> None:
        cfg, path = self.cfg, self.payload["model_path"]
        warmup = warmup_steps(self.total_steps, cfg.optim.warmup_ratio)
        ds_config = ds.build_config(cfg, self.world)
        loads = []  # every load of the model's weights on this rank

        def load_weights():
            loads.append(path)
            return ds.load_model(path, ds_config, trust_remote_code=cfg.model.trust_remote_code,
                                 revision=cfg.model.revision)

        model = load_weights()
        if cfg.model.gradient_checkpointing:  # recompute layers in backward (training mode only; eval is unchanged)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.trainable:  # the parameters it names train; the rest are frozen (no gradients, no optimizer state)
            train_only(model, cfg.model.trainable)
        if lora.enabled(cfg):  # adapters train, the base weights are frozen (no gradients, no optimizer state)
            model = lora.apply(model, cfg)
        trainable, total = lora.counts(model)
        self.engine = ds.build_engine(model, ds_config,
                                      lambda s: lr_multiplier(s, self.total_steps, warmup, cfg.optim.schedule))
        if cfg.deepspeed.compile:
            ds.compile_engine(self.engine)
        # FLAT and the reference-free baselines hold one model; NPO/DPO also a frozen reference (the start weights):
        # with LoRA the trained model with its adapter switched off, else a second load of the model
        if self.method.needs_reference:
            self.ref_model = (lora.AdapterOff(self.engine) if lora.enabled(cfg) else
                              ds.build_reference(load_weights(), ds_config))
        # what the workers really run with (the driver may sit on a CPU-only head)
        self.tracker.log_params({"resolved.deepspeed_version": ds.version(), "resolved.precision": ds.precision(cfg),
                                 # names only: which cache/offline variables this worker has (from its node or the
                                 # driver, envinfo.FORWARDED_ENV)
                                 "resolved.worker_env": ",".join(sorted(forwarded_env())) or "-",
                                 "resolved.threads_per_worker": torch.get_num_threads(),
                                 "resolved.trainable_params": trainable, "resolved.params": total,
                                 "resolved.model_loads": len(loads)})

    def restore(self, restore_dir: str) -> int:
        """Continue from a checkpoint; returns the first epoch still to train."""
        verify(restore_dir, self.world)  # refuses a checkpoint that was cut short while being written
        state = ds.load_checkpoint(self.engine, Path(restore_dir) / "ds")
        start_epoch, self.global_step = state["epoch"] + 1, state["global_step"]
        self.info("resumed after epoch %d (step %d)", start_epoch, self.global_step)
        # every start from a checkpoint is counted: after a lost worker Ray Train restarts the workers here, in
        # the same MLflow run; steps after the checkpoint are logged again at their same step numbers
        restores = int(self.tracker.tags().get("restores", 0)) + 1
        self.tracker.set_tags({"resumed_from_epoch": start_epoch, "restores": restores})
        return start_epoch

    # ---- evaluation
    def evaluate(self, epoch: int) -> dict[str, float]:
        """The suite's metrics before training, at the end and every ``eval.every_epochs`` (else nothing); in
        between on the first ``eval.interim_examples`` questions of each split where that is set."""
        cfg = self.cfg
        due = epoch in (0, cfg.optim.epochs) or epoch % cfg.eval.every_epochs == 0
        if not cfg.eval.enabled or not due:
            return {}

        def progress(split: str, done: int, total: int) -> None:
            self.show({"kind": "eval", "epoch": epoch, "split": split, "done": done, "total": total})

        rows = self.eval_rows
        if cfg.eval.interim_examples and 0 < epoch < cfg.optim.epochs:  # between the first and the last: cheaper
            rows = interim_rows(rows, cfg.eval.interim_examples)
        started = time.perf_counter()
        cache = self.payload.get("original_cache") if epoch == 0 else None
        summary = self._cached_original(cache) if cache else None
        if summary is None:
            summary = self._run_suite(rows, progress)
            if cache and self.rank == 0 and PER_QUESTION in summary:
                original.save(cache, summary[PER_QUESTION], {"run": self.tracker.run_id})
                self.tracker.set_tags({"original_eval": "evaluated"})
        metrics = {k: v for k, v in summary.items() if isinstance(v, float)}  # metric-registry names
        if cfg.eval.save_logs and self.rank == 0 and PER_QUESTION in summary:
            self.save_eval_logs(epoch, summary[PER_QUESTION])
        # eval_s: this evaluation's time on rank 0, the copy's gathering included; eval_examples: its questions
        # per split (the largest split's count)
        self.tracker.log_metrics({**{f"eval/{k}": v for k, v in metrics.items()}, "epoch": epoch,
                                  "eval_s": time.perf_counter() - started,
                                  "eval_examples": max(map(scored, rows.values()), default=0)}, step=epoch)
        if self.rank == 0:
            log.info("epoch %d eval: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            self.show({"kind": "metrics", "epoch": epoch, "metrics": metrics})
        return metrics

    def _run_suite(self, rows: dict[str, list[dict]], progress: Callable[[str, int, int], None]) -> dict[str, Any]:
        model = self._eval_model()
        try:
            with ds.eager(model):
                return suite_for(self.cfg).run(model, self.tokenizer, self.profile, rows, self.cfg, rank=self.rank,
                                               world_size=self.world, device=self.engine.device,
                                               reference_tr=self.reference_tr, reference_mia=self.reference_mia,
                                               progress=progress)
        finally:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _cached_original(self, cache: str) -> dict[str, Any] | None:
        """A sweep trial's epoch-0 evaluation from its cell's cached values of the original (flat_ray.eval.original),
        scored with this run's truth-ratio variant and reference; None (on every rank alike) when this trial is to
        evaluate it and keep the values: the first of the cell's trials to get here."""
        if self._claim_original(cache):
            return None
        values = broadcast_object(original.load(cache) if self.rank == 0 else None)  # complete: rank 0 reads them
        self.tracker.set_tags({"original_eval": "cached"})
        summary = summarize(values, truth_ratio=self.cfg.eval.truth_ratio, reference_tr=self.reference_tr,
                            reference_mia=self.reference_mia)
        return {**summary, PER_QUESTION: values}

    def _claim_original(self, cache: str) -> bool:
        """Whether this trial evaluates its cell's original. The other trials of the cell got their workers (and on
        an autoscaling cluster their nodes) while the first evaluated, and wait here for its values; how long is
        logged as ``original_wait_s``."""
        started = time.perf_counter()
        holder = {"trial": self.cfg.tracking.run_name, "run": self.payload["mlflow"]["run_id"]}
        mine = original.claim(cache, holder, original.run_ended(self.payload["mlflow"]["uri"]), poll_s=CLAIM_POLL_S,
                              share=broadcast_object, leader=self.rank == 0)
        self.tracker.log_metrics({"original_wait_s": time.perf_counter() - started}, step=0)
        return mine

    def save_eval_logs(self, epoch: int, values: Any) -> None:
        """``eval.save_logs``: this evaluation's per-question results in TOFU's and open-unlearning's formats, in the
        output folder and the run's artifacts."""
        out = Path(self.payload["output_dir"]) / "eval_logs" / f"epoch{epoch}"
        with _writing(f"the epoch {epoch} evaluation logs to {out} (paths.output_dir)"):
            write_tofu_logs(out, values, self.cfg.eval.truth_ratio, self.reference_tr,
                            {"epoch": epoch, "model": self.cfg.model.name_or_path, "split": self.cfg.data.split},
                            self.reference_mia)
        self.tracker.log_artifact(out, f"eval_logs/epoch{epoch}")

    def _eval_model(self) -> Any:
        """What evaluates: under ZeRO-3 a full copy gathered once (``eval.gathered``) when every rank has room for
        it, else the engine's partitioned module."""
        if self.cfg.deepspeed.stage != 3 or not self.cfg.eval.gathered:
            return self.engine.module
        need = ds.full_bytes(self.engine)
        fits = all_reduce(torch.tensor([1.0 if need * 1.5 <= _room_bytes() else 0.0]), op="min")  # ranks agree
        if fits[0] < 1:
            self.info("evaluating from the shards: a full copy (%.1f GiB) does not fit on every rank", need / 2**30)
            return self.engine.module
        return ds.full_copy(self.engine)

    # ---- training
    def train_epoch(self, epoch: int) -> str | None:
        """One pass over this rank's shard; returns why training cannot go on, or None."""
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        out_dir = Path(self.payload["output_dir"])
        if self.rank == 0 and self.dataset.assignment:
            (out_dir / "templates").mkdir(parents=True, exist_ok=True)
            shown = [t[:80] for t in self.dataset.assignment] if self.dataset.templates.standalone \
                else self.dataset.assignment  # a whole text per row: its start names it
            (out_dir / "templates" / f"epoch_{epoch + 1}.json").write_text(json.dumps(shown, indent=0))
        method, knobs = self.method, self.knobs  # looked up once per epoch, not per micro-batch
        splits = method.splits(knobs)
        window_start, window_tokens = time.perf_counter(), 0
        for batch in self.loader:
            window_tokens += sum(int(batch[k]["attention_mask"].sum()) for k in splits)  # counted on the host
            boundary = self.engine.is_gradient_accumulation_boundary()
            out = method_loss(self.engine, to_device(batch, self.engine.device), method, knobs, self.ref_model)
            self.engine.backward(out.loss)
            self.engine.step()
            if not boundary:
                continue
            self.global_step += 1
            problem = self._after_step(epoch, out.metrics, window_tokens, time.perf_counter() - window_start)
            if problem:
                return problem
            window_start, window_tokens = time.perf_counter(), 0
        return None

    def _after_step(self, epoch: int, metrics: Mapping[str, float], tokens: int, elapsed: float) -> str | None:
        """Check, log and show one optimizer step (one host sync, where we log anyway)."""
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else None
        problem = _divergence(metrics["loss"], grad_norm)
        # one collective per step: any rank's divergence stops every rank, and tokens are summed
        flags = all_reduce(torch.tensor([1.0 if problem else 0.0, float(tokens)]))
        if flags[0] > 0:
            return f"{problem or 'another rank diverged'} at step {self.global_step} (epoch {epoch + 1}); lower optim.lr"
        step_metrics = {f"train/{k}": v for k, v in metrics.items()}
        step_metrics.update({"lr": self.engine.get_lr()[0], "tokens_per_s": flags[1].item() / max(elapsed, 1e-9),
                             **({"grad_norm": grad_norm} if grad_norm is not None else {})})
        self.tracker.log_metrics(step_metrics, step=self.global_step)
        if self.rank == 0:
            self.show({"kind": "step", "step": self.global_step, "epoch": epoch + 1, "loss": metrics["loss"],
                       "lr": step_metrics["lr"]})
            if self.global_step % max(1, self.total_steps // 20) == 0 or self.global_step == self.total_steps:
                log.info("epoch %d/%d step %d/%d loss %.5f lr %.2e", epoch + 1, self.cfg.optim.epochs,
                         self.global_step, self.total_steps, metrics["loss"], step_metrics["lr"])
        return None

    # ---- checkpoint, memory, export
    def checkpoint_due(self, epoch: int) -> bool:
        """Every ``launch.checkpoint_every_epochs``-th epoch and the last one (``epoch`` counts from 0)."""
        done, every = epoch + 1, self.cfg.launch.checkpoint_every_epochs
        return done % every == 0 or done == self.cfg.optim.epochs

    def checkpoint(self, epoch: int, metrics: dict[str, Any], report: Report) -> None:
        """Staged in the run's storage folder, manifest last, then handed to Ray Train, which copies it into place and
        registers it only once the copy is complete (:mod:`flat_ray.engine.checkpoint`)."""
        staging = self._staging_dir()
        ckpt = Path(tempfile.mkdtemp(prefix=f"flat-ray-ckpt-r{self.rank}-", dir=staging))
        where = "in the storage path (launch.storage_path)" if staging else "in the local temporary folder"
        try:
            state = {"epoch": epoch, "global_step": self.global_step}
            with _writing(f"the epoch {epoch + 1} checkpoint to {ckpt} {where}", ckpt):
                ds.save_checkpoint(self.engine, ckpt / "ds", state)
                if self.rank == 0:  # what `flat-ray export` chooses the epoch by, and the dtype it exports in
                    dtype = str(next(self.engine.module.parameters()).dtype).removeprefix("torch.")
                    atomic_write_text(ckpt / EPOCH_FILE, json.dumps({**state, "metrics": metrics, "dtype": dtype}))
                write_manifest(ckpt, self.rank, self.world, state)
            self._log_written("checkpoint_mb", ckpt)
            metric = self.cfg.launch.checkpoint_metric  # what Ray Train ranks checkpoints by (NaN: not evaluated)
            score = {"checkpoint_score": float(metrics.get(metric, math.nan))} if metric else {}
            # the metrics up to here reach MLflow before Ray Train registers the checkpoint, so a run resumed from it
            # (which logs only the steps after it) has them all; a server that is away gets a bounded wait, and
            # what it has not taken yet (unsent_at_checkpoint) stays queued
            self.tracker.log_metrics({"unsent_at_checkpoint": self.tracker.flush(FLUSH_S)}, step=self.global_step)
            with _writing(f"the epoch {epoch + 1} checkpoint to the storage path {self.payload.get('storage_dir')} "
                          "(launch.storage_path)"):
                report({**metrics, **score}, str(ckpt))
        finally:
            shutil.rmtree(ckpt, ignore_errors=True)

    def _staging_dir(self) -> str | None:
        """Where this rank stages a checkpoint: ``.staging`` in the run's storage folder when this node sees that
        folder (a local disk or a shared mount, which has room for checkpoints by design, unlike a small root
        volume's /tmp), else the system's temporary folder (cloud storage)."""
        run_dir = Path(self.payload.get("storage_dir") or "")
        if not run_dir.is_absolute() or not run_dir.parent.is_dir():
            return None
        with _writing(f"the checkpoint staging folder {run_dir / '.staging'} (launch.storage_path)"):
            (run_dir / ".staging").mkdir(parents=True, exist_ok=True)
        return str(run_dir / ".staging")

    def _log_written(self, key: str, folder: Path | None) -> None:
        """The MiB every rank wrote under ``folder`` (None: nothing on this rank), summed: one collective."""
        mine = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder else 0
        mb = all_reduce(torch.tensor([float(mine)]))[0].item() / 2**20
        self.written_mb += mb
        self.tracker.log_metrics({key: mb}, step=self.global_step)

    def log_peak_memory(self) -> None:
        """Peak memory of the busiest rank (host RSS; device memory when on GPU)."""
        peak = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # Linux reports KiB
                torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
                _rss_now_mb()]
        peak_t = all_reduce(torch.tensor(peak), op="max")
        self.tracker.log_metrics({"peak_rss_mb": peak_t[0].item(), "rss_end_of_training_mb": peak_t[2].item(),
                                  **({"peak_gpu_mem_mb": peak_t[1].item()} if torch.cuda.is_available() else {})},
                                 step=self.global_step)

    def export(self) -> None:
        """The consolidated Hugging Face directory: all ranks gather, rank 0 writes, moved into place once whole."""
        out_dir = Path(self.payload["output_dir"])
        final, tmp = out_dir / "model", out_dir / ".model-partial"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        with _writing(f"the final model to {tmp} (paths.output_dir)", out_dir):
            written = ds.export_hf(self.engine, self.tokenizer, tmp, self.rank)
        if written is not None:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self.info("exported %s", final)
        self._log_written("export_mb", final if written is not None else None)  # also every rank's barrier
