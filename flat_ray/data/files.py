"""Reading QA rows from local JSON / JSONL files, with schema checks that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from flat_ray.errors import FlatRayError


def read_rows(path: str | Path, required: tuple[str, ...] = ("question", "answer")) -> list[dict]:
    """Rows of a ``.jsonl`` file, or of a ``.json`` file holding a list or JSON lines (TOFU's hub files are
    JSON lines named ``.json``). Every row must be an object with the ``required`` fields."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    rows: list = []
    try:
        loaded = json.loads(text) if p.suffix == ".json" else None
    except json.JSONDecodeError:
        loaded = None
    if isinstance(loaded, list):
        rows = loaded
    elif isinstance(loaded, dict):
        rows = [loaded]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise FlatRayError(f"{p}:{lineno}: not valid JSON ({exc.msg}); expected one object per line") from exc
    if not rows:
        raise FlatRayError(f"{p} contains no rows")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise FlatRayError(f"{p}: row {i} is not a JSON object")
        missing = [k for k in required if k not in row]
        if missing:
            raise FlatRayError(f"{p}: row {i} lacks field(s) {', '.join(missing)}; each row needs {', '.join(required)}")
    return rows


def find_split_file(data_dir: str | Path, split: str) -> Path:
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise FlatRayError(f"data.data_dir {str(d)!r} is not a directory")
    for suffix in (".jsonl", ".json"):
        candidate = d / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    present = sorted(p.stem for p in d.iterdir() if p.suffix in (".json", ".jsonl"))
    raise FlatRayError(f"no {split}.jsonl or {split}.json in {str(d)!r}; splits there: {', '.join(present) or 'none'}")
