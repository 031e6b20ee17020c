"""The package's layering: no import cycles among flat_ray's modules (lazy imports inside functions included),
and the layers below the launch code never import it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for path in [*(ROOT / "flat_ray").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the flat_ray/cli modules it imports anywhere in its body (absolute imports; the project uses no
    relative ones). ``from pkg import name`` counts as importing ``pkg.name`` when that is a module."""
    def owner(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for target in targets:
                hit = owner(target) if target.split(".")[0] in ("flat_ray", "cli") else None
                # a package's own __init__ and the parent packages of a module are not edges worth following
                if hit and hit != mod and not mod.startswith(hit + ".") and hit != "flat_ray":
                    edges[mod].add(hit)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles_among_flat_ray_modules():
    assert _cycle(_imports(_modules())) is None


def test_the_cycle_finder_finds_a_lazy_import_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(edges) == ["a", "b", "c", "a"]


def test_layers_below_launch_never_import_it():
    edges = _imports(_modules())
    bad = {m: sorted(t for t in ts if t.startswith("flat_ray.launch")) for m, ts in edges.items()
           if m.startswith("flat_ray.") and not m.startswith("flat_ray.launch")}
    assert {m: ts for m, ts in bad.items() if ts} == {}
