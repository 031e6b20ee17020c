"""Reports of finished sweeps, read back from MLflow (the parent run's children), so ``flat-ray report NAME``
works the same at the end of a sweep, after a resume, or days later.

Per benchmark (and model): a paper-style table (one row per method / divergence with its best trial by the
sweep's first objective, columns the space's forget and utility metrics and, where the trials computed them,
PrivLeak and extraction strength as open-unlearning's tables show them; plus the model before unlearning), the
Pareto front of the forget metric vs the utility metric as a PNG, and the training-loss curves of every trial.
Files go to ``<sweep dir>/report/``; the sweep logs them on its parent run.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flat_ray import sweep_state, tracking
from flat_ray.eval.open_unlearning import read_logs
from flat_ray.eval.tofu import LOG_FILES, OPEN_UNLEARNING_EVAL, read_reference, read_reference_mia, summarize
from flat_ray.metrics import METRICS, add_derived, best_epoch
from flat_ray.ratios import DEFAULT_TRUTH_RATIO


@dataclass
class Trial:
    name: str
    run_id: str
    status: str  # finished | diverged | stopped early | failed | running
    model: str
    benchmark: str
    method: str
    divergence: str
    lr: float
    final: dict[str, float]
    before: dict[str, float]
    loss: list[tuple[int, float]] = field(default_factory=list)
    why: str = ""  # a diverged trial's step and reason
    reference: str = ""  # the trial's forget-quality reference (eval.reference), "" without one
    truth_ratio: str = DEFAULT_TRUTH_RATIO
    cell: str = ""
    epoch: int | None = None  # the epoch ``final`` is from: the trial's best (what its cell would export)
    last_epoch: int | None = None  # the last epoch it evaluated (its curves in MLflow go on to there)

    @property
    def group(self) -> str:
        return self.method if self.divergence in ("", "-") else f"{self.method}/{self.divergence}"


@dataclass
class Report:
    text: str
    files: list[Path]
    tables: dict[str, list[dict[str, Any]]]
    trials: list[Trial]
    objective: str = ""

    def best_metrics(self) -> dict[str, float]:
        """Per benchmark, the best row's objective and columns as ``best/<benchmark>/<metric>`` (the parent run's
        metrics, so MLflow's runs table and charts show a sweep's result without opening it)."""
        out = {}
        for bench, rows in self.tables.items():
            scored = [r for r in rows if r["lr"] is not None and isinstance(r.get(self.objective), float)]
            if not scored:
                continue
            best = _best(scored, self.objective, lambda row: row[self.objective])
            out.update({f"best/{bench}/{k}": v for k, v in best.items()
                        if isinstance(v, float) and not math.isnan(v) and k != "lr"})
            if best.get("epoch") is not None:
                out[f"best/{bench}/epoch"] = float(best["epoch"])
        return out


def _status(run) -> str:
    tags = run.data.tags
    if tags.get("diverged") == "true":
        return "diverged"
    if tags.get("stopped_early") == "true":
        return "stopped early"
    return {"FINISHED": "finished", "FAILED": "failed", "KILLED": "stopped early"}.get(run.info.status, "running")


def collect(sweep_dir: Path, cell: str | None = None) -> tuple[dict[str, Any], list[Trial]]:
    """The sweep's state and its trials (of one ``cell`` only, when given), each with one result: its best epoch
    by the sweep's first objective."""
    state = sweep_state.read(sweep_dir)
    uri = state["mlflow_uri"]
    trials = []
    for run in tracking.child_runs(uri, state["parent_run_id"]):
        tags, params = run.data.tags, run.data.params
        if cell is not None and tags.get("flat_ray.cell") != cell:
            continue
        history, epoch, final, last = run_result(uri, run, state["objective"][0])
        trials.append(Trial(
            name=tags.get("flat_ray.trial", run.info.run_name), run_id=run.info.run_id, status=_status(run),
            model=tags.get("flat_ray.model") or tags.get("model", "?"), benchmark=tags.get("benchmark", "?"),
            method=tags.get("method", "?") + ("+lora" if params.get("model.lora_rank", "0") != "0" else ""),
            divergence=tags.get("divergence", "-"), lr=float(params.get("optim.lr", "nan")), final=final,
            before={k: h[0] for k, h in history.items() if 0 in h},
            loss=tracking.metric_history(uri, run.info.run_id, "train/loss"),
            why=tags.get("diverged_reason", ""), reference=_param_path(params.get("eval.reference")),
            truth_ratio=params.get("eval.truth_ratio", DEFAULT_TRUTH_RATIO), cell=tags.get("flat_ray.cell", ""),
            epoch=epoch, last_epoch=last))
    return state, trials


