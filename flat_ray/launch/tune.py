"""``flat-ray tune``: search spaces become Ray Tune experiments, one per grid cell, run one after another.

Each trial is a small driver function (``{"CPU": 0.01}``, pinned to the head node) that builds a Ray Train
``TorchTrainer`` through :func:`flat_ray.launch.driver.run_training` with ``TuneReportCallback``, so a trial does
exactly what ``flat-ray train`` does and its MLflow run is a child of the sweep's parent run. Trial names are the cell name
plus Tune's trial index: the same on every resume, which is what lets a resumed trial find its Ray Train run
(checkpoints) and its MLflow run again.

Layout: ``<workdir>/sweeps/<sweep>/`` holds ``sweep.json`` (what a resume and ``flat-ray report`` need),
``space.yaml``, ``trials.txt``, per-trial output dirs and the report; Ray's state lives under
``<storage>/<sweep>/<cell>`` (Tune) and ``<storage>/<sweep>/train/<trial>`` (Ray Train).
"""

from __future__ import annotations

import dataclasses
import json
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

import ray
from ray import tune

from flat_ray import tracking
from flat_ray.assets import ensure_demo_original, workdir
from flat_ray.console import SweepBoard
from flat_ray.envinfo import package_versions
from flat_ray.errors import Diverged, FlatRayError, RunFailed
from flat_ray.eval import original
from flat_ray.eval.metrics import rank_value
from flat_ray.eval.run import auto_reference
from flat_ray.export import choose, drop_checkpoints, export_run, kept_checkpoints
from flat_ray.fileio import atomic_write_text
from flat_ray.launch.driver import (
    STATE_FILE,
    connect_ray,
    finetuner,
    log_split,
    preflight,
    release_orphaned_placement_groups,
    storage_root,
)
from flat_ray.models import DEMO_ORIGINAL, fetch_weights
from flat_ray.report import SWEEP_FILE, collect, run_result, write_report
from flat_ray.storage import Place
from flat_ray.sweep import (
    TRIAL_FN_CPU,
    Cell,
    Space,
    Spec,
    build_cell_config,
    format_table,
    load_space,
    space_summary,
    trial_table,
    with_constants,
)

# The per-trial function (and with it Ray Train V2's controller, which runs on its node) stays on the head: a
# placement group would otherwise prefer the node with the most free CPUs, a GPU node, whose loss would kill the
# trial instead of letting Ray Train restart its workers. Every Ray head has the resource node:__internal_head__.
TRIAL_FN_RESOURCES = {"CPU": TRIAL_FN_CPU, "node:__internal_head__": 0.001}
# how long the end of a cell waits for the Ray Train controllers of stopped trials to die (and their placement
# groups to be released): all of the cell's trials are over by then
ORPHAN_WAIT_S = 5.0

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- space -> ray.tune
def domain(spec: Spec) -> Any:
    """The one place the space vocabulary becomes ``ray.tune`` objects."""
    a = spec.args
    return {"grid": lambda: tune.grid_search(list(a)), "choice": lambda: tune.choice(list(a)),
            "uniform": lambda: tune.uniform(*a), "loguniform": lambda: tune.loguniform(*a),
            "randint": lambda: tune.randint(*a)}[spec.kind]()


def param_space(cell: Cell) -> dict[str, Any]:
    return {key: domain(spec) for key, spec in cell.params.items()}


def _basic(space: Space, cell: Cell, concurrency: int):
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=space.seed, max_concurrent=concurrency)


def _optuna(space: Space, cell: Cell, concurrency: int):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    metric = space.objective if len(space.objective) > 1 else space.objective[0]
    mode = space.modes if len(space.objective) > 1 else space.modes[0]
    return ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, seed=space.seed), max_concurrent=concurrency)


def _fifo(space: Space, cell: Cell):
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def _asha(space: Space, cell: Cell):
    from ray.tune.schedulers import ASHAScheduler

    # one report per epoch plus the evaluation before training: epochs + 1 iterations. A trial that reaches
    # max_t ends by itself (stop_last_trials=False): stopping it there would cut off its export
    max_t = cell.config.optim.epochs + 1
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                         grace_period=min(space.scheduler_args.get("grace_period", 1) + 1, max_t),
                         reduction_factor=space.scheduler_args.get("reduction_factor", 2),
                         stop_last_trials=False)


