"""A sweep's trial table: what each cell's trial asks Ray for, how many fit on the cluster's node types at once,
the memory plan's GiB per GPU and per host, the node type each cell lands on, and where its forget quality comes
from. ``flat-ray tune`` prints it at the start and ``--dry-run`` before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flat_ray.config import RunConfig
from flat_ray.sweep import TRIAL_FN_CPU, Space


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    """What one trial asks Ray for in all: its driver function plus its Ray Train workers (``memory`` in bytes)."""
    from flat_ray.placement import worker_bundle

    bundle = worker_bundle(cfg)
    n = cfg.launch.num_workers
    return {"CPU": TRIAL_FN_CPU + n * bundle.get("CPU", 0), "GPU": n * bundle.get("GPU", 0),
            "memory": n * bundle.get("memory", 0)}


def max_concurrent(cfg: RunConfig, nodes: list) -> int:
    """How many trials of this cell fit on ``nodes`` (:class:`flat_ray.placement.NodeType`, each at its
    ``max_count``) at once (0: not even one)."""
    from flat_ray.placement import max_trials

    return max_trials(cfg, nodes)


def trial_table(space: Space, nodes: list, gpu_gib: float | None = None,
                cluster: list | None = None) -> list[dict[str, Any]]:
    """One row per cell: trials, axes, per-trial resources (host memory from the memory plan) and the concurrency
    on ``nodes``; for GPU trials also the plan's peak per GPU (``?`` for a model whose architecture is unknown
    here) and, given the GPUs' memory ``gpu_gib``, whether it fits. With the node types of a ``cluster``, the
    node type each cell lands on (``-`` where none can hold it)."""
    from flat_ray.memory import GIB, arch_for, plan
    from flat_ray.placement import landing

    rows = []
    for cell in space.cells:
        need = trial_resources(cell.config)
        row = {
            "cell": cell.name, "trials": cell.trials(space.num_samples),
            "axes": "; ".join(f"{k}={s.describe()}" for k, s in cell.params.items()) or "-",
            "workers": cell.config.launch.num_workers, "cpus/trial": round(need["CPU"], 2),
            "gpus/trial": need["GPU"], "zero": cell.config.deepspeed.stage,
            "host GiB/trial": f"{need['memory'] / GIB:.1f}",
            "concurrent": max_concurrent(cell.config, nodes),
        }
        if need["GPU"]:
            arch = arch_for(cell.config.model.name_or_path)
            peak = plan(cell.config, arch).peak / GIB if arch else None
            row["GiB/GPU"] = f"{peak:.1f}" if peak is not None else "?"
            if gpu_gib is not None:
                row["fits"] = "?" if peak is None else ("yes" if peak <= gpu_gib else "no")
        if cluster is not None:
            node = landing(cell.config, cluster)
            row["node type"] = node.name if node else "-"
        rows.append(row)
    return rows


def reference_source(cfg: RunConfig) -> str:
    """Where a cell's forget quality comes from, in words (the dry run's list)."""
    from flat_ray.config import AUTO_REFERENCE
    from flat_ray.eval.tofu import LOG_FILES, OPEN_UNLEARNING_EVAL

    ref = cfg.eval.reference
    if not ref:
        return "none (no forget quality)"
    if ref == AUTO_REFERENCE and cfg.eval.retain_recipe:
        from flat_ray.assets import recipe_retain_config

        ft = recipe_retain_config(cfg)
        return (f"built: {ft.model.name_or_path} fine-tuned on {ft.data.split} by {cfg.eval.retain_recipe}, once, "
                "before the cell's trials (GPU-hours in the cost estimate)")
    if ref == AUTO_REFERENCE:
        return "built: the demo's retain model, fine-tuned once on the forget split's complement and cached"
    path = Path(ref).expanduser()
    if not path.exists():
        return f"{ref} (missing: the sweep refuses to start until it is there)"
    logs = path if path.is_file() else next((path / f for f in (LOG_FILES["forget"], OPEN_UNLEARNING_EVAL)
                                             if (path / f).is_file()), path)
    kind = "open-unlearning's results" if logs.name == OPEN_UNLEARNING_EVAL else "TOFU-format eval logs"
    return f"published logs at {path.resolve()} ({kind})"  # where this command found them, whatever its folder


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain fixed-width table (console and markdown-compatible enough to read in a file)."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(c for r in rows for c in r))  # GPU cells add memory columns
    width = {c: max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(_fmt(r.get(c, "")).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
