"""Harry-Potter-style copyright unlearning on text the user supplies; the book is never shipped or downloaded.

``data.data_dir`` holds ``forget.txt`` (paragraphs separated by blank lines) or ``forget.jsonl`` with a ``text``
field: the text to forget. The retain set is ``retain.txt``/``retain.jsonl`` from the same directory or, when
that is absent and the hub is reachable, a fixed seeded sample of 400 paragraphs of C4 (``allenai/c4``, English
validation) downloaded once through ``datasets``. Splits: ``forget`` and ``retain``; training cuts both into
prompt/continuation chunks of at most ``data.chunk_tokens`` tokens (:mod:`flat_ray.data.text`).
"""

from __future__ import annotations

import random

from flat_ray.data.text import find_text_file, read_text_rows
from flat_ray.errors import FlatRayError

SPLITS = ("forget", "retain")
FORGET_SPLITS = ("forget",)
RETAIN_OF = {"forget": "retain"}
C4 = ("allenai/c4", "en", "validation")
RETAIN_SAMPLE = 400


def locate(data_dir: str, split: str) -> None:
    """Raise unless ``data_dir`` holds the forget text (the retain text may come from C4)."""
    from pathlib import Path

    if split not in SPLITS:
        raise FlatRayError(f"unknown hp split {split!r}; valid choices: {', '.join(SPLITS)}")
    if not Path(data_dir).expanduser().is_dir():
        raise FlatRayError(f"data.data_dir {data_dir!r} is not a directory")
    if split == "forget" and find_text_file(data_dir, "forget") is None:
        raise FlatRayError(f"no forget.txt, forget.jsonl or forget.json in data.data_dir {data_dir!r}")


def load_hp(split: str, data_dir: str | None = None) -> list[dict]:
    if not data_dir:
        raise FlatRayError("benchmark hp needs data.data_dir: a directory with forget.txt or forget.jsonl holding "
                           "the text to unlearn (flat-ray never downloads it)")
    locate(data_dir, split)
    path = find_text_file(data_dir, split)
    return read_text_rows(path) if path is not None else c4_sample(RETAIN_SAMPLE, seed=0)


def c4_sample(n: int, seed: int) -> list[dict]:
    """``n`` C4 paragraphs, the same ones for the same seed (streamed; only when the hub is reachable)."""
    import datasets

    try:
        stream = datasets.load_dataset(C4[0], C4[1], split=C4[2], streaming=True)
        pool = [{"text": r["text"]} for _, r in zip(range(20 * n), stream, strict=False)]
    except Exception as exc:
        raise FlatRayError(f"no retain.txt/retain.jsonl in data.data_dir and C4 cannot be loaded "
                           f"({type(exc).__name__}); offline? put retain paragraphs in retain.txt") from exc
    return random.Random(seed).sample(pool, min(n, len(pool)))
