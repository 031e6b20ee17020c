"""What a person sees on the driver's console: training and evaluation progress, per-epoch metric tables and
the live status of a sweep.

Rank 0 of a run sends small events (plain dicts) to the driver; :class:`RunConsole` turns them into progress
bars on a terminal and into plain lines at a bounded rate anywhere else (CI logs, ``ray job submit``).
:class:`SweepBoard` does the same for a sweep's trials. Nothing here imports Ray: the launch layer carries the
events (``flat_ray.launch.relay``).

Event kinds: ``start`` (total_steps, epochs, step), ``step`` (step, epoch, loss, lr), ``eval`` (epoch, split,
done, total), ``metrics`` (epoch, metrics) and ``line`` (text).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

SPLIT_COLUMNS = ("prob", "rougeL_recall", "truth_ratio")
LINE_EVERY_S = 30.0  # plain-line mode: at most one progress line per this many seconds (plus every tenth)


def is_terminal(stream: TextIO) -> bool:
    return stream.isatty() and os.environ.get("TERM") != "dumb"


def verbose() -> bool:
    """``flat-ray --verbose``: raw Ray, DeepSpeed and transformers logs on the console (inherited by the processes
    the driver starts, through the environment)."""
    return os.environ.get("FLAT_RAY_VERBOSE") == "1"


def format_value(value: Any) -> str:
    """Four decimals; scientific notation for values below 1e-3 (forget quality) or from 1e5."""
    if not isinstance(value, float):
        return str(value)
    if value != 0 and math.isfinite(value) and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4f}"


def metrics_table(metrics: Mapping[str, float], title: str = "") -> str:
    """An aligned table: one row per split for the per-split metrics (prob, ROUGE-L recall, truth ratio), then
    the other metrics as name/value rows."""
    splits = list(dict.fromkeys(k[: -len(c) - 1] for k in metrics for c in SPLIT_COLUMNS if k.endswith("_" + c)))
    grid = [[s, *(format_value(metrics[f"{s}_{c}"]) if f"{s}_{c}" in metrics else "-" for c in SPLIT_COLUMNS)]
            for s in splits]
    used = {f"{s}_{c}" for s in splits for c in SPLIT_COLUMNS}
    rest = [(k, format_value(v)) for k, v in metrics.items() if k not in used]
    lines = [title] if title else []
    if grid:
        head = ["split", *SPLIT_COLUMNS]
        width = [max(len(r[i]) for r in [head, *grid]) for i in range(len(head))]
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, width, strict=True)))
                  for row in [head, *grid]]
    if rest:
        width = max(len(k) for k, _ in rest)
        lines += [f"{k.ljust(width)}  {v}" for k, v in rest]
    return "\n".join(lines)


class _Bars:
    """Progress bars on a terminal (rich), one for training and one for the evaluation in progress."""

    def __init__(self, name: str, stream: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                 console=Console(file=stream), transient=False)
        self.name, self.train, self.eval = name, None, None
        self.progress.start()

    def start(self, total: int, done: int) -> None:
        if self.train is not None:  # the workers restarted from a checkpoint: the same bar goes on
            self.progress.update(self.train, completed=done)
            return
        self.print(f"{self.name}: {total} optimizer steps")
        self.train = self.progress.add_task("train", total=total, completed=done, info="")

    def step(self, ev: Mapping[str, Any]) -> None:
        if self.train is not None:
            self.progress.update(self.train, completed=ev["step"],
                                 info=f"epoch {ev['epoch']} loss {ev['loss']:.4f} lr {ev['lr']:.2e}")

    def evaluate(self, ev: Mapping[str, Any]) -> None:
        if self.eval is None:
            self.eval = self.progress.add_task("eval", total=ev["total"], info="")
        self.progress.update(self.eval, completed=ev["done"], total=ev["total"],
                             info=f"epoch {ev['epoch']}: {ev['split']}")
        if ev["done"] >= ev["total"]:
            self.progress.remove_task(self.eval)
            self.eval = None

    def print(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()


class _Lines:
    """The same information as plain lines at a bounded rate, for logs that are not a terminal."""

    def __init__(self, name: str, echo: Callable[[str], None]):
        self.name, self.echo = name, echo
        self.total, self.every, self.last = 0, 1, 0.0

    def start(self, total: int, done: int) -> None:
        self.total, self.every, self.last = total, max(1, total // 10), time.monotonic()

    def step(self, ev: Mapping[str, Any]) -> None:
        now = time.monotonic()
        if ev["step"] % self.every == 0 or ev["step"] == self.total or now - self.last >= LINE_EVERY_S:
            self.last = now
            self.echo(f"{self.name}: step {ev['step']}/{self.total} (epoch {ev['epoch']}) loss {ev['loss']:.5f} "
                      f"lr {ev['lr']:.2e}")

    def evaluate(self, ev: Mapping[str, Any]) -> None:
        if ev["done"] == 0:
            self.echo(f"{self.name}: evaluating (epoch {ev['epoch']}, {ev['total']} splits)")

    def print(self, text: str) -> None:
        self.echo(text)

    def close(self) -> None: ...


class RunConsole:
    """Renders one run's events: bars on a terminal, plain lines otherwise."""

    def __init__(self, name: str, stream: TextIO | None = None):
        stream = stream or sys.stdout
        self.name = name
        self.view: _Bars | _Lines = (_Bars(name, stream) if is_terminal(stream)
                                     else _Lines(name, lambda s: print(s, file=stream)))

    def handle(self, ev: Mapping[str, Any]) -> None:
        kind = ev.get("kind")
        if kind == "start":
            self.view.start(ev["total_steps"], ev.get("step", 0))
        elif kind == "step":
            self.view.step(ev)
        elif kind == "eval":
            self.view.evaluate(ev)
        elif kind == "metrics":
            self.view.print(metrics_table(ev["metrics"], f"{self.name}: evaluation after epoch {ev['epoch']}"))
        elif kind == "line":
            self.view.print(f"{self.name}: {ev['text']}")

    def close(self) -> None:
        self.view.close()


