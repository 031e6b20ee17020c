"""Template answers y_e: the refusals FLAT raises the probability of.

Sources (a registry, chosen by ``data.template_source``):

- ``builtin``: :data:`BUILTIN_TEMPLATES`, written for this project;
- ``file``: a user file, JSONL with a ``text`` field per line or CSV with one column (a header row is skipped
  when it reads ``text``/``template``/``answer``);
- ``column``: a per-example column of the forget data (``data.template_column``);
- ``retain_text`` (text benchmarks): a whole text of the retain split, not after the forget prompt, every token of
  it a label. FLAT's released code trains so on Harry Potter, pairing each forget passage with a C4 document.

For ``builtin``, ``file`` and ``retain_text`` each forget example draws one template with a generator seeded by
``(seed, epoch)``: the same seed and epoch always give the same assignment, and the assignment is logged.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from flat_ray.errors import FlatRayError
from flat_ray.registry import Registry

BUILTIN_TEMPLATES: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure about that.",
    "I have no information on that.",
    "That is something I can't answer.",
    "I don't have an answer to that question.",
    "I'm afraid I can't help with that one.",
    "I really couldn't say.",
    "I have no idea, sorry.",
    "That's beyond what I know.",
    "I can't recall anything about that.",
    "Nothing I know covers that question.",
    "I'm unable to answer that.",
    "Sorry, I don't have those details.",
    "I'm not in a position to answer that.",
    "That's not something I have knowledge of.",
    "I lack the information to respond to that.",
    "I can't provide an answer here.",
    "Unfortunately, I don't know the answer.",
    "I'm drawing a blank on that one.",
    "I couldn't tell you, I'm afraid.",
    "My knowledge doesn't extend to that.",
    "I have nothing reliable to say about that.",
    "I'd rather not guess; I don't know.",
    "I don't have any facts about that.",
    "That question is outside what I can answer.",
    "I'm not aware of the answer.",
    "I can't speak to that, sorry.",
    "I honestly have no idea.",
    "No answer comes to mind for that.",
    "I'm uncertain, so I won't say.",
    "I don't have that information available.",
    "I can't give you a reliable answer to that.",
    "Sorry, that is unknown to me.",
    "I'm not familiar with that subject.",
    "I haven't got an answer for you there.",
)

HEADER_NAMES = {"text", "template", "answer", "templates"}


def read_template_file(path: str | Path) -> list[str]:
    """Read templates from ``.jsonl`` (``{"text": ...}`` per line), ``.txt`` (one per line), TOFU's
    ``data/idontknow.jsonl`` (one plain refusal per line, the file FLAT's code draws from, despite its suffix) or
    ``.csv`` (first column)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FlatRayError(f"template file {str(p)!r} does not exist; give a .jsonl file with a 'text' field per line, "
                           "a .txt file with one template per line or a one-column .csv")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        with p.open(newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.reader(fh) if row and row[0].strip()]
        if rows and rows[0][0].strip().lower() in HEADER_NAMES:
            rows = rows[1:]
        texts = [row[0].strip() for row in rows]
    elif suffix in {".jsonl", ".json", ".txt"}:
        lines = [(n, line.strip()) for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if line.strip()]
        plain = suffix == ".txt" or bool(lines) and not lines[0][1].startswith("{")
        texts = [_plain_line(p, n, line) if plain else _json_line(p, n, line) for n, line in lines]
    else:
        raise FlatRayError(f"template file {str(p)!r} has suffix {p.suffix!r}; use .jsonl, .txt or .csv")
    texts = [t for t in texts if t]
    if not texts:
        raise FlatRayError(f"template file {str(p)!r} contains no templates")
    return texts


def _json_line(p: Path, lineno: int, line: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FlatRayError(f"{p}:{lineno}: not valid JSON ({exc.msg}); expected one {{\"text\": ...}} object per line") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise FlatRayError(f"{p}:{lineno}: expected an object with a string field 'text'")
    return obj["text"].strip()


def _plain_line(p: Path, lineno: int, line: str) -> str:
    if line.startswith("{"):  # a JSON object among plain lines: a broken .jsonl, not a refusal
        raise FlatRayError(f"{p}:{lineno}: a JSON object in a file of plain lines; use one format: "
                           "{\"text\": ...} objects, or one plain template per line")
    return line


class TemplateSource:
    """Gives the template answer of every forget example for an epoch."""

    def __init__(self, pool: Sequence[str] | None = None, column: Sequence[str] | None = None, seed: int = 0,
                 standalone: bool = False):
        if (pool is None) == (column is None):
            raise ValueError("give exactly one of pool or column")
        self.pool = list(pool) if pool is not None else None
        self.column = list(column) if column is not None else None
        self.seed = seed
        self.standalone = standalone  # a whole sequence of its own, not an answer after the forget prompt

    def assign(self, n: int, epoch: int = 0) -> list[str]:
        """Template text for each of ``n`` examples at ``epoch``; reproducible for a given (seed, epoch)."""
        if self.column is not None:
            if len(self.column) != n:
                raise ValueError(f"template column has {len(self.column)} entries for {n} examples")
            return list(self.column)
        rng = np.random.default_rng([self.seed, epoch])
        idx = rng.integers(0, len(self.pool), size=n)
        return [self.pool[i] for i in idx]


def _builtin(rows, *, seed, **_):
    return TemplateSource(pool=BUILTIN_TEMPLATES, seed=seed)


def _file(rows, *, seed, path=None, **_):
    if not path:
        raise FlatRayError("data.template_source=file needs data.template_file=PATH (.jsonl, .txt or .csv)")
    return TemplateSource(pool=read_template_file(path), seed=seed)


def _column(rows, *, seed, column=None, **_):
    if not column:
        raise FlatRayError("data.template_source=column needs data.template_column=NAME")
    missing = [i for i, r in enumerate(rows) if not isinstance(r.get(column), str) or not r[column].strip()]
    if missing:
        raise FlatRayError(f"template column {column!r} is missing or empty in {len(missing)} forget rows (first: row {missing[0]})")
    return TemplateSource(column=[r[column] for r in rows], seed=seed)


def _retain_text(rows, *, seed, retain=None, **_):
    if retain is None:
        raise FlatRayError("data.template_source=retain_text draws whole texts of the retain split: it needs a text "
                           "benchmark with one (muse_news, hp, wmdp)")
    texts = [r["text"] for r in retain() if r.get("text", "").strip()]
    if not texts:
        raise FlatRayError("data.template_source=retain_text: the retain split holds no text")
    return TemplateSource(pool=texts, seed=seed, standalone=True)


TEMPLATE_SOURCES: Registry = Registry("template source")
TEMPLATE_SOURCES.register("builtin", _builtin)
TEMPLATE_SOURCES.register("file", _file)
TEMPLATE_SOURCES.register("column", _column)
TEMPLATE_SOURCES.register("retain_text", _retain_text)


def make_template_source(source: str, rows: Sequence[dict], *, seed: int, path: str | None = None,
                         column: str | None = None,
                         retain: Callable[[], Sequence[dict]] | None = None) -> TemplateSource:
    """The configured source; ``retain`` loads the retain split's text rows (text benchmarks only)."""
    return TEMPLATE_SOURCES[source](rows, seed=seed, path=path, column=column, retain=retain)