# The Ray objects behind the names of flat_ray.sweep's SEARCHERS and SCHEDULERS registries (same keys, tested).
# Searchers limit concurrency themselves (Tune ignores ``max_concurrent_trials`` for the basic one).
SEARCH_BUILDERS: dict[str, Callable[[Space, Cell, int], Any]] = {"basic": _basic, "optuna": _optuna}
SCHEDULER_BUILDERS: dict[str, Callable[[Space, Cell], Any]] = {"fifo": _fifo, "asha": _asha}


# ------------------------------------------------------------------------------------------ the trial
def trial_fn(config: dict[str, Any], payload: dict[str, Any]) -> None:
    """One trial: the cell's config with this trial's sampled values, run like ``flat-ray train``."""
    from flat_ray.launch.driver import run_training
    from flat_ray.launch.worker import quiet_worker_logs

    quiet_worker_logs()
    release_orphaned_placement_groups()  # a stopped trial's leftover would keep this one's workers waiting
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
    cache = _original_turn(cfg, payload, trial)
    try:
        run_training(cfg, resume=resume, tags=tags, callbacks=[best_epoch_reporter(metric, best)],
                     stopping=_stopping(), placed_by_sweep=True, original_cache=cache)
    except Diverged as exc:  # a too-large lr is a result of the search, not a broken sweep
        logging.getLogger("flat_ray.tune").warning("%s", exc)
    finally:  # a run that failed before evaluating the original hands the evaluation to the next trial
        if cache:
            original.release(cache, trial)


CLAIM_WITHOUT_RUN_S = 600  # a claiming trial with no run after this long died before opening it


def _original_turn(cfg, payload: dict[str, Any], trial: str) -> str | None:
    """Where this trial's cell keeps its evaluation of the original (per-question suites only), after waiting while
    another trial of the cell evaluates it (flat_ray.eval.original)."""
    from flat_ray.data import BENCHMARKS

    if not cfg.eval.enabled or BENCHMARKS[cfg.data.benchmark].evaluation != "tofu":
        return None
    cache = original.cache_dir(payload["originals"], cfg)
    root = storage_root(cfg)

    def ended(holder: str) -> bool:
        state = root / holder / STATE_FILE
        if not state.is_file():  # a run writes it within seconds of starting: a claim this old lost its trial
            claimed = cache.with_name(f"{cache.name}.claim")
            return claimed.is_file() and time.time() - claimed.stat().st_mtime > CLAIM_WITHOUT_RUN_S
        saved = json.loads(state.read_text())
        try:
            return tracking.run_data(saved["mlflow_uri"], saved["run_id"]).info.status != "RUNNING"
        except Exception:  # noqa: BLE001 - MLflow away for a moment: ask again at the next poll
            return False

    original.claim(cache, trial, ended, poll_s=5.0, stop=_stopping())
    return str(cache)


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


_BOARD: SweepBoard | None = None  # the running sweep's board; Tune pickles its callbacks, so they look it up


