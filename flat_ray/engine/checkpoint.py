"""Checkpoint manifests: a checkpoint counts only once every rank has finished writing its part.

Each rank stages its DeepSpeed shards in a private temporary directory, then writes
``flat_ray_ckpt_rank{r}.json`` there: the path and size of every file it wrote, the epoch, step and world size.
The manifest is written to a temporary name and renamed, last, so it exists only if everything before it was
written. Ray Train then copies the ranks' directories into one checkpoint directory on the storage path and
registers it only after the copy has finished. Before a restore, :func:`verify` checks that the manifests of all
ranks are there and that every file they list has its recorded size; a checkpoint cut short by a crash is
refused with a message instead of being loaded half-written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flat_ray.errors import IncompleteCheckpoint
from flat_ray.fileio import atomic_write_text

MANIFEST = "flat_ray_ckpt_rank{rank}.json"
EPOCH_FILE = "flat_ray_epoch.json"  # rank 0's: epoch, step, the metrics reported with it, the weights' dtype
ANY_MANIFEST = MANIFEST.format(rank="*")


def write_manifest(directory: str | Path, rank: int, world_size: int, state: dict[str, Any]) -> Path:
    """Record every file under ``directory`` (this rank's staged part) and ``state``; call after the last write."""
    root = Path(directory)
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
             if p.is_file() and not p.match(ANY_MANIFEST)}
    path = root / MANIFEST.format(rank=rank)
    atomic_write_text(path, json.dumps({"rank": rank, "world_size": world_size, "state": state, "files": files}))
    return path


def verify(directory: str | Path, world_size: int) -> dict[str, Any]:
    """Check a checkpoint written by ``world_size`` ranks and return its state (epoch, global step)."""
    root = Path(directory)
    files = {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    return verify_listing(str(root), files, lambda rel: (root / rel).read_text(), world_size)


def verify_listing(where: str, files: dict[str, int], read: Callable[[str], str], world_size: int) -> dict[str, Any]:
    """:func:`verify` on a listing of the checkpoint's files (relative path: size) and a reader of one of them, as
    local folders and cloud storage both give."""
    manifests = sorted(rel for rel in files if Path(rel).match(ANY_MANIFEST) and "/" not in rel)
    if not manifests:
        raise IncompleteCheckpoint(f"checkpoint {where} has no flat_ray manifest: it was not written completely (or "
                                   "not by flat-ray); restore from an earlier checkpoint")
    states = []
    for rel_manifest in manifests:
        try:
            manifest = json.loads(read(rel_manifest))
        except (OSError, ValueError) as exc:
            raise IncompleteCheckpoint(f"checkpoint manifest {where}/{rel_manifest} is unreadable ({exc})") from None
        if manifest["world_size"] != world_size:
            raise IncompleteCheckpoint(f"checkpoint {where} was written by {manifest['world_size']} workers but this "
                                       f"run has {world_size}; set launch.num_workers={manifest['world_size']} to "
                                       "resume it")
        for rel, size in manifest["files"].items():
            if files.get(rel) != size:
                got = files.get(rel, "missing")
                raise IncompleteCheckpoint(f"checkpoint {where} is incomplete: {rel} is {got}, rank "
                                           f"{manifest['rank']} wrote {size} bytes; restore from an earlier checkpoint")
        states.append(manifest["state"])
    if len(manifests) != world_size:
        raise IncompleteCheckpoint(f"checkpoint {where} holds {len(manifests)} of {world_size} ranks' parts; it was cut "
                                   "short while being written")
    if any(s != states[0] for s in states):
        raise IncompleteCheckpoint(f"checkpoint {where} mixes parts of different steps: {states}")
    return states[0]


__all__ = ["EPOCH_FILE", "MANIFEST", "verify", "verify_listing", "write_manifest"]
