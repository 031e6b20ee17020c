"""``flat-ray tune``: search spaces become Ray Tune experiments, one per grid cell, run one after another.

Each trial is a small driver function (:mod:`flat_ray.launch.trial`; ``{"CPU": 0.01}``, pinned to the head node)
that builds a Ray Train ``TorchTrainer`` through :func:`flat_ray.launch.driver.run_training`, so a trial does
exactly what ``flat-ray train`` does and its MLflow run is a child of the sweep's parent run. Trial names are the cell name
plus Tune's trial index: the same on every resume, which is what lets a resumed trial find its Ray Train run
(checkpoints) and its MLflow run again.

Layout: ``<workdir>/sweeps/<sweep>/`` holds ``sweep.json`` (what a resume and ``flat-ray report`` need),
``space.yaml``, ``trials.txt``, per-trial output dirs and the report; Ray's state lives under
``<storage>/<sweep>/<cell>`` (Tune) and ``<storage>/<sweep>/train/<trial>`` (Ray Train).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from flat_ray import tracking
from flat_ray.assets import ensure_demo_original, workdir
from flat_ray.console import SweepBoard
from flat_ray.errors import FlatRayError, RunFailed
from flat_ray.eval import original
from flat_ray.eval.run import auto_reference
from flat_ray.export import drop_checkpoints, export_run
from flat_ray.launch.cluster import (
    check_sweep,
    connect_for_sweep,
    ray_address,
    release_orphaned_placement_groups,
)
from flat_ray.launch.driver import finetuner, preflight
from flat_ray.launch.records import (
    close_cut_off_trials,
    close_parent,
    close_stopped_trials,
    open_parent,
)
from flat_ray.launch.search import SCHEDULER_BUILDERS, SEARCH_BUILDERS, param_space
from flat_ray.launch.trial import trial_fn
from flat_ray.metrics import rank_value
from flat_ray.models import DEMO_ORIGINAL, fetch_weights
from flat_ray.preflight import absolute_paths
from flat_ray.report import collect
from flat_ray.storage import Place
from flat_ray.sweep import TRIAL_FN_CPU, Cell, Space, load_space, with_constants
from flat_ray.sweep_state import SWEEP_FILE, saved_space
from flat_ray.sweep_table import format_table, trial_table

# The per-trial function (and with it Ray Train V2's controller, which runs on its node) stays on the head: a
# placement group would otherwise prefer the node with the most free CPUs, a GPU node, whose loss would kill the
# trial instead of letting Ray Train restart its workers. Every Ray head has the resource node:__internal_head__.
TRIAL_FN_RESOURCES = {"CPU": TRIAL_FN_CPU, "node:__internal_head__": 0.001}
# how long the end of a cell waits for the Ray Train controllers of stopped trials to die (and their placement
# groups to be released): all of the cell's trials are over by then
ORPHAN_WAIT_S = 5.0

log = logging.getLogger(__name__)


class _Board(tune.Callback):
    """Feeds Tune's trial events to the running sweep's :class:`SweepBoard` (a live table on a terminal). Tune
    saves its callbacks with the experiment; the board is not saved with it (a terminal does not pickle), and a
    resume attaches the running sweep's board to the copy Tune brings back (:func:`_attach`)."""

    def __init__(self, board: SweepBoard | None = None):
        self.board = board

    def __getstate__(self) -> dict:
        return {"board": None}

    @staticmethod
    def _sampled(trial) -> str:
        return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())

    def on_trial_start(self, iteration, trials, trial, **info):
        if board := self.board:
            board.started(str(trial), self._sampled(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if board := self.board:
            board.result(str(trial), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if board := self.board:
            board.finished(str(trial), trial.last_result or {}, self._sampled(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        if board := self.board:
            board.failed(str(trial), str(trial.local_path))


# ------------------------------------------------------------------------------------------ the sweep
@dataclass
class SweepResult:
    name: str
    sweep_dir: Path
    parent_run_id: str
    mlflow_uri: str
    trials: int
    errored: int
    seconds: float

    def raise_if_errored(self) -> None:
        if self.errored:
            raise RunFailed(f"{self.errored} trial(s) failed (see the FAILED runs in MLflow experiment {self.name} and "
                            f"the error.txt of each failed trial under Ray's results); `flat-ray tune --resume "
                            f"{self.name}` retries them")


def _absolute(cell: Cell, base: dict[str, Any], uri: str, storage: Place) -> Cell:
    """Trials run in Ray's processes with their own working directory: make every path absolute."""
    cfg = cell.config
    extra: dict[str, Any] = {"paths.workdir": str(workdir(cfg)), "tracking.mlflow_uri": uri,
                             "launch.storage_path": str(storage / "train"), **absolute_paths(cfg)}
    return with_constants(cell, extra, base)


def _with_reference(cell: Cell, base: dict[str, Any]) -> Cell:
    """A cell with ``eval.reference=auto`` gets its retain model's eval logs (built once, before trials need
    them) as its trials' reference: each trial reads the same files."""
    cfg = auto_reference(cell.config, finetuner(console=True))
    return cell if cfg is cell.config else with_constants(cell, {"eval.reference": cfg.eval.reference}, base)


class _CtrlC:
    """Ctrl-C during a sweep, seen by flat-ray: the first one asks Tune for its graceful stop (SIGUSR1: save the
    experiment state, end the running trials) and is remembered, so the sweep reports itself as interrupted
    instead of treating the trials Tune ended as finished; a second one interrupts at once."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune keeps its SIGUSR1 handler
            self._previous = signal.signal(signal.SIGINT, self)
        return self

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGUSR1)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def plan_sweep(space: Space, *, name: str, address: str | None, storage_path: str | None,
               mlflow_uri: str | None) -> tuple[Space, Path, Path, str]:
    """Resolve paths, run the preflight checks of every cell; nothing is written."""
    cfg0 = space.cells[0].config
    root = workdir(cfg0)
    uri = mlflow_uri or cfg0.tracking.mlflow_uri or tracking.default_uri(root)
    storage = Place.of(storage_path or root / "ray_results") / name
    extra_address = {"launch.address": address} if address else {}
    cells = [_absolute(with_constants(c, extra_address, space.base) if extra_address else c, space.base, uri, storage)
             for c in space.cells]
    seen = set()
    for cell in cells:
        key = (cell.config.model.name_or_path, cell.config.model.tokenizer, cell.config.data.benchmark,
               cell.config.data.split, cell.config.eval.reference)
        if key not in seen:
            seen.add(key)
            preflight(cell.config, uri)
    return dataclasses.replace(space, cells=cells), root / "sweeps" / name, storage, uri


def run_sweep(space_name: str, overrides: list[str], *, name: str | None = None, resume: str | None = None,
              address: str | None = None, storage_path: str | None = None,
              mlflow_uri: str | None = None, workdir_hint: str | None = None,
              echo: Callable[[str], None] = log.info) -> SweepResult:
    """Run (or with ``resume``, continue) a sweep to the end and write its report. ``echo`` shows the trial
    table, the trials' progress and the report (the CLI passes ``click.echo``)."""
    started = time.monotonic()
    state: dict[str, Any] = {}
    if resume:
        space, state = saved_space(resume, workdir_hint)
        name, address = state["name"], address or state.get("address")
        storage_path, mlflow_uri = state["storage_path"], state["mlflow_uri"]
    else:
        space = load_space(space_name, overrides)
        name = name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise FlatRayError(f"sweep name {name!r} may only use letters, digits, '_', '.' and '-'")
    address = ray_address(address)  # below --address and a resumed sweep's own; RAY_ADDRESS in a Ray job
    space, sweep_dir, storage, uri = plan_sweep(space, name=name, address=address, storage_path=storage_path,
                                                mlflow_uri=mlflow_uri)
    if not resume and (sweep_dir / SWEEP_FILE).exists():
        raise FlatRayError(f"a sweep named {name!r} already exists in {sweep_dir.parent}; pass --resume {name} "
                           "or choose another --name")
    connect_for_sweep(address)
    concurrency = check_sweep(space, address, Place.of(storage_path) if storage_path else None, uri)
    fetched = set()
    for cell in space.cells:  # build the demo's original model, or fetch a hub model's weights, once
        model = cell.config.model
        if model.name_or_path == DEMO_ORIGINAL:
            ensure_demo_original(cell.config, finetuner(console=True))
        if (model.name_or_path, model.revision, model.tokenizer) not in fetched:
            fetch_weights(cell.config)
            fetched.add((model.name_or_path, model.revision, model.tokenizer))
    space = dataclasses.replace(space, cells=[_with_reference(cell, space.base) for cell in space.cells])
    table = format_table(trial_table_with(space, concurrency))
    parent = open_parent(space, name, sweep_dir, storage, uri, table, address, storage_path, state)
    echo(f"sweep {name}: {space.total_trials()} trials in {len(space.cells)} cell(s), MLflow parent run "
         f"{parent.run_id}\n{table}")
    with parent.system_metrics():
        board = SweepBoard(space.objective, space.modes, echo)
        try:
            errored = sum(_run_cell(space, cell, name, sweep_dir, storage, uri, parent.run_id,
                                    concurrency[cell.name], board) for cell in space.cells)
        finally:
            board.close()
    report = close_parent(parent, space, sweep_dir, started, errored)
    echo(report.text)
    return SweepResult(name, sweep_dir, parent.run_id, uri, space.total_trials(), errored,
                       time.monotonic() - started)


def _run_cell(space: Space, cell: Cell, name: str, sweep_dir: Path, storage: Place, uri: str, parent_run_id: str,
              concurrency: int, board: SweepBoard) -> int:
    """One grid cell as one Tune experiment (restored when it has state); returns its number of errored trials."""
    metric = space.objective[0] if len(space.objective) == 1 else None
    mode = space.modes[0] if len(space.objective) == 1 else None
    payload = {"sweep": name, "cell": cell.name, "labels": cell.labels, "base": space.base,
               "constants": cell.constants, "parent_run_id": parent_run_id,
               "trials_dir": str(sweep_dir / "trials"), "originals": str(sweep_dir / "originals" / cell.name)}
    original.release_claims(payload["originals"])  # no trial of this cell runs yet
    trainable = tune.with_resources(tune.with_parameters(trial_fn, payload=payload), TRIAL_FN_RESOURCES)
    path = storage / cell.name
    if tune.Tuner.can_restore(str(path)):
        tuner = _attach(tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True,
                                           param_space=param_space(cell) or None), board)
    else:
        def trial_name(trial, cell_name=cell.name) -> str:
            return f"{cell_name}-{trial.trial_id.rsplit('_', 1)[-1]}"

        tuner = tune.Tuner(
            trainable, param_space=param_space(cell),
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, search_alg=SEARCH_BUILDERS[space.algorithm](space, cell, concurrency),
                scheduler=SCHEDULER_BUILDERS[space.scheduler](space, cell), num_samples=space.num_samples,
                # the trial function's process (ray, flat_ray imported) serves the next trial too; not
                # with early stopping, where a stopped trial's function may still be running
                reuse_actors=space.scheduler == "fifo",
                trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=cell.name, storage_path=str(storage), verbose=0,
                                      callbacks=[_Board(board)]))
    with _CtrlC() as ctrl_c:
        results = tuner.fit()
    # what a trial stopped at the end left behind would hold its resources for as long as this driver lives
    release_orphaned_placement_groups(wait_s=ORPHAN_WAIT_S, cell_done=True)
    states = _trial_states(results)
    expected = space.num_samples if space.algorithm == "optuna" else cell.trials(space.num_samples)
    # Tune ends the running trials on Ctrl-C (TERMINATED, like finished ones) but saves them as unfinished
    if ctrl_c.count or len(states) < expected or any(s not in ("TERMINATED", "ERROR") for s in states.values()):
        close_cut_off_trials(uri, parent_run_id)
        raise RunFailed(f"sweep {name} was interrupted in cell {cell.name}; continue it with "
                        f"`flat-ray tune --resume {name}` (finished trials are kept)")
    close_stopped_trials(uri, parent_run_id, states)
    _finish_outputs(space, cell, sweep_dir, storage, uri, parent_run_id, board.echo)
    return sum(s == "ERROR" for s in states.values())


def _attach(tuner: tune.Tuner, board: SweepBoard) -> tune.Tuner:
    """Give the restored experiment's saved :class:`_Board` the running sweep's board. Tune's restore takes no
    callbacks of its own and keeps the saved ones in its run config (no public accessor: this reads the one Tune
    uses, and fails loudly should a Ray upgrade move it)."""
    callbacks = [c for c in tuner._local_tuner.get_run_config().callbacks or [] if isinstance(c, _Board)]
    if len(callbacks) != 1:
        raise RuntimeError(f"the restored Tune experiment has {len(callbacks)} sweep boards, expected 1")
    callbacks[0].board = board
    return tuner


def _finish_outputs(space: Space, cell: Cell, sweep_dir: Path, storage: Place, uri: str, parent_run_id: str,
                    echo: Callable[[str], None]) -> None:
    """At the end of a cell: export its best finished trial at its best epoch (``export: best_trial``), the result
    the report shows for it, then delete the trials' checkpoints down to ``launch.keep_checkpoints``."""
    metric = cell.config.launch.checkpoint_metric
    trials = collect(sweep_dir, cell.name)[1]
    done = [t for t in trials if t.status == "finished" and t.epoch and metric in t.final]
    if space.export == "best_trial" and metric is not None and done:
        best = max(done, key=lambda t: rank_value(metric, t.final[metric]))  # the first of equals, as the report
        try:
            out = export_run(storage / "train" / best.name, str(best.epoch), sweep_dir / "trials" / best.name / "model")
        except FlatRayError as exc:  # its checkpoint of that epoch is gone (deleted by hand): say so, keep going
            echo(f"cell {cell.name}: best trial {best.name} (epoch {best.epoch}) not exported: {exc}")
        else:
            tracking.Tracker(uri, parent_run_id).set_tags({f"best_model.{cell.name}": str(out.model_dir)})
            echo(f"cell {cell.name}: best trial {best.name} (epoch {best.epoch}, {metric} "
                 f"{best.final[metric]:.4g}) exported to {out.model_dir}")
    for trial in {t.name for t in trials}:
        drop_checkpoints(storage / "train" / trial, cell.config.launch.keep_checkpoints, metric)


def _trial_states(results) -> dict[str, str]:
    """Tune's status of every trial of a finished ``Tuner.fit()``, by trial name."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []
    return {str(t): t.status for t in trials}


def trial_table_with(space: Space, concurrency: dict[str, int]) -> list[dict[str, Any]]:
    rows = trial_table(space, [])
    for row in rows:
        row["concurrent"] = concurrency[row["cell"]]
    return rows

