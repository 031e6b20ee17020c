"""The Ray cluster a run or sweep is joined to: its node types, whether a trial can ever be placed there, and the
line a run shows while Ray and the autoscaler find room for it.

A run never compares what it wants with what the cluster has *now*: on a cluster whose GPU nodes scale from zero
that is nothing, and a run that refused to start would never show the autoscaler its demand. It is refused only
when no node type can ever hold it; otherwise it asks Ray for its workers and waits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flat_ray.config import RunConfig
from flat_ray.errors import FlatRayError
from flat_ray.placement import (
    NodeType,
    check_holdable,
    describe_request,
    landing,
    max_trials,
    node_types_from_yaml,
)

log = logging.getLogger(__name__)
UNBOUNDED = 1000  # an autoscaler node type without a max_workers limit
CLUSTER_CONFIG_ENV = "FLAT_RAY_CLUSTER_CONFIG"


def node_types() -> tuple[list[NodeType], bool]:
    """The node types of the joined cluster, each at the most nodes it may have, and whether they come from an
    autoscaler: those the autoscaler has told Ray (autoscaler v2, KubeRay), else those of the autoscaling config
    on this node (``ray up`` leaves it on the head as ``~/ray_bootstrap_config.yaml``, which Ray Tune also takes
    as the sign of an autoscaling cluster; ``FLAT_RAY_CLUSTER_CONFIG`` names another file), else the nodes alive
    now, one type each (a cluster without an autoscaler never grows)."""

    groups = _autoscaler_groups()
    if groups:
        return groups, True
    config = Path(os.environ.get(CLUSTER_CONFIG_ENV, "~/ray_bootstrap_config.yaml")).expanduser()
    if config.is_file():
        return node_types_from_yaml(config), True
    return _alive_nodes(), False


def _alive_nodes() -> list[NodeType]:
    """The nodes alive now, one type each, with their total resources."""
    import ray

    return [NodeType(f"node {n['NodeManagerAddress']}", _plain(n.get("Resources", {})), 1)
            for n in ray.nodes() if n.get("Alive")]


def _autoscaler_groups() -> list[NodeType]:
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS, a Ray Client driver: no node types known
        return []
    if config is None:
        return []
    return [NodeType(g.name, _plain(dict(g.resources)), UNBOUNDED if g.max_count == -1 else g.max_count)
            for g in config.node_group_configs]


def _plain(resources: dict) -> dict[str, float]:
    """Ray's schedulable resources of a node, without its per-node markers (``node:<ip>``) and the object store."""
    return {k: float(v) for k, v in resources.items()
            if not k.startswith("node:") and k != "object_store_memory"}


def room_now(cfg: RunConfig, model_path: str | None = None) -> bool:
    """Whether the nodes alive now have the free resources to start this run's workers."""
    import ray
    from ray._private.state import state

    free = state.available_resources_per_node()
    now = [NodeType(node_id, _plain(res), 1) for node_id, res in free.items()]
    return bool(ray.nodes()) and max_trials(cfg, now, model_path) >= 1


def _holdable(cfg: RunConfig, what: str, model_path: str | None = None) -> tuple[list[NodeType], bool]:
    """The cluster's node types, once it is known that one of them can hold the trial (else a one-line refusal)."""
    types, autoscaling = node_types()
    try:
        check_holdable(cfg, types, what, model_path)
    except FlatRayError as exc:
        if autoscaling or cfg.launch.address is None:  # a local Ray is what it is
            raise
        raise FlatRayError(f"{exc} (these are the nodes alive now: on an autoscaling cluster run flat-ray on its "
                           f"head, where `ray up` leaves ~/ray_bootstrap_config.yaml, or set {CLUSTER_CONFIG_ENV} to "
                           "its cluster YAML)") from None
    return types, autoscaling


def check_run(cfg: RunConfig, name: str, model_path: str | None = None) -> None:
    """Refuse a run that no node type can hold; say so when it will wait for room (a node the autoscaler adds,
    another run's workers to finish)."""
    types, autoscaling = _holdable(cfg, f"run {name}", model_path)
    if room_now(cfg, model_path):
        return
    node = landing(cfg, types, model_path)
    why = (f"waiting for the autoscaler to add a {node.name} node" if autoscaling and node is not None
           else "waiting for running work to free it")
    log.info("run %s asks Ray for %s; no node has room for it now: %s", name, describe_request(cfg, model_path), why)


def check_cell(cfg: RunConfig, cell: str) -> tuple[int, int]:
    """Refuse a cell whose trials no node type can hold; returns how many of its trials fit the cluster now and
    at its largest (the same where it cannot grow)."""
    types, _ = _holdable(cfg, f"cell {cell}: one trial")
    return max_trials(cfg, _alive_nodes()), max_trials(cfg, types)