def run_result(uri: str, run: Any, metric: str) -> tuple[dict[str, dict[int, float]], int | None, dict[str, float],
                                                          int | None]:
    """A trial's MLflow run read back: its evaluations (metric -> {epoch: value}), its result (the epoch and every
    metric there, :func:`trial_result`) and the last epoch it evaluated."""
    history = {k[5:]: dict(tracking.metric_history(uri, run.info.run_id, k))
               for k in run.data.metrics if k.startswith("eval/")}
    epoch, final = trial_result(history, run.data.params, metric)
    return history, epoch, final, max((e for h in history.values() for e in h), default=None)


def trial_result(history: dict[str, dict[int, float]], params: dict[str, str],
                 metric: str) -> tuple[int | None, dict[str, float]]:
    """A trial's one result from its evaluations (metric -> {epoch: value}): the epoch it would export (the best by
    ``metric`` among the trained epochs it checkpointed, the later one on a tie) and every metric at that epoch.
    Without a value of ``metric``: its last evaluation."""
    epochs, every = int(params.get("optim.epochs", 0)), int(params.get("launch.checkpoint_every_epochs", 1))
    saved = {e: v for e, v in history.get(metric, {}).items() if e >= 1 and (e % every == 0 or e == epochs)}
    epoch = best_epoch(saved, metric)
    if epoch is None:
        last = max((e for h in history.values() for e in h), default=None)
        return last, {k: h[last] for k, h in history.items() if last in h}
    return epoch, {k: h[epoch] for k, h in history.items() if epoch in h}


def _param_path(value: str | None) -> str:
    """A path param as MLflow holds it ("None" for a null key), or ""."""
    return "" if value in (None, "", "None") else value


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if METRICS[metric].higher_is_better else a < b


def _best(items: list, metric: str, value: Any) -> Any:
    """The first of ``items`` with the best ``value(item)`` of ``metric`` (direction from the registry)."""
    best = items[0]
    for item in items[1:]:
        if _better(metric, value(item), value(best)):
            best = item
    return best


def _fmt(metric: str, v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if metric == "epoch":
        return str(v)
    if metric == "forget_quality" or metric == "lr":
        return f"{v:.3g}"
    if metric == "privleak":  # a percentage
        return f"{v:.1f}"
    return f"{v:.4f}"


@functools.lru_cache(maxsize=16)  # the table and the plot of each benchmark ask for the same reference
def reference_metrics(reference: str, truth_ratio: str) -> dict[str, float] | None:
    """The metrics of a forget-quality reference that is a folder of TOFU-format eval logs or open-unlearning's
    TOFU_EVAL.json (the retain model's; its forget quality against itself is 1), or None for another kind of
    reference or one no longer there."""
    logs = Path(reference)
    if logs.name == OPEN_UNLEARNING_EVAL:
        logs = logs.parent
    if not reference or not any((logs / f).is_file() for f in (LOG_FILES["forget"], OPEN_UNLEARNING_EVAL)):
        return None
    summary = summarize(read_logs(logs), truth_ratio=truth_ratio, reference_tr=read_reference(logs)[0],
                        reference_mia=read_reference_mia(logs))
    return add_derived({k: v for k, v in summary.items() if isinstance(v, float)})


# open-unlearning's default TOFU table beside forget quality and utility: shown wherever the trials computed them
PRIVACY_COLUMNS = ("privleak", "extraction_strength")


def _privacy_columns(trials: list[Trial], shown: list[str]) -> list[str]:
    return [c for c in PRIVACY_COLUMNS if c not in shown and any(c in t.final or c in t.before for t in trials)]


def table_rows(trials: list[Trial], objective: str, columns: list[str]) -> list[dict[str, Any]]:
    """Rows of one benchmark: the model before unlearning, the retain model (when the trials' forget-quality
    reference is one's eval logs, as in TOFU's tables), then each method / divergence at its best trial."""
    rows = []
    for model in dict.fromkeys(t.model for t in trials):
        mine = [t for t in trials if t.model == model]
        first = next((t for t in mine if t.before), None)
        if first is not None:
            rows.append({"model": model, "method": "(before unlearning)", "lr": None, "epoch": 0, "trials": "",
                         objective: first.before.get(objective), **{c: first.before.get(c) for c in columns}})
        with_ref = next((t for t in mine if t.reference), None)
        ref = reference_metrics(with_ref.reference, with_ref.truth_ratio) if with_ref else None
        if ref is not None:
            rows.append({"model": model, "method": "(retain model)", "lr": None, "epoch": None, "trials": "",
                         objective: ref.get(objective), **{c: ref.get(c) for c in columns}})
        for group in dict.fromkeys(t.group for t in mine):
            members = [t for t in mine if t.group == group]
            done = [t for t in members if t.status == "finished" and objective in t.final]
            best = _best(done, objective, lambda t: t.final[objective]) if done else None
            counts = ", ".join(f"{sum(t.status == s for t in members)} {s}"
                               for s in dict.fromkeys(t.status for t in members))
            row = {"model": model, "method": group, "lr": best.lr if best else None,
                   "epoch": best.epoch if best else None, "trials": counts,
                   objective: best.final.get(objective) if best else None}
            row.update({c: (best.final.get(c) if best else None) for c in columns})
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    cells = [[r[c] if isinstance(r[c], str) else _fmt(c, r[c]) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, width, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in width) + "|"
    body = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, width, strict=True)) + " |" for row in cells]
    return "\n".join([line, rule, *body])


