"""Model assets, below the pipeline: the work directory, the cached tiny model and the demo's original and retain
models.

The original is the tiny model fine-tuned on all demo authors with the background split (``full_with_background``);
the retain model has the same recipe without the authors to forget. Fine-tuning is a Ray Train run, which lives
above this layer (``flat_ray.launch``), so whoever may build a model passes the fine-tune function in: nothing here
imports the launch layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from flat_ray.config import RECIPES, RunConfig, load_config
from flat_ray.data import BENCHMARKS, BUILTIN_TEMPLATES
from flat_ray.data.demo import demo_texts
from flat_ray.losses import METHODS
from flat_ray.models import DEMO_ORIGINAL, TINY, TinySpec, cached_tiny_model

log = logging.getLogger(__name__)

# The demo's model: big enough (about 1 M parameters) to keep forget and retain authors apart, small enough to
# fine-tune on two CPU cores in under two minutes.
# The training code's own part of a built model's recipe: raise it when a change of the code (not of the config)
# changes what a fine-tune produces, so cached models are rebuilt. 2: the Hugging Face warm-up (first step at lr
# 0) and Phi's answer tag in the labels (2026-12-08).
TRAINING_CODE = 2
DEMO_SPEC = TinySpec(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4)

# runs a fine-tuning config to the end and returns the exported model directory
FineTune = Callable[[RunConfig], Path]


def workdir(cfg: RunConfig) -> Path:
    return Path(cfg.paths.workdir).expanduser().resolve()


def tiny_model_path(cfg: RunConfig) -> Path:
    """The cached tiny model, built from the demo text and the built-in templates on first use."""
    return cached_tiny_model(demo_texts() + list(BUILTIN_TEMPLATES), workdir(cfg) / "models", DEMO_SPEC)


def demo_finetune_config(cfg: RunConfig) -> RunConfig:
    """The recipe of the demo's original model, run with ``cfg``'s workers, precision and paths. Its ZeRO stage is
    the recipe's own (0: a model of a million parameters needs no sharding, and on CPU/gloo ZeRO-3's per-layer
    gathers made each step 1.6 times slower)."""
    base = load_config(None, [], presets=["demo", "finetune", "demo_finetune"])
    # where and on what it runs are cfg's; what it checkpoints and exports is the recipe's (a sweep cell's trials
    # export nothing themselves and rank checkpoints by the sweep's objective, but the model must be written)
    b = base.launch
    launch = dataclasses.replace(cfg.launch, checkpoint_every_epochs=b.checkpoint_every_epochs,
                                 keep_checkpoints=b.keep_checkpoints, checkpoint_metric=b.checkpoint_metric,
                                 export=b.export)
    # the recipe's method is plain fine-tuning: the demo's unlearning knobs (divergence, beta, ...) are not part of it
    method = type(base.method)(name=base.method.name)
    deepspeed = dataclasses.replace(base.deepspeed, precision=cfg.deepspeed.precision)
    return dataclasses.replace(base, method=method, deepspeed=deepspeed, launch=launch, paths=cfg.paths,
                               tracking=dataclasses.replace(cfg.tracking, run_name=None, log_model_max_mb=0))


def demo_retain_config(cfg: RunConfig) -> RunConfig:
    """The recipe of the demo's retain model: the original's, with the forget split's complement in place of all
    authors (forget10: ``full_with_background`` -> ``retain90_with_background``), so it never sees the authors to
    forget (TOFU's retain model, the forget-quality reference)."""
    retain = BENCHMARKS["demo"].retain_of[cfg.data.split]  # check_inputs has refused any other split
    ft = demo_finetune_config(cfg)
    return dataclasses.replace(ft, data=dataclasses.replace(ft.data, split=ft.data.split.replace("full", retain, 1)))


def recipe_retain_config(cfg: RunConfig) -> RunConfig:
    """``eval.retain_recipe``: the fine-tuning config that made the original (its base model, epochs, lr, batch),
    on the forget split's complement, with ``cfg``'s data (benchmark, data_dir, sequence length), engine, workers
    and paths. It evaluates once, at its end, with ``cfg``'s evaluation settings and writes those per-question logs
    (the forget-quality reference)."""
    recipe = cfg.eval.retain_recipe
    base = (load_config(None, [], presets=["finetune", recipe]) if recipe in RECIPES
            else load_config(recipe, [], presets=["finetune"]))
    retain = BENCHMARKS[cfg.data.benchmark].retain_of[cfg.data.split]  # check_inputs has refused any other split
    data = dataclasses.replace(cfg.data, split=retain)
    b = base.launch
    launch = dataclasses.replace(cfg.launch, checkpoint_every_epochs=b.checkpoint_every_epochs,
                                 keep_checkpoints=0, checkpoint_metric=None, export="last")
    epochs = base.optim.epochs
    evaluation = dataclasses.replace(cfg.eval, reference=None, retain_recipe=None, save_logs=True,
                                     every_epochs=epochs, interim_examples=None)
    return dataclasses.replace(base, data=data, eval=evaluation, deepspeed=cfg.deepspeed, launch=launch,
                               paths=cfg.paths, tracking=dataclasses.replace(cfg.tracking, run_name=None,
                                                                             log_model_max_mb=0))


def recipe_retain_path(cfg: RunConfig) -> Path:
    """Where the retain model built from ``eval.retain_recipe`` for ``cfg``'s forget split is cached."""
    return _recipe_path(recipe_retain_config(cfg), "retain", prefix="recipe")


def _recipe_path(ft: RunConfig, kind: str, prefix: str = "demo") -> Path:
    """A fine-tuned demo model's cache folder, named by a hash of everything that shapes it (the tiny model, the
    fine-tuning recipe and its data split, workers, ZeRO stage), so a change of any of them rebuilds it."""
    recipe = {k: v for k, v in ft.to_dict().items() if k in ("model", "data", "optim", "deepspeed")}
    # the method's name and the knobs it reads (a knob added for another method leaves the cache as it is)
    recipe["method"] = {"name": ft.method.name, **{k: getattr(ft.method, k) for k in METHODS[ft.method.name].knobs}}
    recipe["world_size"] = ft.launch.num_workers
    recipe["tiny"] = tiny_model_path(ft).name
    recipe["training_code"] = TRAINING_CODE
    if prefix != "demo":  # what the built model is evaluated with is part of what is cached
        recipe["eval"] = ft.to_dict()["eval"]
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return workdir(ft) / "models" / f"{prefix}-{kind}-{digest}"


def demo_original_path(cfg: RunConfig) -> Path:
    """Where the demo's original model for ``cfg`` is cached."""
    return _recipe_path(demo_finetune_config(cfg), "original")


def demo_retain_path(cfg: RunConfig) -> Path:
    """Where the demo's retain model for ``cfg``'s forget split is cached."""
    return _recipe_path(demo_retain_config(cfg), "retain")


def _ensure_built(target: Path, ft: RunConfig, finetune: FineTune, what: str) -> Path:
    if (target / "config.json").is_file():
        return target
    log.info("building the demo's %s model (fine-tuning the tiny model on %s)", what, ft.data.split)
    model_dir = finetune(dataclasses.replace(ft, tracking=dataclasses.replace(ft.tracking, run_name=target.name)))
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    tmp.rename(target)
    return target


def ensure_demo_original(cfg: RunConfig, finetune: FineTune) -> Path:
    """Build (once, with ``finetune``) and return the demo's original model."""
    return _ensure_built(demo_original_path(cfg), demo_finetune_config(cfg), finetune, "original")


def ensure_demo_retain(cfg: RunConfig, finetune: FineTune) -> Path:
    """Build (once, with ``finetune``) and return the demo's retain model for ``cfg``'s forget split."""
    return _ensure_built(demo_retain_path(cfg), demo_retain_config(cfg), finetune, "retain")


def resolve_model_path(cfg: RunConfig, finetune: FineTune | None = None) -> str:
    """Sentinels become cached local models: ``tiny`` is built; ``demo`` is built and fine-tuned with
    ``finetune``, or without one (a dry run never trains) the cached original if there is one, else ``tiny``."""
    if cfg.model.name_or_path == TINY:
        return str(tiny_model_path(cfg))
    if cfg.model.name_or_path == DEMO_ORIGINAL:
        if finetune is not None:
            return str(ensure_demo_original(cfg, finetune))
        cached = demo_original_path(cfg)
        return str(cached) if (cached / "config.json").is_file() else str(tiny_model_path(cfg))
    return cfg.model.name_or_path
