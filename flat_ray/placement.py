"""Where a run's workers can go: what each worker asks Ray for, the node types a cluster has, and which of them can
ever hold a trial (pure arithmetic and YAML; no Ray import: docs/cluster.md).

A worker asks for ``launch.cpus_per_worker`` CPUs, ``launch.gpus_per_worker`` GPUs, its host memory from the memory
plan (Ray's ``memory`` resource, in bytes) and, with ``launch.accelerator_type``, a sliver of Ray's
``accelerator_type:<name>`` resource. Under STRICT_PACK (the default for several GPU workers) all of a trial's
workers go on one node, so one node must hold them all.

Node types come from a Ray cluster YAML (``--gpu-memory cluster.yaml``, for dry runs) or from the joined cluster
(:mod:`flat_ray.launch.cluster`). For an AWS node type whose YAML does not say, Ray detects the host memory (70% of
the instance's RAM: the rest is the object store's) and the accelerator type (the instance's GPU); so does this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flat_ray.config import RunConfig
from flat_ray.errors import FlatRayError
from flat_ray.memory import GIB, arch_for, host_plan

ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's resource that a node with that accelerator carries
ACCELERATOR_SLIVER = 0.001  # what Ray Train asks of it per worker (ScalingConfig.accelerator_type)
RAY_MEMORY_SHARE = 0.7  # the share of a node's RAM that Ray offers as its ``memory`` resource (the rest: objects)

# AWS instance families a cluster.yaml may name: GPU memory (GiB) and the accelerator type Ray detects
INSTANCE_FAMILIES: dict[str, tuple[float, str | None]] = {
    "g4dn": (16, "T4"), "g5": (24, "A10G"), "g6": (24, "L4"), "g6e": (48, "L40S"), "p3": (16, "V100"),
    "p3dn": (32, "V100"), "p4d": (40, "A100"), "p4de": (80, "A100"), "p5": (80, "H100"), "p5e": (141, "H200"),
    "p5en": (141, "H200"), "m6i": (0, None), "m7i": (0, None), "c6i": (0, None), "r6i": (0, None),
}
# RAM (GiB) of the instance sizes those families come in, by the size's name
SIZE_RAM_GIB: dict[str, dict[str, float]] = {
    "g4dn": {"xlarge": 16, "2xlarge": 32, "4xlarge": 64, "8xlarge": 128, "12xlarge": 192, "16xlarge": 256,
             "metal": 384},
    "g5": {"xlarge": 16, "2xlarge": 32, "4xlarge": 64, "8xlarge": 128, "12xlarge": 192, "16xlarge": 256,
           "24xlarge": 384, "48xlarge": 768},
    "g6": {"xlarge": 16, "2xlarge": 32, "4xlarge": 64, "8xlarge": 128, "12xlarge": 192, "16xlarge": 256,
           "24xlarge": 384, "48xlarge": 768},
    "g6e": {"xlarge": 32, "2xlarge": 64, "4xlarge": 128, "8xlarge": 256, "12xlarge": 384, "16xlarge": 512,
            "24xlarge": 768, "48xlarge": 1536},
    "p3": {"2xlarge": 61, "8xlarge": 244, "16xlarge": 488}, "p3dn": {"24xlarge": 768},
    "p4d": {"24xlarge": 1152}, "p4de": {"24xlarge": 1152}, "p5": {"48xlarge": 2048}, "p5e": {"48xlarge": 2048},
    "p5en": {"48xlarge": 2048},
    "m6i": {"xlarge": 16, "2xlarge": 32, "4xlarge": 64, "8xlarge": 128, "12xlarge": 192, "16xlarge": 256},
    "m7i": {"xlarge": 16, "2xlarge": 32, "4xlarge": 64, "8xlarge": 128, "12xlarge": 192, "16xlarge": 256},
    "c6i": {"xlarge": 8, "2xlarge": 16, "4xlarge": 32, "8xlarge": 64, "12xlarge": 96, "16xlarge": 128},
    "r6i": {"xlarge": 32, "2xlarge": 64, "4xlarge": 128, "8xlarge": 256, "12xlarge": 384, "16xlarge": 512},
}


@dataclass(frozen=True)
class NodeType:
    """One kind of node: its Ray resources (``memory`` in bytes), how many the cluster may have (None: as many as
    there are now) and its GPUs' memory in GiB (None: unknown)."""

    name: str
    resources: dict[str, float] = field(default_factory=dict)
    max_count: int | None = None
    gpu_gib: float | None = None

    @property
    def accelerator(self) -> str | None:
        return next((k.removeprefix(ACCELERATOR_PREFIX) for k in self.resources if k.startswith(ACCELERATOR_PREFIX)),
                    None)

    def describe(self) -> str:
        return f"{self.name} ({describe_resources(self.resources)})"


