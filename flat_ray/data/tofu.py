"""TOFU (locuslab/TOFU): the hub dataset through ``datasets``, or a local directory with the same file names."""

from __future__ import annotations

from flat_ray.data.files import find_split_file, read_rows
from flat_ray.errors import FlatRayError

HUB_ID = "locuslab/TOFU"
FORGET_SPLITS = ("forget01", "forget05", "forget10")
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
HOLDOUT_OF = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}
SPLITS = (
    "full",
    *FORGET_SPLITS,
    "retain90",
    "retain95",
    "retain99",
    *(f"{s}_perturbed" for s in FORGET_SPLITS),
    "retain_perturbed",
    "real_authors_perturbed",
    "world_facts_perturbed",
    *HOLDOUT_OF.values(),
)
EVAL_SPLITS = {"retain": "retain_perturbed", "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed"}


def load_tofu(split: str, data_dir: str | None = None) -> list[dict]:
    """Rows of a TOFU split: from ``data_dir/{split}.json[l]`` when given, else from the hub."""
    if data_dir:
        return read_rows(find_split_file(data_dir, split))
    if split not in SPLITS:
        raise FlatRayError(f"unknown TOFU split {split!r}; valid choices: {', '.join(SPLITS)}")
    import datasets

    try:
        ds = datasets.load_dataset(HUB_ID, split, split="train")
    except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        raise FlatRayError(
            f"cannot load {HUB_ID} config {split!r} ({type(exc).__name__}); offline? set data.data_dir to a "
            f"directory holding {split}.json or {split}.jsonl with TOFU's fields"
        ) from exc
    return [dict(r) for r in ds]
