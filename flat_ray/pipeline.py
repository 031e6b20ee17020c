"""From a validated :class:`RunConfig` to the objects a run needs: model path, model and tokenizer, forget
dataset with template answers, collator (flat_ray.dryrun builds them and computes the loss on one batch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flat_ray.assets import resolve_model_path
from flat_ray.config import RunConfig
from flat_ray.data import (
    BENCHMARKS,
    Collator,
    TemplateSource,
    UnlearnDataset,
    load_split,
    make_template_source,
)
from flat_ray.data.text import chunk_rows
from flat_ray.losses import METHODS
from flat_ray.losses.flat import PADDED_TO_MAX_LENGTH
from flat_ray.models import (
    PROFILES,
    load_model_and_tokenizer,
    resolve_profile,
)


@dataclass
class Prepared:
    model: Any
    tokenizer: Any
    dataset: UnlearnDataset
    collator: Collator
    model_path: str


def profile_for(cfg: RunConfig, model_name: str, tokenizer: Any) -> Any:
    """The prompt profile: ``raw`` for text benchmarks, else the model's (``model.profile``)."""
    if BENCHMARKS[cfg.data.benchmark].text:
        return PROFILES["raw"]
    return resolve_profile(cfg.model.profile, model_name, tokenizer)


def _rows(cfg: RunConfig, tokenizer: Any, rows: list[dict]) -> list[dict]:
    """Text benchmarks: cut raw text into prompt/continuation rows (flat_ray.data.text)."""
    if BENCHMARKS[cfg.data.benchmark].text:
        return chunk_rows(rows, tokenizer, cfg.data.chunk_tokens, cfg.data.prompt_fraction)
    return rows


def build_dataset(cfg: RunConfig, tokenizer: Any, profile: Any, rows: list[dict] | None = None) -> UnlearnDataset:
    """The training dataset with exactly the splits the configured method needs (forget, template, retain)."""
    splits = METHODS[cfg.method.name].splits(vars(cfg.method))
    if rows is None:
        rows = load_split(cfg.data.benchmark, cfg.data.split, cfg.data.data_dir)
    rows = _rows(cfg, tokenizer, rows)
    templates = template_source(cfg, rows) if "template" in splits else None
    retain_rows = _rows(cfg, tokenizer, load_split(cfg.data.benchmark, cfg.retain_split(), cfg.data.data_dir)) \
        if "retain" in splits else None
    return UnlearnDataset(rows, tokenizer, profile, templates, max_length=cfg.data.max_length,
                          retain_rows=retain_rows, seed=cfg.optim.seed)


def template_source(cfg: RunConfig, rows: list[dict]) -> TemplateSource:
    """The configured template source; ``retain_text`` draws from the retain split of a text benchmark."""
    split = cfg.retain_split()
    retain = (lambda: load_split(cfg.data.benchmark, split, cfg.data.data_dir)) \
        if BENCHMARKS[cfg.data.benchmark].text and split else None
    return make_template_source(cfg.data.template_source, rows, seed=cfg.optim.seed, path=cfg.data.template_file,
                                column=cfg.data.template_column, retain=retain)


def train_collator(cfg: RunConfig, tokenizer: Any) -> Collator:
    """The training batches' collator: each split padded to its own longest sequence, or to ``data.max_length``
    where the method's score divides by the padded length (FLAT's ``repo`` normalization: the released code pads
    every sequence to its max_length)."""
    fixed = "normalize" in METHODS[cfg.method.name].knobs and cfg.method.normalize in PADDED_TO_MAX_LENGTH
    return Collator(tokenizer.pad_token_id, pad_to_multiple_of=cfg.data.max_length if fixed else None)


def prepare(cfg: RunConfig, *, load_model: bool = True) -> Prepared:
    # data first: a bad data file should fail before a model is built or downloaded
    rows = load_split(cfg.data.benchmark, cfg.data.split, cfg.data.data_dir)
    path = resolve_model_path(cfg)  # a dry run never fine-tunes: the cached demo original, else the tiny model
    model, tokenizer = load_model_and_tokenizer(
        path, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision, load_model=load_model,
        tokenizer=cfg.model.tokenizer)
    profile = profile_for(cfg, path, tokenizer)
    dataset = build_dataset(cfg, tokenizer, profile, rows)
    return Prepared(model, tokenizer, dataset, train_collator(cfg, tokenizer), path)


