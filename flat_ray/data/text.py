"""Raw-text benchmarks (MUSE-News, Harry-Potter-style books): reading text files and cutting text into
prompt/continuation rows.

Training rows of a text benchmark hold ``text``. :func:`chunk_rows` cuts every text into windows of at most
``chunk_tokens`` tokens and splits each window at ``prompt_fraction`` of its tokens: the first part becomes the
"question" (the prompt, never trained on) and the rest the "answer" (the continuation to forget; FLAT pairs it
with a template answer after the same prompt). Windows shorter than 8 tokens are dropped. Texts are joined with a
blank line before cutting, so a window can span two short documents, as MUSE's own chunking does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flat_ray.data.files import read_rows
from flat_ray.errors import FlatRayError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


def read_text_rows(path: str | Path) -> list[dict]:
    """``{"text": ...}`` rows of a ``.txt`` file (paragraphs split on blank lines) or a JSON/JSONL file with a
    ``text`` field."""
    p = Path(path)
    if p.suffix == ".txt":
        paragraphs = [block.strip() for block in p.read_text(encoding="utf-8").split("\n\n")]
        rows = [{"text": t} for t in paragraphs if t]
        if not rows:
            raise FlatRayError(f"{p} contains no text")
        return rows
    return read_rows(p, required=("text",))


def find_text_file(data_dir: str | Path, name: str) -> Path | None:
    """``data_dir/name.{txt,jsonl,json}`` or None."""
    d = Path(data_dir).expanduser()
    for suffix in TEXT_SUFFIXES:
        if (d / f"{name}{suffix}").is_file():
            return d / f"{name}{suffix}"
    return None


def chunk_rows(rows: Sequence[dict], tokenizer: Any, chunk_tokens: int, prompt_fraction: float) -> list[dict]:
    """Text rows -> ``{"question": prompt, "answer": continuation}`` rows (see the module docstring). Rows that
    already have a question and an answer pass through unchanged."""
    if not rows or "question" in rows[0]:
        return list(rows)
    ids = tokenizer("\n\n".join(r["text"] for r in rows), add_special_tokens=False)["input_ids"]
    out = []
    for start in range(0, len(ids), chunk_tokens):
        window = ids[start:start + chunk_tokens]
        if len(window) < 8:
            continue
        # prompt_fraction 0: no prompt, every token is trained on (MUSE's baselines train so)
        cut = 0 if prompt_fraction == 0 else max(1, min(len(window) - 1, round(len(window) * prompt_fraction)))
        prompt, answer = tokenizer.decode(window[:cut]), tokenizer.decode(window[cut:])
        if (prompt.strip() or not cut) and answer.strip():
            out.append({"question": prompt, "answer": answer})
    if not out:
        raise FlatRayError(f"the text is too short to cut into {chunk_tokens}-token chunks; give more text or a "
                           "smaller data.chunk_tokens")
    return out


def completion_rows(rows: Sequence[dict], prompt_words: int, max_rows: int | None) -> list[dict]:
    """Completion-test rows: the first ``prompt_words`` words of a passage as the prompt, the words after them as
    the true continuation; a passage of at most ``prompt_words`` words is cut in half instead (a one-word passage
    is skipped)."""
    out = []
    for r in rows:
        words = r["text"].split()
        if len(words) <= prompt_words:
            words_prompt, words_rest = words[: len(words) // 2], words[len(words) // 2:]
        else:
            words_prompt, words_rest = words[:prompt_words], words[prompt_words:]
        if words_prompt and words_rest:
            out.append({"prompt": " ".join(words_prompt), "continuation": " ".join(words_rest)})
        if max_rows and len(out) >= max_rows:
            break
    return out


def dump_jsonl(rows: Sequence[dict], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p
