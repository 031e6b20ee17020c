"""WMDP (Li et al. 2024): unlearning hazardous biosecurity and cybersecurity knowledge from corpora the user
supplies in ``data.data_dir`` (WMDP's authors share the bio forget corpus on request; nothing is downloaded).

The folder (or its ``wmdp-corpora/`` subfolder, the layout of WMDP's release) holds JSONL files with a ``text``
field: ``bio-forget-corpus.jsonl``, ``bio-retain-corpus.jsonl``, ``cyber-forget-corpus.jsonl`` and
``cyber-retain-corpus.jsonl``. Splits: ``bio`` and ``cyber`` (the forget corpora) and ``bio_retain`` /
``cyber_retain``; training cuts them into prompt/continuation chunks (:mod:`flat_ray.data.text`), as open-unlearning
trains on them. Evaluation is lm-eval's ``wmdp_bio`` / ``wmdp_cyber`` multiple-choice accuracy (forgetting) and
``mmlu`` (utility): :mod:`flat_ray.eval.wmdp`.
"""

from __future__ import annotations

from pathlib import Path

from flat_ray.data.text import read_text_rows
from flat_ray.errors import FlatRayError

CORPORA = {"bio": "bio-forget-corpus", "cyber": "cyber-forget-corpus", "bio_retain": "bio-retain-corpus",
           "cyber_retain": "cyber-retain-corpus"}
SPLITS = tuple(CORPORA)
FORGET_SPLITS = ("bio", "cyber")
RETAIN_OF = {"bio": "bio_retain", "cyber": "cyber_retain"}
EXPECTED = ", ".join(f"{name}.jsonl" for name in CORPORA.values())


def locate(data_dir: str, split: str) -> Path:
    """The corpus file of ``split`` in ``data_dir`` (or its ``wmdp-corpora/``); raises naming the expected files."""
    if split not in SPLITS:
        raise FlatRayError(f"unknown WMDP split {split!r}; valid choices: {', '.join(SPLITS)}")
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise FlatRayError(f"data.data_dir {data_dir!r} is not a directory")
    for folder in (d, d / "wmdp-corpora"):
        if (folder / f"{CORPORA[split]}.jsonl").is_file():
            return folder / f"{CORPORA[split]}.jsonl"
    raise FlatRayError(f"data.data_dir {data_dir!r} has no {CORPORA[split]}.jsonl (split {split}); WMDP's corpora "
                       f"are expected there or in its wmdp-corpora/ folder: {EXPECTED}")


def load_wmdp(split: str, data_dir: str | None = None) -> list[dict]:
    if not data_dir:
        raise FlatRayError(f"benchmark wmdp needs data.data_dir: a folder with WMDP's corpora ({EXPECTED}); "
                           "flat-ray never downloads them")
    return read_text_rows(locate(data_dir, split))