def describe_resources(resources: dict[str, float]) -> str:
    """``CPU 8, GPU 1, memory 61.2 GiB, A10G`` (what people read; Ray's units underneath)."""
    out = []
    order = {"CPU": 0, "GPU": 1, "memory": 2}
    for key, value in sorted(resources.items(), key=lambda kv: (order.get(kv[0], 3), kv[0])):
        if key.startswith(ACCELERATOR_PREFIX):
            out.append(key.removeprefix(ACCELERATOR_PREFIX))
        elif key == "memory":
            out.append(f"memory {value / GIB:.1f} GiB")
        elif value:
            out.append(f"{key} {value:g}")
    return ", ".join(out) or "nothing"


# ---------------------------------------------------------------------------------------------- what a run asks
def host_bytes_per_worker(cfg: RunConfig, model_path: str | None = None) -> int:
    """The memory plan's host peak for one rank, in bytes (the process alone where the architecture is unknown)."""
    plan = host_plan(cfg, arch_for(model_path or cfg.model.name_or_path))
    return int(math.ceil(plan.peak))


def worker_bundle(cfg: RunConfig, model_path: str | None = None) -> dict[str, float]:
    """What one worker asks Ray for (Ray's resource names and units)."""
    launch = cfg.launch
    bundle = {"CPU": launch.cpus_per_worker, "GPU": launch.gpus_per_worker,
              "memory": float(host_bytes_per_worker(cfg, model_path))}
    if launch.accelerator_type:
        bundle[ACCELERATOR_PREFIX + launch.accelerator_type] = ACCELERATOR_SLIVER
    return {k: v for k, v in bundle.items() if v}


def describe_request(cfg: RunConfig, model_path: str | None = None) -> str:
    """``2 workers x (CPU 8, GPU 1, memory 61.2 GiB, A10G) on one node (STRICT_PACK)``."""
    n, strategy = cfg.launch.num_workers, cfg.launch.strategy()
    where = " on one node" if strategy == "STRICT_PACK" and n > 1 else ""
    return f"{n} worker{'s' if n > 1 else ''} x ({describe_resources(worker_bundle(cfg, model_path))}){where} " \
           f"({strategy})"


