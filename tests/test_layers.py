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


# the layers DESIGN keeps free of the orchestration stack (what a loss, a metric or a config needs)
PURE = ("flat_ray.losses", "flat_ray.data", "flat_ray.config", "flat_ray.sweep", "flat_ray.engine.step",
        "flat_ray.schedule", "flat_ray.engine.replica", "flat_ray.eval.tofu", "flat_ray.metrics",
        "flat_ray.eval.muse", "flat_ray.eval.hp", "flat_ray.eval.runner", "flat_ray.console", "flat_ray.memory",
        "flat_ray.preflight", "flat_ray.eval.mia")
STACK = ("ray", "deepspeed", "mlflow")


def _third_party(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_pure_layers_never_reach_ray_deepspeed_or_mlflow_even_lazily():
    mods, edges = _modules(), _imports(_modules())
    for start in PURE:
        assert start in mods, start
        seen, todo = set(), [m for m in mods if m == start or m.startswith(start + ".")]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += edges[m]
        reached = {m: sorted(_third_party(mods[m]) & set(STACK)) for m in seen}
        assert {m: t for m, t in reached.items() if t} == {}, start


def test_no_function_in_the_package_or_cli_is_over_80_lines():
    long = [f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in _modules().values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 80]
    assert long == []


def test_config_sits_below_engine_eval_pipeline_assets_and_launch():
    """The config validates against name tables below it (metrics, ratios, schedule, the registries), so the
    packages that read a config never sit in a circle with it."""
    above = ("flat_ray.engine", "flat_ray.eval", "flat_ray.pipeline", "flat_ray.assets", "flat_ray.launch",
             "flat_ray.preflight")
    edges = _imports(_modules())
    assert sorted(t for t in edges["flat_ray.config"] if t.startswith(above)) == []
    assert edges["flat_ray.errors"] == set() and edges["flat_ray.registry"] == {"flat_ray.errors"}


def test_one_module_imports_each_of_deepspeed_mlflow_and_peft():
    owners = {lib: sorted(m for m, path in _modules().items() if lib in _third_party(path))
              for lib in ("deepspeed", "mlflow", "peft")}
    assert owners == {"deepspeed": ["flat_ray.engine.ds"], "mlflow": ["flat_ray.tracking"], "peft": ["flat_ray.lora"]}
