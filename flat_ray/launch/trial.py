"""One trial of a sweep: the function Tune runs for it (on the head, ``{"CPU": 0.01}``), which runs the trial like
``flat-ray train`` through :func:`flat_ray.launch.driver.run_training`, and what it reports to Tune: its best
epoch so far. A trial whose MLflow run already finished (a sweep killed before Tune saved that) reports that run's
result again and trains nothing; a resumed trial seeds its best epoch from its kept checkpoints."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from flat_ray import tracking
from flat_ray.errors import Diverged, FlatRayError
from flat_ray.eval import original
from flat_ray.export import choose, kept_checkpoints
from flat_ray.launch.records import STATE_FILE, storage_root
from flat_ray.metrics import rank_value
from flat_ray.report import run_result
from flat_ray.storage import Place
from flat_ray.sweep import build_cell_config


def trial_fn(config: dict[str, Any], payload: dict[str, Any]) -> None:
    """One trial: the cell's config with this trial's sampled values, run like ``flat-ray train``."""
    from flat_ray.launch.driver import run_training
    from flat_ray.launch.worker import quiet_worker_logs

    quiet_worker_logs()
    trial = tune.get_context().get_trial_name()
    constants = {**payload["constants"], "tracking.run_name": trial, "tracking.experiment": payload["sweep"],
                 "paths.output_dir": str(Path(payload["trials_dir"]) / trial)}
    cfg = build_cell_config(payload["base"], constants, config)
    train_dir = storage_root(cfg) / trial
    resume = trial if (train_dir / STATE_FILE).is_file() else None
    if resume is None:
        train_dir.rmtree()  # a start that died before its MLflow run existed
    tags = {"mlflow.parentRunId": payload["parent_run_id"], "flat_ray.sweep": payload["sweep"],
            "flat_ray.cell": payload["cell"], "flat_ray.trial": trial, "flat_ray.role": "trial",
            **{f"flat_ray.{k}": v for k, v in payload["labels"].items()},
            **{f"sampled.{k}": v for k, v in config.items()}}
    finished = _finished_result(train_dir, cfg) if resume else None
    if finished is not None:  # it ended before a killed sweep could record that: its result again, nothing re-run
        tune.report(finished)
        return
    metric = cfg.launch.checkpoint_metric
    best = _best_kept(train_dir, metric) if resume else None  # a resumed trial's best epoch may be behind it
    cache = _original_cache(cfg, payload)
    try:
        run_training(cfg, resume=resume, tags=tags, callbacks=[best_epoch_reporter(metric, best)],
                     stopping=_stopping(), placed_by_sweep=True, original_cache=cache)
    except Diverged as exc:  # a too-large lr is a result of the search, not a broken sweep
        logging.getLogger("flat_ray.tune").warning("%s", exc)
    finally:  # a run that failed before evaluating the original hands the evaluation to the next trial
        if cache:
            original.release(cache, trial)


def _original_cache(cfg, payload: dict[str, Any]) -> str | None:
    """Where this trial's cell keeps its evaluation of the original (per-question suites only): the trial's ranks
    claim it, or wait for the trial that did, at their epoch-0 evaluation (flat_ray.eval.original)."""
    from flat_ray.data import BENCHMARKS

    if not cfg.eval.enabled or BENCHMARKS[cfg.data.benchmark].evaluation != "tofu":
        return None
    return str(original.cache_dir(payload["originals"], cfg))


def best_epoch_reporter(metric: str | None, best: dict[str, Any] | None = None):
    """Ray Train's report callback for Tune, reporting each trial's result as its best epoch so far: the trained,
    checkpointed epoch with the best ``metric`` (a tie goes to the later one), with every metric of that epoch,
    ``epoch`` that epoch and ``trained_epochs`` how far it got. Tune's last result is then the epoch the cell
    exports, which is what its searcher learns from and the console shows; ASHA compares best-so-far values.
    The epoch-0 evaluation (the model before unlearning) goes through as it is."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class BestEpoch(TuneReportCallback):
        def __init__(self) -> None:
            super().__init__()
            self.best = best

        def after_report(self, run_context, metrics, checkpoint):
            current = dict(metrics[0])
            epoch = int(current.get("epoch", 0))
            if metric and checkpoint is not None and epoch >= 1 and (
                    self.best is None or rank_value(metric, current.get(metric))
                    >= rank_value(metric, self.best.get(metric))):
                self.best = current
            shown = current if self.best is None else {**current, **self.best}
            super().after_report(run_context, [{**shown, "trained_epochs": epoch}], checkpoint)

    return BestEpoch()


def _best_kept(train_dir: Place, metric: str | None) -> dict[str, Any] | None:
    """The best kept checkpoint's reported metrics (epoch counted from 1), for a trial resumed after it."""
    try:
        best = choose(kept_checkpoints(train_dir), "best", metric)
    except FlatRayError:  # no metric, or no kept checkpoint with it
        return None
    return {**best.metrics, "epoch": best.epoch}


def _finished_result(train_dir: Place, cfg) -> dict[str, Any] | None:
    """The result of a trial whose MLflow run FINISHED (its best epoch, as its workers reported it to Tune), else
    None."""
    state = json.loads((train_dir / STATE_FILE).read_text())
    run = tracking.run_data(state["mlflow_uri"], state["run_id"])
    if run.info.status != "FINISHED":
        return None
    _, epoch, metrics, last = run_result(state["mlflow_uri"], run, cfg.launch.checkpoint_metric)
    return {**metrics, "epoch": epoch or 0, "trained_epochs": last or 0}


def _stopping() -> Callable[[], bool]:
    """True once Tune has asked this trial to stop (a scheduler's early stop, the end of the sweep). Tune sets
    its session's stop event before it tears the trial down, so a run cut off by that is known as stopped."""
    from ray.train._internal.session import get_session

    session = get_session()
    event = getattr(session, "stop_event", None)
    return event.is_set if event is not None else (lambda: False)

