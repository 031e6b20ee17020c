"""Search spaces: YAML data that describes a sweep, parsed and validated here without importing Ray.

A space file (see ``search_spaces/`` and docs/sweeps.md)::

    name: demo
    base: [demo]                       # presets and/or a config file (relative to the space file)
    set: {optim.epochs: 4}             # constants for every trial
    grid:                              # the cells: models x benchmarks x methods, each its own Tune experiment
      model: [demo]
      benchmark: [demo/forget10]
      method: [flat, {name: npo, params: {optim.lr: {loguniform: [1e-4, 1e-3]}}}]
    params:                            # sampled per trial, inside each cell
      optim.lr: {loguniform: [3e-4, 1e-3]}
      method.divergence: {grid: [tv, kl, js, pearson]}
    num_samples: 1
    search: {algorithm: basic, seed: 0}   # basic (grid + random) or optuna
    scheduler: {name: fifo}               # or {name: asha, grace_period: 1, reduction_factor: 2}
    objective: unlearn_score              # a metric-registry name; optuna also takes a list
    resources: {num_workers: 2, cpus_per_worker: 0.99, gpus_per_worker: 0, deepspeed_stage: 3}
    report: {forget: [...], utility: [...], pareto: [x_metric, y_metric]}
    export: best_trial                    # or every_trial, or none

Every grid entry is a name or ``{name, set, params}``; its ``set`` adds constants and its ``params`` add or
replace sampled axes for that cell only (e.g. a divergence axis only for FLAT). Each grid cell is a separate
Tune experiment because a searcher or scheduler should compare trials of one model on one benchmark, never
across them. Values are checked against the config schema and the registries (methods, divergences,
benchmarks, metrics) by building the config at every listed value and at both ends of every range.

Trials rank their checkpoints by the first objective (``launch.checkpoint_metric``) and
export nothing themselves; with ``export: best_trial`` the sweep exports the best epoch of each cell's best trial
when the cell ends, with ``every_trial`` each trial exports its last epoch, with ``none`` nothing is exported
(``flat-ray export`` can do it later from the kept checkpoints).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flat_ray.config import (
    PRESETS,
    RunConfig,
    _merge,
    all_keys,
    apply_overrides,
    preset,
    read_yaml,
)
from flat_ray.config import _build as build_config
from flat_ray.errors import FlatRayError
from flat_ray.metrics import METRICS
from flat_ray.preflight import check_inputs, check_model
from flat_ray.registry import Registry

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
AXES = ("model", "benchmark", "method")
TOP_KEYS = ("name", "description", "base", "set", "grid", "params", "num_samples", "search", "scheduler",
            "objective", "resources", "report", "export", "references")
EXPORTS = ("best_trial", "every_trial", "none")
SEARCH_KEYS = ("algorithm", "seed")
SCHEDULER_KEYS = ("name", "grace_period", "reduction_factor")
RESOURCE_KEYS = {"num_workers": "launch.num_workers", "cpus_per_worker": "launch.cpus_per_worker",
                 "gpus_per_worker": "launch.gpus_per_worker", "deepspeed_stage": "deepspeed.stage",
                 "accelerator_type": "launch.accelerator_type"}
TRIAL_FN_CPU = 0.01  # the per-trial driver function only waits on its TorchTrainer
# metrics that only exist when the run has a forget-quality reference
NEEDS_REFERENCE = ("forget_quality", "tofu_score")

# search algorithms and schedulers: registry keys; the Ray objects are built in flat_ray.launch.tune
SEARCHERS: Registry[str] = Registry("search algorithm")
SEARCHERS.register("basic", "grid axes in full, random sampling of the rest (Ray's BasicVariantGenerator)",
                   aliases=("grid", "random"))
SEARCHERS.register("optuna", "Optuna TPE; single- or multi-objective; no grid axes inside a cell")
SCHEDULERS: Registry[str] = Registry("scheduler")
SCHEDULERS.register("fifo", "every trial runs all its epochs")
SCHEDULERS.register("asha", "asynchronous successive halving on the per-epoch objective (single objective)")


@dataclass(frozen=True)
class Spec:
    """One sampled axis: ``kind`` in KINDS, ``args`` its values (grid/choice) or bounds."""

    kind: str
    args: tuple

    def size(self) -> int:
        """How many trials this axis multiplies a cell by (1 for sampled axes)."""
        return len(self.args) if self.kind == "grid" else 1

    def probes(self) -> list[Any]:
        """Values that must all build a valid config."""
        if self.kind in ("grid", "choice"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def describe(self) -> str:
        if self.kind in ("grid", "choice"):
            return f"{self.kind}[{', '.join(map(str, self.args))}]"
        return f"{self.kind}({self.args[0]:g}, {self.args[1]:g})"

    def to_data(self) -> dict[str, list]:
        return {self.kind: list(self.args)}


@dataclass
class Cell:
    """One (model, benchmark, method) combination: a config and its sampled axes."""

    name: str
    labels: dict[str, str]  # axis -> entry name
    config: RunConfig  # constants applied; sampled axes at their first probe value
    constants: dict[str, Any]  # dotted key -> value (what ``config`` was built from, on top of ``base``)
    params: dict[str, Spec]

    def trials(self, num_samples: int) -> int:
        return num_samples * math.prod(s.size() for s in self.params.values())


@dataclass
class Space:
    name: str
    path: str
    description: str
    base: dict[str, Any]
    cells: list[Cell]
    num_samples: int
    algorithm: str
    seed: int
    scheduler: str
    scheduler_args: dict[str, Any]
    objective: list[str]
    report: dict[str, list[str]]
    export: str = "best_trial"  # EXPORTS
    text: str = ""  # the space file as given (logged with the sweep)
    overrides: list[str] = field(default_factory=list)

    @property
    def modes(self) -> list[str]:
        return [METRICS[m].mode for m in self.objective]

    def total_trials(self) -> int:
        return sum(c.trials(self.num_samples) for c in self.cells)


# ----------------------------------------------------------------------------------------------- finding files
def spaces_dir() -> Path:
    """Where the shipped spaces are: the checkout's ``search_spaces/`` (source and editable installs), else
    ``<prefix>/share/flat-ray/search_spaces`` (a normal install puts them there)."""
    here = Path(__file__).resolve()
    # checkout; <prefix>/lib/pythonX.Y/site-packages/flat_ray -> <prefix>/share (venv, --prefix, --user); sys.prefix
    prefixes = [here.parents[4]] if len(here.parents) > 4 else []
    for candidate in (here.parents[1] / "search_spaces",
                      *(p / "share" / "flat-ray" / "search_spaces" for p in [*prefixes, Path(sys.prefix)])):
        if candidate.is_dir():
            return candidate
    raise FlatRayError(f"the shipped search spaces are missing (looked in the checkout and {sys.prefix}/share); "
                       "reinstall flat-ray or give --space PATH")


def shipped_spaces() -> list[str]:
    """Names of the search spaces installed with flat-ray (``search_spaces/*.yaml``)."""
    return sorted(p.stem for p in spaces_dir().glob("*.yaml"))


def find_space(name_or_path: str) -> tuple[str, str]:
    """``(text, path)`` of a shipped space (by name) or a YAML file. A shipped name wins over a folder of that name
    (a clone of locuslab/tofu in the working directory is where the tofu spaces look for their references)."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.is_file() or "/" in name_or_path or (
            p.exists() and name_or_path not in shipped_spaces()):
        if not p.is_file():
            raise FlatRayError(f"search space file {name_or_path!r} does not exist; shipped spaces: "
                               f"{', '.join(shipped_spaces())}")
        return p.read_text(encoding="utf-8"), str(p.resolve())
    if name_or_path not in shipped_spaces():
        raise FlatRayError(f"unknown search space {name_or_path!r}; shipped spaces: {', '.join(shipped_spaces())} "
                           "(or give a path to a .yaml file)")
    res = spaces_dir() / f"{name_or_path}.yaml"
    return res.read_text(encoding="utf-8"), f"search_spaces/{name_or_path}.yaml"


# ---------------------------------------------------------------------------------------------------- parsing
def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FlatRayError(f"{where} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _check_keys(d: Mapping, allowed: Sequence[str], where: str) -> None:
    for key in d:
        if key not in allowed:
            raise FlatRayError(f"unknown key {key!r} in {where}; valid keys: {', '.join(allowed)}")


def _dotted(key: Any, where: str) -> str:
    if not isinstance(key, str) or key not in set(all_keys()):
        from flat_ray.config import _unknown_key

        raise FlatRayError(f"{where}: {_unknown_key(str(key))}")
    return key


def parse_spec(key: str, value: Any) -> Spec | None:
    """``{loguniform: [1e-6, 1e-4]}`` -> Spec; a scalar -> None (a constant)."""
    if not isinstance(value, Mapping):
        if isinstance(value, list):
            raise FlatRayError(f"params.{key}: a list is ambiguous; write {{grid: [...]}} or {{choice: [...]}}")
        return None
    if len(value) != 1 or next(iter(value)) not in KINDS:
        raise FlatRayError(f"params.{key} must be a constant or one of {{{'|'.join(KINDS)}: [...]}}, got {dict(value)}")
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        raise FlatRayError(f"params.{key}.{kind} needs a non-empty list, got {args!r}")
    if kind in ("grid", "choice"):
        if any(isinstance(a, (list, dict)) for a in args):
            raise FlatRayError(f"params.{key}.{kind}: values must be scalars")
        return Spec(kind, tuple(args))
    if len(args) != 2:
        raise FlatRayError(f"params.{key}.{kind} needs [low, high], got {args!r}")
    try:
        low, high = (float(a) for a in args)  # YAML 1.1 reads 1e-5 as a string
    except (TypeError, ValueError):
        raise FlatRayError(f"params.{key}.{kind}: bounds must be numbers, got {args!r}") from None
    if not low < high:
        raise FlatRayError(f"params.{key}.{kind}: low must be below high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise FlatRayError(f"params.{key}.loguniform: bounds must be > 0, got {args!r}")
    if kind == "randint":
        if not all(float(a).is_integer() for a in (low, high)):
            raise FlatRayError(f"params.{key}.randint: bounds must be integers (high exclusive), got {args!r}")
        return Spec(kind, (int(low), int(high)))
    return Spec(kind, (low, high))


def _params(raw: Any, where: str) -> tuple[dict[str, Spec], dict[str, Any]]:
    specs, constants = {}, {}
    for key, value in _mapping(raw, where).items():
        key = _dotted(key, where)
        spec = parse_spec(key, value)
        if spec is None:
            constants[key] = value
        else:
            specs[key] = spec
    return specs, constants


def _shorthand(axis: str, name: str) -> dict[str, Any]:
    if axis == "model":
        return {"model.name_or_path": name}
    if axis == "method":
        return {"method.name": name}
    bench, _, split = name.partition("/")
    return {"data.benchmark": bench, **({"data.split": split} if split else {})}


@dataclass
class _Entry:
    axis: str
    name: str
    constants: dict[str, Any]
    params: dict[str, Spec]


def _entries(axis: str, raw: Any) -> list[_Entry]:
    if raw is None:
        return [_Entry(axis, "", {}, {})]
    if not isinstance(raw, list) or not raw:
        raise FlatRayError(f"grid.{axis} must be a non-empty list of names or {{name, set, params}} mappings")
    out = []
    for item in raw:
        where = f"grid.{axis}"
        if isinstance(item, str):
            out.append(_Entry(axis, item, _shorthand(axis, item), {}))
            continue
        item = _mapping(item, where + " entry")
        _check_keys(item, ("name", "set", "params"), where + " entry")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise FlatRayError(f"{where} entry needs a name, got {dict(item)}")
        sets = {_dotted(k, f"{where}[{name}].set"): v for k, v in _mapping(item.get("set"), f"{where}[{name}].set").items()}
        specs, consts = _params(item.get("params"), f"{where}[{name}].params")
        out.append(_Entry(axis, name, {**_shorthand(axis, name), **sets, **consts}, specs))  # set wins
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise FlatRayError(f"grid.{axis} names must be unique, got {names}")
    return out


def _base(raw: Any, space_path: str) -> dict[str, Any]:
    items = [raw] if isinstance(raw, str) else (raw or [])
    if not isinstance(items, list):
        raise FlatRayError("base must be a preset name, a config path or a list of them")
    data: dict[str, Any] = {}
    for item in items:
        if item in PRESETS:
            data = _merge(data, preset(item))
            continue
        path = Path(str(item)).expanduser()
        if not path.is_absolute() and Path(space_path).is_file():
            path = Path(space_path).parent / path
        if not path.is_file():
            raise FlatRayError(f"base {item!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")
        data = _merge(data, read_yaml(path))
    return data


def _cell_name(labels: Mapping[str, str]) -> str:
    raw = "-".join(v for v in labels.values() if v) or "cell"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw) or "cell"


def _as_overrides(values: Mapping[str, Any]) -> list[str]:
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in values.items()]


def build_cell_config(base: Mapping[str, Any], constants: Mapping[str, Any], sampled: Mapping[str, Any]) -> RunConfig:
    """The config of one trial: base <- constants <- sampled values."""
    data = copy.deepcopy(dict(base))  # apply_overrides edits sections in place; the space's base must not change
    data = apply_overrides(data, _as_overrides(constants))
    data = apply_overrides(data, _as_overrides(sampled))
    return build_config(RunConfig, data)


def load_space(name_or_path: str, overrides: Sequence[str] = (), check_files: bool = True) -> Space:
    """Parse and validate a space; ``overrides`` (``key=value``) become constants of every trial. A dry run
    (``check_files=False``) accepts forget-quality references that are not there yet and shows them as missing."""
    text, path = find_space(name_or_path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FlatRayError(f"search space {path} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    raw = _mapping(raw, f"search space {path}")
    _check_keys(raw, TOP_KEYS, f"search space {path}")
    base = _base(raw.get("base"), path)
    consts, specs = _sweep_values(raw)
    from flat_ray.config import parse_override

    cli = dict(parse_override(o) for o in overrides)
    for key in cli:
        _dotted(key, "override")
    algorithm, seed = _search(raw)
    scheduler, sched = _scheduler(raw)
    objective = _objective(raw, algorithm, scheduler)
    num_samples = raw.get("num_samples", 1)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise FlatRayError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    export = raw.get("export", "best_trial")
    if export not in EXPORTS:
        raise FlatRayError(f"export {export!r} is not valid; valid choices: {', '.join(EXPORTS)}")
    cells = [_trial_outputs(c, base, export, objective[0])
             for c in _cells(raw, base, consts, specs, cli, algorithm, objective, check_files)]
    return Space(str(raw.get("name") or Path(path).stem), path, str(raw.get("description", "")), base, cells,
                 num_samples, algorithm, seed, scheduler, sched, objective, _report(raw), export, text,
                 list(overrides))


def _trial_outputs(cell: Cell, base: Any, export: str, objective: str) -> Cell:
    """What a trial writes: its last epoch only with ``export: every_trial``; its checkpoints ranked by the
    objective, which also picks its one result (its best epoch: what the report shows and the cell exports)."""
    ranked = cell.constants.get("launch.checkpoint_metric", objective)
    if ranked is None or METRICS.canonical(str(ranked)) != objective:
        raise FlatRayError(f"launch.checkpoint_metric={ranked} in a sweep: a sweep ranks every trial's epochs by its "
                           f"first objective ({objective}); remove launch.checkpoint_metric from the space")
    extra: dict[str, Any] = {"launch.export": "last" if export == "every_trial" else "none",
                             "launch.checkpoint_metric": objective}
    return with_constants(cell, extra, base)


def _sweep_values(raw: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sweep-wide constants (``set``, ``resources``, constant ``params``) and search axes (``params``)."""
    consts = {_dotted(k, "set"): v for k, v in _mapping(raw.get("set"), "set").items()}
    resources = _mapping(raw.get("resources"), "resources")
    _check_keys(resources, list(RESOURCE_KEYS), "resources")
    consts.update({RESOURCE_KEYS[k]: v for k, v in resources.items()})
    specs, more = _params(raw.get("params"), "params")
    consts.update(more)
    return consts, specs


def _search(raw: dict) -> tuple[str, int]:
    search = _mapping(raw.get("search"), "search")
    _check_keys(search, SEARCH_KEYS, "search")
    seed = search.get("seed", 0)
    if not isinstance(seed, int):
        raise FlatRayError(f"search.seed must be an integer, got {seed!r}")
    return SEARCHERS.canonical(str(search.get("algorithm", "basic"))), seed


def _scheduler(raw: dict) -> tuple[str, dict[str, int]]:
    sched = _mapping(raw.get("scheduler"), "scheduler")
    _check_keys(sched, SCHEDULER_KEYS, "scheduler")
    scheduler = SCHEDULERS.canonical(str(sched.pop("name", "fifo")))
    for key, value in sched.items():
        if not isinstance(value, int) or value < 1:
            raise FlatRayError(f"scheduler.{key} must be an integer >= 1, got {value!r}")
    return scheduler, sched


def _objective(raw: dict, algorithm: str, scheduler: str) -> list[str]:
    objective = raw.get("objective", "unlearn_score")
    objective = [objective] if isinstance(objective, str) else objective
    if not isinstance(objective, list) or not objective:
        raise FlatRayError("objective must be a metric name or (optuna) a list of metric names")
    objective = [METRICS.canonical(m) for m in objective]
    for metric in objective:
        if METRICS[metric].role == "diagnostic":
            raise FlatRayError(f"metric {metric} has no better direction and cannot be an objective"
                               + ("; use privleak_gap (|privleak|)" if metric.startswith("privleak") else ""))
    if len(objective) > 1 and algorithm != "optuna":
        raise FlatRayError(f"a multi-objective sweep ({', '.join(objective)}) needs search.algorithm=optuna")
    if len(objective) > 1 and scheduler == "asha":
        raise FlatRayError("scheduler asha needs a single objective; use fifo with several objectives")
    return objective


def _report(raw: dict) -> dict[str, list[str]]:
    report = _mapping(raw.get("report"), "report")
    _check_keys(report, ("forget", "utility", "pareto"), "report")
    report = {k: [METRICS.canonical(m) for m in (report.get(k) or [])] for k in ("forget", "utility", "pareto")}
    if report["pareto"] and len(report["pareto"]) != 2:
        raise FlatRayError(f"report.pareto needs two metrics (x: forget, y: utility), got {report['pareto']}")
    return report


def _cells(raw: dict, base: list[str], sweep_consts: dict[str, Any], sweep_specs: dict[str, Any],
           cli: dict[str, Any], algorithm: str, objective: list[str], check_files: bool = True) -> list[Cell]:
    """One cell per combination of the grid's entries: sweep-wide values, then the entries' (and the cell's
    ``references`` entry), then the command line's overrides (which may not touch a search axis)."""
    grid = _mapping(raw.get("grid"), "grid")
    _check_keys(grid, AXES, "grid")
    axes = [_entries(axis, grid.get(axis)) for axis in AXES]
    references = _references(raw, axes)
    cells = []
    for combo in _product(axes):
        labels = {e.axis: e.name for e in combo}
        consts = dict(sweep_consts)
        if references:
            consts["eval.reference"] = references[f"{labels['model']}/{labels['benchmark']}"]
        specs = dict(sweep_specs)
        for entry in combo:
            consts.update(entry.constants)
            specs.update(entry.params)
            for key in entry.constants:
                specs.pop(key, None)  # a cell's constant wins over a sweep-wide axis of the same key
        for key in cli:
            if key in specs:
                raise FlatRayError(f"override {key} is a search axis of this space; change the space file instead")
        consts.update(cli)
        for key in specs:
            consts.pop(key, None)
        cells.append(_cell(labels, base, consts, specs, algorithm, objective, check_files))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise FlatRayError(f"grid entries give duplicate cell names: {names}")
    return cells


def _references(raw: dict, axes: list[list[_Entry]]) -> dict[str, str]:
    """``references``: each (model, benchmark) pair's forget-quality reference, keyed ``<model>/<benchmark>`` by the
    grid's entry names; every pair needs one."""
    refs = _mapping(raw.get("references"), "references")
    if not refs:
        return {}
    models, benches = axes[AXES.index("model")], axes[AXES.index("benchmark")]
    if not models[0].name or not benches[0].name:
        raise FlatRayError("references needs grid.model and grid.benchmark entries to key them by")
    pairs = [f"{m.name}/{b.name}" for m in models for b in benches]
    unknown = [k for k in refs if k not in pairs]
    if unknown:
        raise FlatRayError(f"references: unknown cell {unknown[0]!r}; valid keys (<model>/<benchmark>): "
                           f"{', '.join(pairs)}")
    missing = [k for k in pairs if not isinstance(refs.get(k), str) or not refs.get(k)]
    if missing:
        raise FlatRayError(f"references: no path for {', '.join(missing)}; every <model>/<benchmark> of the grid needs "
                           "its retain model's eval logs")
    return {k: str(v) for k, v in refs.items()}


def _product(axes: list[list[_Entry]]) -> list[tuple[_Entry, ...]]:
    out: list[tuple[_Entry, ...]] = [()]
    for entries in axes:
        out = [prev + (e,) for prev in out for e in entries]
    return out


def _cell(labels: dict[str, str], base: Mapping[str, Any], consts: dict[str, Any],
          specs: dict[str, Spec], algorithm: str, objective: list[str], check_files: bool = True) -> Cell:
    where = f"cell {_cell_name(labels)}"
    first = {k: s.probes()[0] for k, s in specs.items()}
    cfg = None
    try:
        cfg = build_cell_config(base, consts, first)
    except FlatRayError as exc:
        try:  # a mistake in the constants (an override, a set) is no axis's fault: do not blame the first one
            build_cell_config(base, consts, {})
        except FlatRayError:
            raise FlatRayError(f"{where}: {exc}") from None
    for key, spec in specs.items():
        if algorithm == "optuna" and spec.kind == "grid":
            raise FlatRayError(f"{where}: params.{key} uses grid, which optuna cannot search; use choice")
        for value in spec.probes():
            try:
                build_cell_config(base, consts, {key: value})
            except FlatRayError as exc:
                raise FlatRayError(f"{where}: params.{key}={value!r}: {exc}") from None
    if cfg is None:  # every value builds alone, but not the first ones together
        try:
            cfg = build_cell_config(base, consts, first)
        except FlatRayError as exc:
            raise FlatRayError(f"{where}: {exc}") from None
    # axes the grid does not list are named after the config (model directory name, benchmark/split, method)
    labels = {"model": labels["model"] or Path(cfg.model.name_or_path).name,
              "benchmark": labels["benchmark"] or f"{cfg.data.benchmark}/{cfg.data.split}",
              "method": labels["method"] or cfg.method.name}
    name = _cell_name(labels)
    try:
        check_inputs(cfg, reference=check_files)  # once per cell (the probes above only check values)
        check_model(cfg)
    except FlatRayError as exc:
        raise FlatRayError(f"{where}: {exc}") from None
    if not cfg.eval.enabled:
        raise FlatRayError(f"{where}: the objective needs per-epoch evaluation; remove eval.enabled=false")
    for metric in objective:
        if metric in NEEDS_REFERENCE and not cfg.eval.reference:
            raise FlatRayError(f"{where}: objective {metric} needs forget quality; give the space's references "
                               "(<model>/<benchmark>: a retain model's eval logs) or set eval.reference")
        if metric in NEEDS_REFERENCE and cfg.eval.interim_examples:
            raise FlatRayError(f"{where}: objective {metric} picks each trial's best epoch by forget quality, a "
                               "p-value that grows as the questions get fewer; remove eval.interim_examples so "
                               "every epoch is judged on the same questions")
    return Cell(name, labels, cfg, consts, specs)


def space_summary(space: Space) -> dict[str, Any]:
    """What the sweep's parent run logs as parameters."""
    return {"sweep.space": space.name, "sweep.space_path": space.path, "sweep.algorithm": space.algorithm,
            "sweep.seed": space.seed, "sweep.scheduler": space.scheduler, "sweep.objective": ",".join(space.objective),
            "sweep.modes": ",".join(space.modes), "sweep.num_samples": space.num_samples,
            "sweep.cells": len(space.cells), "sweep.trials": space.total_trials(),
            "sweep.export": space.export, "sweep.overrides": " ".join(space.overrides) or "-"}


def with_constants(cell: Cell, extra: Mapping[str, Any], base: Mapping[str, Any]) -> Cell:
    """A copy of ``cell`` with more constants (e.g. resolved absolute paths), rebuilt and validated."""
    consts = {**cell.constants, **extra}
    cfg = build_cell_config(base, consts, {k: s.probes()[0] for k, s in cell.params.items()})
    return dataclasses.replace(cell, constants=consts, config=cfg)
