"""A search space's vocabulary as Ray Tune objects: sampled axes as ``ray.tune`` domains, the searchers and the
schedulers behind the names of :mod:`flat_ray.sweep`'s registries (the same keys, tested)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray import tune

from flat_ray.sweep import Cell, Space, Spec


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


# Searchers limit concurrency themselves (Tune ignores ``max_concurrent_trials`` for the basic one).
SEARCH_BUILDERS: dict[str, Callable[[Space, Cell, int], Any]] = {"basic": _basic, "optuna": _optuna}

SCHEDULER_BUILDERS: dict[str, Callable[[Space, Cell], Any]] = {"fifo": _fifo, "asha": _asha}