class _Board(tune.Callback):
    """Feeds Tune's trial events to the running sweep's :class:`SweepBoard` (a live table on a terminal). It holds
    no state: Tune saves its callbacks with the experiment (and a resume brings back that copy)."""

    @staticmethod
    def _board() -> SweepBoard | None:
        return _BOARD

    @staticmethod
    def _sampled(trial) -> str:
        return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())

    def on_trial_start(self, iteration, trials, trial, **info):
        if board := self._board():
            board.started(str(trial), self._sampled(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if board := self._board():
            board.result(str(trial), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if board := self._board():
            board.finished(str(trial), trial.last_result or {}, self._sampled(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        if board := self._board():
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


def _absolute(cell: Cell, base: dict[str, Any], uri: str, storage: Place) -> Cell:
    """Trials run in Ray's processes with their own working directory: make every path absolute."""
    cfg = cell.config
    extra: dict[str, Any] = {"paths.workdir": str(workdir(cfg)), "tracking.mlflow_uri": uri,
                             "launch.storage_path": str(storage / "train")}
    for key, value in (("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer),
                       ("data.data_dir", cfg.data.data_dir),
                       ("data.template_file", cfg.data.template_file), ("eval.reference", cfg.eval.reference)):
        if value and Path(value).expanduser().exists():
            extra[key] = str(Path(value).expanduser().resolve())
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


def _connect(address: str | None) -> None:
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    # Tune's console tables (even at verbose=0 the new output engine prints a configuration box); flat-ray
    # shows its own trial table and the report instead
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    connect_ray(address)


def _device(path: Path) -> int:
    """The filesystem ``path`` is (or would be created) on."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.stat().st_dev


def _check_cluster(space: Space, address: str | None, storage: Place | None, uri: str) -> dict[str, int]:
    """Concurrency per cell, and shared storage plus a server MLflow wherever trials run on other nodes.

    A cell whose trial no node type can ever hold is refused (one line naming the node types and the request).
    Otherwise it runs as many trials at once as fit the cluster at its largest: the autoscaler's node types at
    their max_workers where the autoscaler has told Ray its node types, else the nodes alive now. Tune starts what
    fits now; the other trials wait, and the autoscaler sees their demand (a cluster whose GPU nodes scale from
    zero has no room for any trial when the sweep starts). Trials that wait for nodes the autoscaler will add run
    on other nodes, so they need the multi-node storage and MLflow as well, and the work folder (sweep state, trial
    outputs, exports), which the head reads back, on the storage path's filesystem (with cloud storage that cannot
    be checked: the work folder must be a shared mount)."""
    from flat_ray.launch.cluster import check_cell

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    out, waiting = {}, []
    for cell in space.cells:
        now, most = check_cell(cell.config, cell.name)  # refuses a trial that no node type can ever hold
        if now < most:  # some of its trials run on nodes the autoscaler has yet to add
            waiting.append(cell.name)
        out[cell.name] = most
    where = (f"the Ray cluster has {len(nodes)} nodes" if len(nodes) > 1 else
             f"cell {waiting[0]} waits for nodes the autoscaler adds" if waiting else None)
    if where and storage is None:
        raise FlatRayError(f"{where}: pass --storage-path on shared storage (an NFS mount) so every node sees the "
                           "checkpoints")
    if where and uri.startswith("sqlite:"):
        raise FlatRayError(f"{where} but MLflow is a local SQLite file ({uri}); pass --mlflow-uri http://HEAD:5000 "
                           "(the server cluster.yaml starts)")
    work = workdir(space.cells[0].config)
    if where and storage.local and _device(work) != _device(storage.local):
        raise FlatRayError(f"{where}: the work folder {work} (sweep state, trial outputs, exports) is not on the "
                           f"filesystem of --storage-path {storage}, so the head would not see what the trials "
                           f"write; set paths.workdir on the shared mount (e.g. paths.workdir={storage / 'work'})")
    return out


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
        from flat_ray.report import saved_space

        space, state = saved_space(resume, workdir_hint)
        name, address = state["name"], address or state.get("address")
        storage_path, mlflow_uri = state["storage_path"], state["mlflow_uri"]
    else:
        space = load_space(space_name, overrides)
        name = name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise FlatRayError(f"sweep name {name!r} may only use letters, digits, '_', '.' and '-'")
    space, sweep_dir, storage, uri = plan_sweep(space, name=name, address=address, storage_path=storage_path,
                                                mlflow_uri=mlflow_uri)
    if not resume and (sweep_dir / SWEEP_FILE).exists():
        raise FlatRayError(f"a sweep named {name!r} already exists in {sweep_dir.parent}; pass --resume {name} "
                           "or choose another --name")
    _connect(address)
    concurrency = _check_cluster(space, address, Place.of(storage_path) if storage_path else None, uri)
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
    parent = _open_parent(space, name, sweep_dir, storage, uri, table, address, storage_path, state)
    echo(f"sweep {name}: {space.total_trials()} trials in {len(space.cells)} cell(s), MLflow parent run "
         f"{parent.run_id}\n{table}")
    global _BOARD
    with parent.system_metrics():
        _BOARD = SweepBoard(space.objective, space.modes, echo)
        try:
            errored = sum(_run_cell(space, cell, name, sweep_dir, storage, uri, parent.run_id,
                                    concurrency[cell.name], echo) for cell in space.cells)
        finally:
            _BOARD.close()
            _BOARD = None
    report = _close_parent(parent, space, sweep_dir, started, errored)
    echo(report.text)
    return SweepResult(name, sweep_dir, parent.run_id, uri, space.total_trials(), errored,
                       time.monotonic() - started)


def _describe_sweep(space: Space, name: str, result: str = "") -> str:
    """The sweep's one-paragraph description (the parent run's ``mlflow.note.content``)."""
    text = (f"Sweep {name} of search space {space.name}: {space.total_trials()} trials in {len(space.cells)} "
            f"cell(s) ({', '.join(c.name for c in space.cells)}); search {space.algorithm}, scheduler "
            f"{space.scheduler}, objective {', '.join(f'{m} ({o})' for m, o in zip(space.objective, space.modes, strict=True))}."
            f" {space.description}")
    return text + (f" Best: {result}." if result else "")


def _open_parent(space: Space, name: str, sweep_dir: Path, storage: Place, uri: str, table: str,
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
                                     "mlflow.note.content": _describe_sweep(space, name),
                                     **tracking.standard_tags("flat-ray tune")})
        atomic_write_text(sweep_dir / SWEEP_FILE, json.dumps({
            "name": name, "space": space.name, "space_path": space.path, "overrides": space.overrides,
            "parent_run_id": parent.run_id, "mlflow_uri": uri, "storage": str(storage),
            "storage_path": str(storage.parent) if storage_path else None, "address": address,
            "objective": space.objective, "modes": space.modes, "report": space.report,
            "cells": [c.name for c in space.cells]}, indent=2))
    _log_parent_inputs(parent, space, sweep_dir)
    return parent


def _log_parent_inputs(parent: tracking.Tracker, space: Space, sweep_dir: Path) -> None:
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


def _run_cell(space: Space, cell: Cell, name: str, sweep_dir: Path, storage: Place, uri: str, parent_run_id: str,
              concurrency: int, echo: Callable[[str], None] = log.info) -> int:
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
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True,
                                   param_space=param_space(cell) or None)
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
                                      callbacks=[_Board()]))
    with _CtrlC() as ctrl_c:
        results = tuner.fit()
    # what a trial stopped at the end left behind would hold its resources for as long as this driver lives
    release_orphaned_placement_groups(wait_s=ORPHAN_WAIT_S, cell_done=True)
    states = _trial_states(results)
    expected = space.num_samples if space.algorithm == "optuna" else cell.trials(space.num_samples)
    # Tune ends the running trials on Ctrl-C (TERMINATED, like finished ones) but saves them as unfinished
    if ctrl_c.count or len(states) < expected or any(s not in ("TERMINATED", "ERROR") for s in states.values()):
        _close_cut_off_trials(uri, parent_run_id)
        raise RunFailed(f"sweep {name} was interrupted in cell {cell.name}; continue it with "
                        f"`flat-ray tune --resume {name}` (finished trials are kept)")
    _close_stopped_trials(uri, parent_run_id, states)
    _finish_outputs(space, cell, sweep_dir, storage, uri, parent_run_id, echo)
    return sum(s == "ERROR" for s in states.values())


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


def _close_parent(parent: tracking.Tracker, space: Space, sweep_dir: Path, started: float, errored: int):
    """The report (files and figures on the parent), each benchmark's best result as parent metrics, the
    description with the result, and the parent's end status."""
    report = write_report(sweep_dir)
    for path in report.files:
        parent.log_artifact(path, "report")
    best = report.best_metrics()
    parent.log_metrics({"sweep_s": time.monotonic() - started, "trials_errored": errored, **best}, step=0)
    summary = "; ".join(f"{k} {v:.4g} (epoch {best.get(k.rsplit('/', 1)[0] + '/epoch', 0):.0f})"
                        for k, v in best.items() if k.endswith("/" + space.objective[0]))
    parent.set_tags({"mlflow.note.content": _describe_sweep(space, sweep_dir.name, summary)})
    parent.finish("FINISHED" if errored == 0 else "FAILED")
    return report


def _trial_states(results) -> dict[str, str]:
    """Tune's status of every trial of a finished ``Tuner.fit()``, by trial name."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []
    return {str(t): t.status for t in trials}


def _close_stopped_trials(uri: str, parent_run_id: str, states: dict[str, str]) -> None:
    """A trial the scheduler stopped early is TERMINATED for Tune, but its ``run_training`` never finished (it
    was cut off: its MLflow run is KILLED by its own process, or still RUNNING where that process was killed
    first): mark it KILLED with ``stopped_early=true``."""
    for run in tracking.child_runs(uri, parent_run_id):
        tags = run.data.tags
        stopped = states.get(tags.get("flat_ray.trial", "")) == "TERMINATED" and tags.get("diverged") != "true"
        if stopped and run.info.status in ("RUNNING", "FAILED", "KILLED"):
            tracking.set_status(uri, run.info.run_id, "KILLED", {"stopped_early": "true"})


def _close_cut_off_trials(uri: str, parent_run_id: str) -> None:
    """An interrupted sweep's trials have all stopped, but one stopped while starting up never closed its MLflow run:
    mark every run still RUNNING as KILLED (a resume reopens it)."""
    for run in tracking.child_runs(uri, parent_run_id):
        if run.info.status == "RUNNING":
            tracking.set_status(uri, run.info.run_id, "KILLED", {})


def trial_table_with(space: Space, concurrency: dict[str, int]) -> list[dict[str, Any]]:
    rows = trial_table(space, [])
    for row in rows:
        row["concurrent"] = concurrency[row["cell"]]
    return rows