def pareto_front(points: list[tuple[float, float]], x_metric: str, y_metric: str) -> list[int]:
    """Indices of the points no other point beats on both metrics (directions from the registry)."""
    sx = 1 if METRICS[x_metric].higher_is_better else -1
    sy = 1 if METRICS[y_metric].higher_is_better else -1
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(sx * x2 >= sx * x and sy * y2 >= sy * y and (sx * x2 > sx * x or sy * y2 > sy * y)
                        for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def front_points(points: list[tuple[float, float]], start: tuple[float, float] | None, x_metric: str,
                 y_metric: str) -> list[tuple[float, float]]:
    """The drawn Pareto front, sorted by x: the trials' non-dominated points, with the model before unlearning
    taking part like any other point (nothing may beat it on utility)."""
    everything = points + ([start] if start else [])
    return sorted(everything[i] for i in pareto_front(everything, x_metric, y_metric))


def _plots(bench: str, trials: list[Trial], axes: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", bench)
    if len(axes) == 2:
        x_m, y_m = axes
        done = [t for t in trials if t.status == "finished" and x_m in t.final and y_m in t.final]
        if done:
            fig, ax = plt.subplots(figsize=(6, 4.5))
            groups = list(dict.fromkeys(t.group for t in done))
            for g in groups:
                pts = [t for t in done if t.group == g]
                ax.scatter([t.final[x_m] for t in pts], [t.final[y_m] for t in pts], label=g, alpha=0.8)
            start = next((t.before for t in trials if x_m in t.before and y_m in t.before), None)
            if start:
                ax.scatter([start[x_m]], [start[y_m]], marker="x", color="k", s=60, label="before unlearning")
            with_ref = next((t for t in trials if t.reference), None)
            ref = reference_metrics(with_ref.reference, with_ref.truth_ratio) if with_ref else None
            if ref and x_m in ref and y_m in ref:  # where unlearning should land (TOFU's retain model)
                ax.scatter([ref[x_m]], [ref[y_m]], marker="*", color="k", s=110, label="retain model")
            front = front_points([(t.final[x_m], t.final[y_m]) for t in done],
                                 (start[x_m], start[y_m]) if start else None, x_m, y_m)
            ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
            if x_m == "forget_quality":
                ax.set_xscale("log")
            ax.set_xlabel(f"{x_m} ({'higher' if METRICS[x_m].higher_is_better else 'lower'} is better)")
            ax.set_ylabel(f"{y_m} ({'higher' if METRICS[y_m].higher_is_better else 'lower'} is better)")
            files.append(_save(fig, ax, f"{bench}: forgetting vs utility", 7, out / f"pareto_{slug}.png"))
    curves = [t for t in trials if t.loss]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for t in curves:
            ax.plot([s for s, _ in t.loss], [v for _, v in t.loss], label=f"{t.group} lr={t.lr:.2g}", lw=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train/loss")
        files.append(_save(fig, ax, f"{bench}: training loss per trial", 6, out / f"loss_{slug}.png"))
    return files


def run_curves(uri: str, run_id: str, title: str):
    """One run's story as a figure: the training loss and FLAT's two scores per step, and the forget and retain
    probabilities per evaluation (None when the run logged no steps)."""
    loss = tracking.metric_history(uri, run_id, "train/loss")
    if not loss:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ("train/loss", "train/score_template", "train/score_forget"):
        hist = tracking.metric_history(uri, run_id, key)
        if hist:
            left.plot([s for s, _ in hist], [v for _, v in hist], label=key, lw=1)
    left.set_xlabel("optimizer step")
    left.legend(fontsize=7)
    for key in ("eval/forget_prob", "eval/retain_prob", "eval/model_utility", "eval/forget_quality"):
        hist = tracking.metric_history(uri, run_id, key)
        if hist:
            right.plot([s for s, _ in hist], [v for _, v in hist], marker="o", label=key, lw=1)
    right.set_xlabel("epoch (0 = before unlearning)")
    if right.lines:
        right.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _save(fig, ax, title: str, legend_size: int, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(sweep_dir: str | Path) -> Report:
    """Build the report of a sweep from MLflow and write it under ``<sweep dir>/report/``."""
    sweep_dir = Path(sweep_dir)
    state, trials = collect(sweep_dir)
    objective = state["objective"][0]
    cfg = state.get("report") or {}
    columns = [c for c in [*cfg.get("forget", []), *cfg.get("utility", [])] if c != objective]
    out = sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Sweep {state['name']} (space {state['space']})", "",
             f"Objective: {', '.join(state['objective'])} ({', '.join(state['modes'])}); each row is the best "
             f"finished trial of its method by {objective}, at its best epoch (the one its cell would export; "
             f"epoch 0 is the model before unlearning). MLflow parent run {state['parent_run_id']} in "
             f"{state['mlflow_uri']}.", ""]
    tables: dict[str, list[dict[str, Any]]] = {}
    files: list[Path] = []
    for bench in dict.fromkeys(t.benchmark for t in trials):
        mine = [t for t in trials if t.benchmark == bench]
        rows = table_rows(mine, objective, columns + _privacy_columns(mine, [objective, *columns]))
        tables[bench] = rows
        lines += [f"## {bench}", "", markdown(rows), ""]
        files += _plots(bench, mine, cfg.get("pareto", []), out)
    unfinished = [t for t in trials if t.status != "finished"]
    if unfinished:
        lines += ["## Trials that did not finish", "", "| trial | benchmark | method | lr | status | why |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {t.name} | {t.benchmark} | {t.group} | {t.lr:.3g} | {t.status} | {t.why or '-'} |"
                  for t in unfinished]
        lines.append("")
    if not trials:
        lines.append("No trials have been recorded yet.")
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    (out / "report.html").write_text(html_report(state, tables, unfinished, files))
    (out / "report.json").write_text(json.dumps({"objective": state["objective"], "tables": tables,
                                                 "trials": [t.__dict__ for t in trials]}, indent=1, default=str))
    files = [out / "report.md", out / "report.json", out / "report.html", *files]
    return Report(text, files, tables, trials, objective)


def html_report(state: dict[str, Any], tables: dict[str, list[dict[str, Any]]], unfinished: list[Trial],
                plots: list[Path]) -> str:
    """The report as one self-contained HTML page: the tables and the plots embedded as data URIs."""
    import base64
    import html

    def table(rows: list[dict[str, Any]]) -> str:
        cols = list(rows[0])
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(r[c] if isinstance(r[c], str) else _fmt(c, r[c]))}</td>"
                                         for c in cols) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [f"<h1>Sweep {html.escape(state['name'])} (space {html.escape(state['space'])})</h1>",
             f"<p>Objective: {html.escape(', '.join(state['objective']))} ({html.escape(', '.join(state['modes']))});"
             f" each row is the best finished trial of its method, at its best epoch. MLflow parent run "
             f"<code>{html.escape(state['parent_run_id'])}</code>.</p>"]
    for bench, rows in tables.items():
        parts += [f"<h2>{html.escape(bench)}</h2>", table(rows) if rows else "<p>no trials</p>"]
    if unfinished:
        parts += ["<h2>Trials that did not finish</h2>", table([
            {"trial": t.name, "benchmark": t.benchmark, "method": t.group, "lr": t.lr, "status": t.status,
             "why": t.why or "-"} for t in unfinished])]
    for path in plots:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(path.name)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
             "td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>flat-ray sweep {html.escape(state['name'])}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