# ------------------------------------------------------------------------------------------------ sweeps
class SweepBoard:
    """A sweep's trials: a live table on a terminal (trial, state, epochs trained, the objective at its best epoch so
    far, the sweep's best so far), one
    line per finished trial otherwise."""

    def __init__(self, objective: list[str], modes: list[str], echo: Callable[[str], None],
                 stream: TextIO | None = None):
        self.objectives, self.objective, self.mode, self.echo = objective, objective[0], modes[0], echo
        self.rows: dict[str, dict[str, Any]] = {}
        self.best: float | None = None
        stream = stream or sys.stdout
        self.live = None
        if is_terminal(stream):
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self._table(), console=Console(file=stream), refresh_per_second=2, transient=False)
            self.live.start()

    def _table(self):
        from rich.table import Table

        table = Table(title=f"trials (objective {self.objective}, {self.mode})")
        for col in ("trial", "state", "epochs", f"{self.objective} (best epoch)", "best so far", "sampled"):
            table.add_column(col)
        best = "-" if self.best is None else format_value(self.best)
        for name, row in self.rows.items():
            value = row.get("value")
            table.add_row(name, row["state"], str(row.get("epoch", "-")),
                          "-" if value is None else format_value(value), best, row.get("sampled", ""))
        return table

    def _update(self, trial: str, **fields: Any) -> None:
        self.rows.setdefault(trial, {"state": "pending"}).update(fields)
        value = fields.get("value")
        if value is not None and (self.best is None or (value > self.best if self.mode == "max" else value < self.best)):
            self.best = value
        if self.live is not None:
            self.live.update(self._table())

    def started(self, trial: str, sampled: str) -> None:
        self._update(trial, state="running", sampled=sampled)

    def result(self, trial: str, result: Mapping[str, Any]) -> None:
        """``result`` is the trial's best epoch so far (``epoch``) and how far it got (``trained_epochs``)."""
        self._update(trial, epoch=result.get("trained_epochs", result.get("epoch", "-")),
                     value=result.get(self.objective))

    def finished(self, trial: str, result: Mapping[str, Any], sampled: str) -> None:
        self._update(trial, state="done", value=result.get(self.objective))
        if self.live is None:
            values = ", ".join(f"{m}={result[m]:.4g}" for m in self.objectives if m in result)
            at = f" (best epoch {result['epoch']})" if values and "epoch" in result else ""
            self.echo(f"trial {trial} done: {sampled or '-'} -> {values or 'no objective reported'}{at}")

    def failed(self, trial: str, where: str) -> None:
        self._update(trial, state=f"FAILED ({where}/error.txt)")
        if self.live is None:
            self.echo(f"trial {trial} FAILED: see {where}/error.txt")

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
