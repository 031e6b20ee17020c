"""The Ray cluster a run or sweep is joined to: connecting to it, its node types, whether a trial can ever be placed
there, what a sweep needs on more than one node, the line a run shows while Ray and the autoscaler find room for it,
and the placement groups that stopped Ray Train runs leave behind.

A run never compares what it wants with what the cluster has *now*: on a cluster whose GPU nodes scale from zero
that is nothing, and a run that refused to start would never show the autoscaler its demand. It is refused only
when no node type can ever hold it; otherwise it asks Ray for its workers and waits.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from flat_ray.assets import workdir
from flat_ray.config import RunConfig
from flat_ray.console import verbose
from flat_ray.envinfo import environ, forwarded_env
from flat_ray.errors import FlatRayError
from flat_ray.fileio import filesystem
from flat_ray.launch.records import run_uri
from flat_ray.placement import (
    NodeType,
    check_holdable,
    describe_request,
    landing,
    max_trials,
    node_types_from_yaml,
)
from flat_ray.preflight import node_local_inputs
from flat_ray.storage import Place
from flat_ray.sweep import Space

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
    """Refuse a run that no node type can hold, or whose workers may run on other nodes without shared storage and
    an MLflow server (as a sweep's trials); say so when it will wait for room (a node the autoscaler adds, another
    run's workers to finish)."""
    types, autoscaling = _holdable(cfg, f"run {name}", model_path)
    fits = room_now(cfg, model_path)
    node = None if fits else landing(cfg, types, model_path)
    nodes = len(_alive_nodes())
    where = (f"run {name}: the Ray cluster has {nodes} nodes" if nodes > 1 else
             f"run {name} waits for a {node.name} node the autoscaler adds" if autoscaling and node else None)
    if where:
        storage = Place.of(cfg.launch.storage_path) if cfg.launch.storage_path else None
        require_shared(where, storage, run_uri(cfg), workdir(cfg), "run outputs, evaluation logs, exports", [cfg],
                       RUN_KNOBS)
    if fits:
        return
    why = (f"waiting for the autoscaler to add a {node.name} node" if autoscaling and node is not None
           else "waiting for running work to free it")
    log.info("run %s asks Ray for %s; no node has room for it now: %s", name, describe_request(cfg, model_path), why)


def check_cell(cfg: RunConfig, cell: str) -> tuple[int, int]:
    """Refuse a cell whose trials no node type can hold; returns how many of its trials fit the cluster now and
    at its largest (the same where it cannot grow)."""
    types, _ = _holdable(cfg, f"cell {cell}: one trial")
    return max_trials(cfg, _alive_nodes()), max_trials(cfg, types)


# ------------------------------------------------------------------------------------------- connecting
def ray_address(given: str | None) -> str | None:
    """The Ray cluster a command joins: ``given`` (``--address``, ``launch.address``), else ``RAY_ADDRESS`` (Ray's own
    convention: `ray job submit` sets it for its entrypoint), else None: a Ray of the command's own."""
    return given or os.environ.get("RAY_ADDRESS") or None


def check_address(address: str) -> None:
    """Refuse at once an address no Ray answers at: ``ray.init`` would retry its connection for many minutes. A
    dashboard URL (what `ray job submit` takes) is not a cluster's address either."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise FlatRayError(f"Ray address {address} is a dashboard (Ray Jobs) URL; give the cluster's address "
                           "(HEAD_IP:6379), auto on one of its nodes, or submit the command with `ray job submit`")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise FlatRayError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise FlatRayError(f"no Ray answers at {address} (--address, launch.address or RAY_ADDRESS): "
                           f"{exc.strerror or exc}; is the cluster up? (`ray status --address {address}`)") from None


def start_local_ray(num_cpus: int | None, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Start a Ray of this process's own, even where another Ray runs on the machine (``ray.init`` would join the
    newest `ray start` cluster instead), its processes started with ``env`` and with their own cluster's address
    in ``RAY_ADDRESS``. Without it Ray's state API, through which Ray Train's placement-group cleaner asks whether
    a run's controller is alive, finds the other cluster (/tmp/ray/ray_current_cluster), hears that the controller
    does not exist, and ends or removes the run's placement group."""
    import ray

    port = free_port()
    own = {"RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}", "RAY_GCS_SERVER_PORT": str(port), **(env or {})}
    with environ(own):  # inherited by Ray's processes as they start, then gone from this one
        return ray.init(address="local", num_cpus=num_cpus, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _other_ray() -> str | None:
    """The newest `ray start` cluster of this machine, if one is recorded (Ray's own record of it)."""
    try:
        from ray._private.utils import read_ray_address

        address = read_ray_address()
        socket.create_connection(address.rsplit(":", 1), timeout=1).close()  # a record left by a crash: no hint
        return address
    except Exception:  # nothing recorded, nothing answering, or a private helper of Ray's gone: no hint
        return None


def connect_ray(address: str | None) -> None:
    """Join ``address`` or start a Ray of this process's own sized to the machine. The workers' own output (Ray
    Train, DeepSpeed, transformers) stays in Ray's log files (``<session dir>/logs``, printed at start) unless
    ``flat-ray --verbose``; flat-ray's own progress reaches the console through :mod:`flat_ray.launch.relay`."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    loud = verbose()
    kwargs: dict[str, Any] = {"logging_level": logging.INFO if loud else logging.ERROR, "log_to_driver": loud}
    if address:  # a joined cluster's nodes start workers with their own environment: pass the cache/offline ones
        check_address(address)
        forwarded = forwarded_env()
        try:
            ctx = ray.init(address=address, **({"runtime_env": {"env_vars": forwarded}} if forwarded else {}),
                           **kwargs)
        except ConnectionError as exc:  # auto with no cluster to find, a cluster that refused this process
            raise FlatRayError(f"could not join Ray at {address}: {str(exc).splitlines()[0]}") from None
    else:
        other = _other_ray()
        if other:
            log.warning("a Ray cluster runs on this machine (%s); this command starts a Ray of its own: pass "
                        "--address auto to run on that cluster instead", other)
        ctx = start_local_ray(os.cpu_count(), **kwargs)
    if not loud:  # an errored trial's traceback: the sweep names its error.txt instead
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    session = getattr(ctx, "address_info", {}).get("session_dir")  # a ray:// client context has none
    log.info("Ray %s; worker logs in %s%s", "cluster " + address if address else "started locally",
             f"{session}/logs" if session else "the cluster's Ray session folder",
             "" if loud else " (flat-ray --verbose shows them here)")


def start_ray(cfg: RunConfig, name: str) -> None:
    """Join (or start) Ray; refuse a run that no node can ever hold, and say so when it waits for room."""
    connect_ray(cfg.launch.address)
    check_run(cfg, name)


def release_orphaned_placement_groups(wait_s: float = 0.0, *, cell_done: bool = False) -> int:
    """Remove the placement groups of this Ray job that an actor created and outlived: what a Ray Train run leaves
    behind when its controller dies while starting a worker group (Ray Train's own cleaner misses a group created
    but not yet registered with it; seen when Tune stops a trial). Such a group is tied to the job's driver, so in
    a sweep it holds its CPUs/GPUs until the sweep ends: on a cluster sized for one trial at a time, every later
    trial waits for workers forever. Groups of the driver itself (Tune's) and detached ones are left alone, and so
    are those of live actors (a running trial's controller), except with ``cell_done``: when a cell's trials have
    all ended, a group whose creator is still alive after ``wait_s`` (a stopped controller that has not died yet;
    CI once saw one outlive a 5 s wait) goes too. With ``wait_s``, waits that long for creators still alive and
    removes each group as its creator dies. Returns how many it removed."""
    deadline, removed = time.monotonic() + wait_s, 0
    while True:
        groups = _actor_created_groups()
        removed += _remove(group_id for group_id, creator_dead in groups if creator_dead)
        if all(dead for _, dead in groups) or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    if cell_done:
        removed += _remove(group_id for group_id, _ in _actor_created_groups())
    if removed:
        log.warning("released %d placement group(s) left behind by stopped Ray Train runs", removed)
    return removed


def _remove(group_ids: Iterable[bytes]) -> int:
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for group_id in group_ids:
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(group_id)))
            removed += 1
        except Exception as exc:  # noqa: BLE001 - removed meanwhile (Ray Train's cleaner): nothing to do
            log.debug("placement group %s not removed: %s", group_id.hex(), exc)
    return removed


def _actor_created_groups() -> list[tuple[bytes, bool]]:
    """(id, creator dead) of every placement group of this job that is not removed or detached and that an actor
    created. Read from the GCS table (Ray's state API does not say who created a group); empty where that table
    cannot be read (another Ray version's internals, a Ray Client driver)."""
    import ray

    try:
        from ray._private.state import state
        from ray.core.generated.gcs_pb2 import PlacementGroupTableData

        table = state._connect_and_get_accessor().get_placement_group_table()
    except Exception as exc:  # noqa: BLE001 - another Ray version, a Ray Client driver: release nothing, break nothing
        log.debug("placement groups not inspected: %s", exc)
        return []
    job = ray.get_runtime_context().get_job_id()
    groups = [PlacementGroupTableData.FromString(raw) for raw in table]
    return [(g.placement_group_id, g.creator_actor_dead) for g in groups
            if g.state != PlacementGroupTableData.REMOVED and not g.is_detached and g.creator_job_id.hex() == job
            and not ray.ActorID(g.creator_actor_id).is_nil()]



def connect_for_sweep(address: str | None) -> None:
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    # Tune's console tables (even at verbose=0 the new output engine prints a configuration box); flat-ray
    # shows its own trial table and the report instead
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    connect_ray(address)


def check_sweep(space: Space, address: str | None, storage: Place | None, uri: str) -> dict[str, int]:
    """Concurrency per cell, and shared storage plus a server MLflow wherever trials run on other nodes.

    A cell whose trial no node type can ever hold is refused (one line naming the node types and the request).
    Otherwise it runs as many trials at once as fit the cluster at its largest: the autoscaler's node types at
    their max_workers where the autoscaler has told Ray its node types, else the nodes alive now. Tune starts what
    fits now; the other trials wait, and the autoscaler sees their demand (a cluster whose GPU nodes scale from
    zero has no room for any trial when the sweep starts). Trials that wait for nodes the autoscaler will add run
    on other nodes, so they need the multi-node storage and MLflow as well, and the work folder (sweep state, trial
    outputs, exports), which the head reads back, on the storage path's filesystem (with cloud storage that cannot
    be checked: the work folder must be a shared mount)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    out, waiting = {}, []
    for cell in space.cells:
        now, most = check_cell(cell.config, cell.name)  # refuses a trial that no node type can ever hold
        if now < most:  # some of its trials run on nodes the autoscaler has yet to add
            waiting.append(cell.name)
        out[cell.name] = most
    where = (f"the Ray cluster has {len(nodes)} nodes" if len(nodes) > 1 else
             f"cell {waiting[0]} waits for nodes the autoscaler adds" if waiting else None)
    if where:
        require_shared(where, storage, uri, workdir(space.cells[0].config), "sweep state, trial outputs, exports",
                       [cell.config for cell in space.cells])
    return out


class Knobs(NamedTuple):
    """How a command's user names the storage path and sets it and the MLflow URI, for its error lines."""
    storage: str
    set_storage: str
    set_mlflow: str


SWEEP_KNOBS = Knobs("--storage-path", "--storage-path", "--mlflow-uri ")
RUN_KNOBS = Knobs("launch.storage_path", "launch.storage_path=DIR", "tracking.mlflow_uri=")


def require_shared(where: str, storage: Place | None, uri: str, work: Path, holds: str, cfgs: list[RunConfig],
                   knobs: Knobs = SWEEP_KNOBS) -> None:
    """What runs on other nodes needs (``where`` says why they will): the Ray storage on shared storage, an MLflow
    server (a SQLite file is one node's), and the work folder, which ``holds`` what the head reads back, on the
    storage path's filesystem (with cloud storage that cannot be checked: the work folder must be a shared mount).
    A local input of ``cfgs`` off that filesystem is named, not refused (a node image may hold it)."""
    if storage is None:
        raise FlatRayError(f"{where}: pass {knobs.set_storage} on shared storage (an NFS mount) so every node sees "
                           "the checkpoints")
    if uri.startswith("sqlite:"):
        raise FlatRayError(f"{where} but MLflow is a local SQLite file ({uri}); pass {knobs.set_mlflow}"
                           "http://HEAD:5000 (the server cluster.yaml starts)")
    if storage.local and filesystem(work) != filesystem(storage.local):
        raise FlatRayError(f"{where}: the work folder {work} ({holds}) is not on the filesystem of {knobs.storage} "
                           f"{storage}, so the head would not see what the workers write; set paths.workdir on the "
                           f"shared mount (e.g. paths.workdir={storage / 'work'})")
    if storage.local:
        _warn_node_local(cfgs, storage, knobs.storage)


def _warn_node_local(cfgs: list[RunConfig], storage: Place, storage_flag: str) -> None:
    """One line per local model, tokenizer, data or template path that the workers open and that is not on the
    storage path's filesystem: another node has it only where its image does (a model baked into the image at
    that path works; a folder on the head's own disk does not, and the workers fail on their node)."""
    found = {item for cfg in cfgs for item in node_local_inputs(cfg, storage.local).items()}
    for key, path in sorted(found):
        log.warning("%s %s is not on the filesystem of %s %s: workers on other nodes read it there at the same "
                    "path (baked into their image) or fail; put it on the shared mount", key, path, storage_flag,
                    storage)
