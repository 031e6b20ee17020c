"""Write constraints/cluster.txt: an exact pin for every distribution that `flat-ray[cluster]` pulls in, as
installed in this environment (the one the tests pass with), so GPU nodes launched weeks apart install the same
versions. torch's CUDA libraries are pinned by torch itself.

    .venv/bin/python scripts/lock_cluster.py
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
HEADER = """# Pins for GPU clusters started from cluster.yaml: every distribution flat-ray[cluster] installs, at the
# versions flat-ray's tests pass with (written by scripts/lock_cluster.py; rerun it after changing dependencies).
# torch comes from PyPI's default (CUDA) build on Linux; its CUDA libraries are pinned by torch.
"""


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """name -> installed version for ``root[extras]`` and everything it requires (markers evaluated here)."""
    found: dict[str, str] = {}
    todo = [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        dist = metadata.distribution(name)
        key = _name(dist.metadata["Name"])
        if key in found and not wanted:
            continue
        found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            env_ok = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (wanted or {""}))
            if env_ok and (req.marker is None or "extra" not in str(req.marker) or wanted):
                todo.append((req.name, frozenset(req.extras)))
    return found


def main() -> None:
    pins = closure("flat-ray", {"cluster"})
    pins.pop("flat-ray")
    pins["torch"] = pins["torch"].split("+")[0]  # the local CPU build's tag; nodes take PyPI's CUDA build
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    (ROOT / "constraints" / "cluster.txt").write_text(HEADER + "\n".join(lines) + "\n")
    print(f"constraints/cluster.txt: {len(lines)} pins")


if __name__ == "__main__":
    main()
