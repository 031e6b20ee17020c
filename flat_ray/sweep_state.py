"""A sweep's saved state, ``<workdir>/sweeps/<name>/sweep.json``: the one module that writes and reads it. The sweep
writes it as soon as its MLflow parent run exists (flat_ray.launch.records); ``flat-ray tune --resume``, ``flat-ray
report`` and the report read it back: the parent run and MLflow URI, the storage, the space's saved copy and
overrides, the objective and the cells."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flat_ray.errors import FlatRayError
from flat_ray.fileio import atomic_write_text
from flat_ray.sweep import Space, load_space

SWEEP_FILE = "sweep.json"


def write(sweep_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_text(sweep_dir / SWEEP_FILE, json.dumps(state, indent=2))


def read(sweep_dir: Path) -> dict[str, Any]:
    return json.loads((sweep_dir / SWEEP_FILE).read_text())


def find_sweep(name_or_dir: str, workdir: str | None = None) -> Path:
    """A sweep directory from its name (under ``<workdir>/sweeps``) or its path."""
    p = Path(name_or_dir).expanduser()
    if (p / SWEEP_FILE).is_file():
        return p.resolve()
    root = Path(workdir or "flat_ray_work").expanduser() / "sweeps"
    if (root / name_or_dir / SWEEP_FILE).is_file():
        return (root / name_or_dir).resolve()
    known = sorted(d.name for d in root.glob("*") if (d / SWEEP_FILE).is_file()) if root.is_dir() else []
    if p.is_dir():
        raise FlatRayError(f"{str(p)!r} is not a sweep directory (it has no {SWEEP_FILE}); sweeps in {root}: "
                           f"{', '.join(known) or 'none'} (or pass --workdir)")
    raise FlatRayError(f"no sweep named {name_or_dir!r} in {root}; sweeps there: {', '.join(known) or 'none'} "
                       "(or give the sweep directory, or --workdir)")


def saved_space(name_or_dir: str, workdir: str | None = None) -> tuple[Space, dict[str, Any]]:
    """The space a sweep was started with (its saved copy and overrides), and the sweep's state."""
    sweep_dir = find_sweep(name_or_dir, workdir)
    state = read(sweep_dir)
    return load_space(str(sweep_dir / "space.yaml"), state["overrides"]), state


def space_to_run(space: str | None, overrides: list[str], resume: str | None, workdir: str | None = None) -> Space:
    """The space a sweep command means: a resumed sweep's saved one, else ``space`` (a shipped name or a file;
    None: the demo) with ``overrides``, its files not yet checked (the sweep checks them itself)."""
    return saved_space(resume, workdir)[0] if resume else load_space(space, overrides, check_files=False)