# --------------------------------------------------------------------------------------------------- fitting
def workers_per_node(bundle: dict[str, float], node: NodeType) -> int:
    """How many workers of ``bundle`` one node of this type holds."""
    counts = [math.floor(node.resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return max(0, min(counts)) if counts else 0


def trials_per_node(cfg: RunConfig, node: NodeType, model_path: str | None = None) -> int:
    """How many whole trials one node of this type holds (STRICT_PACK: all of a trial's workers on it)."""
    return workers_per_node(worker_bundle(cfg, model_path), node) // cfg.launch.num_workers


def can_hold(cfg: RunConfig, node: NodeType, model_path: str | None = None) -> bool:
    """Whether a node of this type can ever run this trial's workers (all of them under STRICT_PACK, else one),
    and its GPUs hold the memory plan where both are known."""
    need = cfg.launch.num_workers if cfg.launch.strategy() == "STRICT_PACK" else 1
    if workers_per_node(worker_bundle(cfg, model_path), node) < need:
        return False
    return gpu_fits(cfg, node, model_path)


def gpu_fits(cfg: RunConfig, node: NodeType, model_path: str | None = None) -> bool:
    from flat_ray.memory import plan

    arch = arch_for(model_path or cfg.model.name_or_path) if cfg.launch.gpus_per_worker else None
    return arch is None or node.gpu_gib is None or plan(cfg, arch).peak <= node.gpu_gib * GIB


def max_trials(cfg: RunConfig, nodes: list[NodeType], model_path: str | None = None) -> int:
    """How many trials fit ``nodes`` at once, each type at ``max_count`` nodes (STRICT_PACK: whole trials per
    node; otherwise workers anywhere)."""
    bundle = worker_bundle(cfg, model_path)
    if cfg.launch.strategy() == "STRICT_PACK":
        return sum(trials_per_node(cfg, n, model_path) * (n.max_count or 0) for n in nodes
                   if gpu_fits(cfg, n, model_path))
    slots = sum(workers_per_node(bundle, n) * (n.max_count or 0) for n in nodes if gpu_fits(cfg, n, model_path))
    return slots // cfg.launch.num_workers


def landing(cfg: RunConfig, nodes: list[NodeType], model_path: str | None = None) -> NodeType | None:
    """The node type a trial lands on: of those that can hold it, the one with the fewest GPUs (then the least
    memory), as Ray's autoscaler prefers the node it fills best; None if none can."""
    able = [n for n in nodes if can_hold(cfg, n, model_path)]
    return min(able, key=lambda n: (n.resources.get("GPU", 0), n.resources.get("memory", 0)), default=None)


def check_holdable(cfg: RunConfig, nodes: list[NodeType], what: str, model_path: str | None = None) -> None:
    """Refuse, in one line, a trial that no node type can ever hold."""
    if nodes and landing(cfg, nodes, model_path) is None:
        accel = cfg.launch.accelerator_type
        offered = sorted({n.accelerator for n in nodes} - {None})
        hint = (f"; launch.accelerator_type={accel} is on no node type (they offer: {', '.join(offered) or 'none'})"
                if accel and accel not in offered else
                "; lower launch.num_workers or cpus_per_worker, use a memory knob (--dry-run shows the plan) or "
                "add a larger node type")
        raise FlatRayError(f"{what} asks for {describe_request(cfg, model_path)} but no node type can ever hold it: "
                           f"{'; '.join(n.describe() for n in nodes)}{hint}")


def this_machine(cpus: int, gpus: int) -> NodeType:
    """This machine as one node, with the memory a local Ray offers (its share of the RAM)."""
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return NodeType("this machine", {"CPU": float(cpus), "GPU": float(gpus), "memory": RAY_MEMORY_SHARE * ram}, 1)


# ----------------------------------------------------------------------------------------- cluster YAML files
def node_types_from_yaml(path: Path) -> list[NodeType]:
    """The worker node types of a Ray cluster YAML, with what Ray detects on AWS where the YAML does not say."""
    import yaml

    types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types") or {}
    head = (yaml.safe_load(path.read_text()) or {}).get("head_node_type")
    return [_from_yaml(name, node, path, name == head) for name, node in types.items()]


def _from_yaml(name: str, node: dict[str, Any], path: Path, head: bool) -> NodeType:
    resources = {k: float(v) for k, v in (node.get("resources") or {}).items()}
    instance = str((node.get("node_config") or {}).get("InstanceType", ""))
    family, _, size = instance.partition(".")
    gpu_gib = None
    if resources.get("GPU"):
        if family not in INSTANCE_FAMILIES:
            raise FlatRayError(f"{path}: node type {name} has instance type {instance!r}, whose GPU memory flat-ray "
                               f"does not know ({', '.join(INSTANCE_FAMILIES)}); pass --gpu-memory GIB")
        gpu_gib, accelerator = INSTANCE_FAMILIES[family]
        if accelerator and not any(k.startswith(ACCELERATOR_PREFIX) for k in resources):
            resources[ACCELERATOR_PREFIX + accelerator] = 1.0
    ram = SIZE_RAM_GIB.get(family, {}).get(size)
    if "memory" not in resources and ram is not None:
        resources["memory"] = RAY_MEMORY_SHARE * ram * GIB
    max_count = 1 if head else int(node.get("max_workers", 0))
    return NodeType(name, resources, max_count, gpu_gib)


def gpu_memory_gib(spec: str) -> float:
    """``--gpu-memory``: a number of GiB, or a Ray cluster YAML whose GPU node types set the smallest GPU."""
    try:
        return float(spec)
    except ValueError:
        pass
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FlatRayError(f"--gpu-memory {spec!r} is neither a number of GiB nor a cluster YAML file")
    sizes = [n.gpu_gib for n in node_types_from_yaml(path) if n.gpu_gib]
    if not sizes:
        raise FlatRayError(f"{path} has no node type with GPU resources; pass --gpu-memory GIB")
    return float(min(sizes))
