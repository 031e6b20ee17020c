"""Input checks that touch files: the template file, the data splits under ``data.data_dir``, the reference logs
and the retain recipe a config names exist and can be read. :mod:`flat_ray.config` only checks values (a Ray worker
rebuilds a config on a node that may lack the head's paths); these run where a config enters: the CLI, a run's
preflight, each sweep cell, ``flat-ray eval``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flat_ray.config import AUTO_REFERENCE, RECIPES, RunConfig
from flat_ray.data import BENCHMARKS
from flat_ray.data.templates import read_template_file
from flat_ray.errors import FlatRayError
from flat_ray.fileio import filesystem
from flat_ray.losses import METHODS
from flat_ray.models import DEMO_ORIGINAL, TINY

# the files and folders a config names that a run's Ray processes open, as ``(section, key)``
INPUT_PATHS = (("model", "name_or_path"), ("model", "tokenizer"), ("data", "data_dir"), ("data", "template_file"),
               ("eval", "reference"), ("eval", "completion_file"))
# those each worker opens itself (the driver reads ``eval.reference`` and sends its values with the run)
WORKER_INPUTS = tuple((section, key) for section, key in INPUT_PATHS if (section, key) != ("eval", "reference"))


def absolute_paths(cfg: RunConfig) -> dict[str, str]:
    """``section.key -> absolute path`` for every input path of ``cfg`` that exists here. Ray's processes do not share
    the command's working directory (a worker starts where its node's Ray started: a job's working directory on a
    cluster head is not where `ray start` ran), so a relative path would name another file there, or none."""
    out = {}
    for section, key in INPUT_PATHS:
        value = getattr(getattr(cfg, section), key)
        if value and Path(value).expanduser().exists():
            out[f"{section}.{key}"] = str(Path(value).expanduser().resolve())
    return out


def node_local_inputs(cfg: RunConfig, shared: Path) -> dict[str, str]:
    """The input paths of ``cfg`` that a run's workers open themselves (all but ``eval.reference``, which the driver
    reads and sends) and that are not on the filesystem of ``shared``, the storage every node mounts."""
    opened = {f"{section}.{key}" for section, key in WORKER_INPUTS}
    return {key: path for key, path in absolute_paths(cfg).items()
            if key in opened and filesystem(path) != filesystem(shared)}


def absolute_inputs(cfg: RunConfig) -> RunConfig:
    """``cfg`` with :func:`absolute_paths` in place of the paths it names."""
    for dotted, path in absolute_paths(cfg).items():
        section, key = dotted.split(".")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{key: path})})
    return cfg


def check_inputs(cfg: RunConfig, reference: bool = True) -> None:
    """The files a config names exist and can be read: the template file, the data split (and the retain split
    a method samples) under ``data.data_dir``, and ``eval.reference``. The dataclasses only check values; this
    runs where a config enters (the CLI, a run's preflight, each sweep cell), never again inside a Ray worker.
    ``reference=False`` (a sweep's dry run) leaves a missing ``eval.reference`` to be reported, not refused."""
    d = cfg.data
    if d.template_file and not Path(d.template_file).expanduser().is_file():
        raise FlatRayError(f"data.template_file {d.template_file!r} does not exist")
    if d.template_source == "file":  # an empty or malformed file fails here, not in a Ray worker
        read_template_file(Path(d.template_file).expanduser())
    _check_completion_file(cfg)
    if d.data_dir:
        bench = BENCHMARKS[d.benchmark]
        bench.locate(d.data_dir, d.split)  # names the splits that are there when this one is not
        if "retain" in METHODS[cfg.method.name].splits(vars(cfg.method)):
            bench.locate(d.data_dir, cfg.retain_split())
        if cfg.eval.enabled and cfg.eval.mia and d.split in bench.holdout_of:  # eval.mia=true: required
            bench.locate(d.data_dir, bench.holdout_of[d.split])
    if cfg.eval.reference == AUTO_REFERENCE:
        retain = BENCHMARKS[d.benchmark].retain_of.get(d.split)
        if retain is None:
            known = ", ".join(BENCHMARKS[d.benchmark].retain_of) or "none"
            raise FlatRayError(f"eval.reference=auto needs a forget split with a retain complement; {d.benchmark} "
                               f"has them for: {known}")
        recipe = cfg.eval.retain_recipe
        if not recipe and (cfg.model.name_or_path != DEMO_ORIGINAL or d.benchmark != "demo"):
            raise FlatRayError("eval.reference=auto for a model other than the demo needs eval.retain_recipe: the "
                               "fine-tuning config that made the original (its base model, epochs, lr, batch), "
                               "or give retain-model eval logs as eval.reference")
        if recipe and recipe not in RECIPES and not Path(recipe).expanduser().is_file():
            raise FlatRayError(f"eval.retain_recipe {recipe!r} does not exist; give a `flat-ray finetune` config file "
                               f"or one of the shipped recipes: {', '.join(RECIPES)}")
    elif reference and cfg.eval.reference and not Path(cfg.eval.reference).expanduser().exists():
        raise FlatRayError(f"eval.reference {cfg.eval.reference!r} does not exist; give TOFU-format eval logs or "
                           "an open-unlearning result JSON")


def _check_completion_file(cfg: RunConfig) -> None:
    """``eval.completion_file`` is for the hp benchmark and holds rows with a prompt and a response."""
    path = cfg.eval.completion_file
    if not path:
        return
    if BENCHMARKS[cfg.data.benchmark].evaluation != "hp":
        hp = ", ".join(sorted(k for k, b in BENCHMARKS.items() if b.evaluation == "hp"))
        raise FlatRayError(f"eval.completion_file is FLAT's Harry-Potter completion test: it needs data.benchmark "
                           f"{hp}, not {cfg.data.benchmark!r}")
    if not Path(path).expanduser().is_file():
        raise FlatRayError(f"eval.completion_file {path!r} does not exist; give FLAT's data/hp/hp_train_qa_200.jsonl "
                           "or hp_test_qa_200.jsonl (a JSONL of prompt and response)")
    from flat_ray.eval.hp import read_completion_file

    read_completion_file(path)


def check_loadable(cfg: RunConfig) -> None:
    """What a run reads before Ray starts, read once here, where a mistake costs nothing: the model's tokenizer
    (small: loading it proves a hub id resolves, or fails fast offline, and that the prompt profile formats a
    question with it), LoRA's target modules, the data split, the template source, the evaluation rows and the
    reference logs. Every run's preflight and `flat-ray validate`."""
    from flat_ray import lora
    from flat_ray.data import load_split
    from flat_ray.eval.tofu import read_reference
    from flat_ray.models import load_model_and_tokenizer, load_tokenizer
    from flat_ray.pipeline import profile_for, template_source

    name = cfg.model.name_or_path
    if name not in (TINY, DEMO_ORIGINAL):
        local = Path(name).expanduser()
        if (local.exists() or name.startswith((".", "/", "~"))) and not (local / "config.json").is_file():
            raise FlatRayError(f"model path {name!r} does not exist or has no config.json; give a directory saved "
                               "with save_pretrained or a hub id")
        _, tokenizer = load_model_and_tokenizer(name, trust_remote_code=cfg.model.trust_remote_code,
                                                revision=cfg.model.revision, load_model=False,
                                                tokenizer=cfg.model.tokenizer)
        profile_for(cfg, name, tokenizer).prompt("?", tokenizer)
        lora.check_model(name, cfg)  # target modules the model lacks fail here, not on a GPU node
    elif cfg.model.tokenizer:
        load_tokenizer(cfg.model.tokenizer, cfg.model.trust_remote_code)
    rows = load_split(cfg.data.benchmark, cfg.data.split, cfg.data.data_dir)  # raises on a missing, empty, bad file
    if "template" in METHODS[cfg.method.name].batch_keys:  # a missing template column or file fails here
        template_source(cfg, rows)
    if cfg.eval.enabled:
        from flat_ray.eval.suites import suite_for

        suite_for(cfg).rows(cfg, 1)
        if cfg.eval.reference and cfg.eval.reference != AUTO_REFERENCE:  # auto: built after these checks
            read_reference(cfg.eval.reference)


def check_model(cfg: RunConfig) -> None:
    """What the config names inside the model exists there: the decoder layer a method reads and the parameters
    ``model.trainable`` picks."""
    _check_layer(cfg)
    _check_trainable(cfg)


def _check_layer(cfg: RunConfig) -> None:
    """A method that reads a decoder layer's output (RMU's ``method.rmu_layer``) names one the model has: the demo's
    models have DEMO_SPEC's layers, others their config's ``num_hidden_layers`` (a local folder, the hub cache or a
    known model; an unknown one is checked when the workers load it)."""
    knob = METHODS[cfg.method.name].activation_layer
    if knob is None:
        return
    from flat_ray.assets import DEMO_SPEC
    from flat_ray.memory import arch_for

    name = cfg.model.name_or_path
    arch = None if name in (TINY, DEMO_ORIGINAL) else arch_for(name)
    layers = DEMO_SPEC.num_layers if name in (TINY, DEMO_ORIGINAL) else (arch.layers if arch else None)
    index = getattr(cfg.method, knob)
    if layers is not None and not 0 <= index < layers:
        raise FlatRayError(f"method.{knob}={index} is outside model {name!r}: its decoder layers are 0..{layers - 1}")


def _check_trainable(cfg: RunConfig) -> None:
    """``model.trainable`` matches a parameter of a model in a local folder (its names from its config, on the meta
    device: nothing is loaded); a hub model's names are checked when the workers load it."""
    folder = Path(cfg.model.name_or_path)
    if not cfg.model.trainable or not (folder / "config.json").is_file():
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from flat_ray.models import train_only

    config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    train_only(model, cfg.model.trainable)
