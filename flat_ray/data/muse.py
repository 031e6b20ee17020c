"""MUSE-News (muse-bench/MUSE-News): the hub dataset through ``datasets``, or a local directory with the same
layout, ``{data_dir}/{config}/{split}.jsonl`` (or ``.json``), e.g. ``raw/forget.jsonl``, ``verbmem/forget.jsonl``,
``knowmem/retain_qa.jsonl``, ``privleak/holdout.jsonl``.

flat_ray's split names: ``forget``, ``retain1``, ``retain2``, ``holdout`` (raw news text; training cuts it into
prompt/continuation chunks, see :mod:`flat_ray.data.text`) and the evaluation splits ``verbmem_forget``
(``prompt``, ``gt``), ``knowmem_{forget,retain}_qa`` and ``knowmem_{forget,retain}_qa_icl`` (``question``,
``answer``), ``privleak_{forget,retain,holdout}`` (``text``).
"""

from __future__ import annotations

from pathlib import Path

from flat_ray.data.files import read_rows
from flat_ray.errors import FlatRayError

HUB_ID = "muse-bench/MUSE-News"
# flat_ray split -> (hub config, hub split)
SPLIT_SOURCES = {
    "forget": ("raw", "forget"),
    "retain1": ("raw", "retain1"),
    "retain2": ("raw", "retain2"),
    "holdout": ("raw", "holdout"),
    "verbmem_forget": ("verbmem", "forget"),
    "knowmem_forget_qa": ("knowmem", "forget_qa"),
    "knowmem_retain_qa": ("knowmem", "retain_qa"),
    "knowmem_forget_qa_icl": ("knowmem", "forget_qa_icl"),
    "knowmem_retain_qa_icl": ("knowmem", "retain_qa_icl"),
    "privleak_forget": ("privleak", "forget"),
    "privleak_retain": ("privleak", "retain"),
    "privleak_holdout": ("privleak", "holdout"),
}
FIELDS = {"raw": ("text",), "privleak": ("text",), "verbmem": ("prompt", "gt"), "knowmem": ("question", "answer")}
SPLITS = tuple(SPLIT_SOURCES)
FORGET_SPLITS = ("forget",)
RETAIN_OF = {"forget": "retain1"}


def _source(split: str) -> tuple[str, str]:
    if split not in SPLIT_SOURCES:
        raise FlatRayError(f"unknown MUSE-News split {split!r}; valid choices: {', '.join(SPLITS)}")
    return SPLIT_SOURCES[split]


def locate(data_dir: str, split: str) -> Path:
    """The local file of ``split`` in MUSE's layout under ``data_dir``; raises when it is not there."""
    config, hub_split = _source(split)
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise FlatRayError(f"data.data_dir {str(d)!r} is not a directory")
    for suffix in (".jsonl", ".json"):
        if (d / config / f"{hub_split}{suffix}").is_file():
            return d / config / f"{hub_split}{suffix}"
    raise FlatRayError(f"no {config}/{hub_split}.jsonl or .json under data.data_dir {str(d)!r} (MUSE-News "
                       "layout: {config}/{split}.jsonl)")


def load_muse(split: str, data_dir: str | None = None) -> list[dict]:
    config, hub_split = _source(split)
    if data_dir:
        return read_rows(locate(data_dir, split), required=FIELDS[config])
    import datasets

    try:
        ds = datasets.load_dataset(HUB_ID, config, split=hub_split)
    except Exception as exc:  # ConnectionError, DatasetNotFoundError, ...
        raise FlatRayError(f"cannot load {HUB_ID} config {config!r} split {hub_split!r} ({type(exc).__name__}); "
                           "offline? set data.data_dir to a directory with MUSE's layout ({config}/{split}.jsonl)"
                           ) from exc
    return [dict(r) for r in ds]
