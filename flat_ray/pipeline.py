"""From a validated :class:`RunConfig` to the objects a run needs: model path, model and tokenizer, forget
dataset with template answers, collator. ``dry_run`` builds them and computes the loss on one batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flat_ray import lora
from flat_ray.assets import resolve_model_path
from flat_ray.config import RunConfig
from flat_ray.data import (
    BENCHMARKS,
    Collator,
    UnlearnDataset,
    load_split,
    make_template_source,
)
from flat_ray.data.text import chunk_rows
from flat_ray.losses import METHODS
from flat_ray.models import (
    PROFILES,
    count_parameters,
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
    templates = make_template_source(cfg.data.template_source, rows, seed=cfg.optim.seed, path=cfg.data.template_file,
                                     column=cfg.data.template_column) if "template" in splits else None
    retain_rows = _rows(cfg, tokenizer, load_split(cfg.data.benchmark, cfg.retain_split(), cfg.data.data_dir)) \
        if "retain" in splits else None
    return UnlearnDataset(rows, tokenizer, profile, templates, max_length=cfg.data.max_length,
                          retain_rows=retain_rows, seed=cfg.optim.seed)


def prepare(cfg: RunConfig, *, load_model: bool = True) -> Prepared:
    # data first: a bad data file should fail before a model is built or downloaded
    rows = load_split(cfg.data.benchmark, cfg.data.split, cfg.data.data_dir)
    path = resolve_model_path(cfg)  # a dry run never fine-tunes: the cached demo original, else the tiny model
    model, tokenizer = load_model_and_tokenizer(
        path, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision, load_model=load_model,
        tokenizer=cfg.model.tokenizer)
    profile = profile_for(cfg, path, tokenizer)
    dataset = build_dataset(cfg, tokenizer, profile, rows)
    return Prepared(model, tokenizer, dataset, Collator(tokenizer.pad_token_id), path)


def dry_run(cfg: RunConfig) -> dict[str, Any]:
    """Build model, data and one batch; compute the method's loss once (no optimizer step). Returns a summary."""
    import torch

    from flat_ray.engine.schedule import micro_batches_per_epoch, optimizer_steps
    from flat_ray.engine.step import method_loss

    method = METHODS[cfg.method.name]
    torch.manual_seed(cfg.optim.seed)
    prep = prepare(cfg)
    parameters = count_parameters(prep.model)  # the model's own (LoRA's adapters go into it in place)
    model = lora.apply(prep.model, cfg) if lora.enabled(cfg) else prep.model
    # a reference-model method gets a second, frozen load of the same weights, as in training (with LoRA: the
    # model with its adapter switched off)
    if not method.needs_reference:
        reference = None
    elif lora.enabled(cfg):
        reference = lora.AdapterOff(model)
    else:
        reference = load_model_and_tokenizer(prep.model_path, trust_remote_code=cfg.model.trust_remote_code,
                                             revision=cfg.model.revision)[0].eval()
    n = len(prep.dataset)
    batch = prep.collator([prep.dataset[i] for i in range(min(cfg.optim.micro_batch_size, n))])
    model.eval()
    with torch.no_grad():
        out = method_loss(model, batch, method, vars(cfg.method), reference)
    micro = micro_batches_per_epoch(n, cfg.optim.micro_batch_size, cfg.launch.num_workers)
    return {
        "model": prep.model_path,
        "parameters": parameters,
        "trainable_parameters": lora.counts(model)[0],
        "benchmark": f"{cfg.data.benchmark}/{cfg.data.split} ({BENCHMARKS[cfg.data.benchmark].description})",
        "forget_examples": n,
        "template_source": cfg.data.template_source,
        "first_templates": prep.dataset.assignment[:3],
        "method": f"{method.name} ({', '.join(f'{k}={getattr(cfg.method, k)}' for k in method.knobs)})",
        "optimizer_steps": optimizer_steps(micro, cfg.optim.epochs, cfg.optim.grad_accum_steps),
        "first_batch": {k: tuple(batch[k]["input_ids"].shape) for k in method.splits(vars(cfg.method))},
        **{f"first_batch_{k}": round(v, 6) for k, v in out.metrics.items()},
    }
