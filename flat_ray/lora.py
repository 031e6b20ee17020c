"""LoRA through PEFT: the only module that imports peft (docs/lora.md).

With ``model.lora_rank`` > 0 the training loop wraps the loaded model in PEFT's LoRA adapters before DeepSpeed sees
it: the base weights are frozen (no gradients, no optimizer state, left out of checkpoints) and only the adapters
train. A linear layer with weight ``W`` (out x in) and adapter matrices ``A`` (rank x in) and ``B`` (out x rank)
computes ``W x + (alpha / rank) * B A dropout(x)``; ``B`` starts at zero, so the wrapped model starts as the base.
Merging writes ``W + (alpha / rank) * B A`` back into a plain model. NPO's and DPO's reference model is the same
module with its adapters switched off.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flat_ray.errors import FlatRayError

ALL_LINEAR = "all-linear"
ADAPTER = "default"  # PEFT's name for the one adapter
PREFIX = "base_model.model."  # PEFT's prefix on the wrapped model's parameter names
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def enabled(cfg: Any) -> bool:
    return cfg.model.lora_rank > 0


def scaling(cfg: Any) -> float:
    return cfg.model.lora_alpha / cfg.model.lora_rank


def linear_names(model: torch.nn.Module) -> list[str]:
    """The names (last part) of the model's linear modules that can take an adapter: all but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def targets(model: torch.nn.Module, spec: str) -> list[str]:
    """``model.lora_target_modules`` checked against the model's linear modules (``all-linear``: every one but the
    head). Only ``torch.nn.Linear`` layers take an adapter here, whose merge is ``W + scale * B @ A``."""
    have = linear_names(model)
    if not have:
        raise FlatRayError(f"LoRA needs torch.nn.Linear layers and {type(model).__name__} has none (GPT-2-style "
                           "Conv1D layers are not supported); set model.lora_rank=0")
    wanted = have if spec.strip() == ALL_LINEAR else [t.strip() for t in spec.split(",") if t.strip()]
    missing = [t for t in wanted if t not in have]
    if missing:
        raise FlatRayError(f"model.lora_target_modules names {', '.join(missing)}, which this model does not have; "
                           f"its linear modules: {', '.join(have)} (or {ALL_LINEAR})")
    return wanted


def check_model(name_or_path: str, cfg: Any) -> None:
    """The target modules against the model's architecture, built without weights (no download beyond its
    config); nothing to check without LoRA."""
    if not enabled(cfg):
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    load = {"trust_remote_code": cfg.model.trust_remote_code, "revision": cfg.model.revision}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **load)
    except OSError as exc:  # not on the hub, not cached offline
        raise FlatRayError(f"model {name_or_path!r}: its config.json cannot be read to check "
                           f"model.lora_target_modules ({str(exc).splitlines()[0][:200]})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    targets(model, cfg.model.lora_target_modules)


def _config(cfg: Any, target_modules: list[str], base: str | None = None):
    from peft import LoraConfig

    m = cfg.model
    return LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                      target_modules=target_modules, bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base)


def apply(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """``model`` with LoRA adapters on its target modules; every base weight frozen."""
    from peft import get_peft_model

    return get_peft_model(model, _config(cfg, targets(model, cfg.model.lora_target_modules)))


def counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters; ZeRO-3 partitions counted whole."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)


class AdapterOff:
    """The trained module with its adapters switched off and in eval mode: the start weights, as NPO's and DPO's
    frozen reference, without a second model."""

    def __init__(self, owner: Any):
        self.owner = owner  # a DeepSpeed engine (its .module) or the PEFT model itself

    def __call__(self, **inputs: Any) -> Any:
        module = getattr(self.owner, "module", self.owner)
        training = module.training
        module.eval()
        try:
            with module.disable_adapter():
                return module(**inputs)
        finally:
            module.train(training)


# ------------------------------------------------------------------------------- adapter weights and merging
def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """A PEFT model's parameter name as the base model calls it."""
    return name.removeprefix(PREFIX).replace(".base_layer.", ".")


def scale_of(module: Any) -> float | None:
    """The adapter's alpha / rank when ``module`` is a PEFT LoRA model, else None."""
    config = getattr(module, "peft_config", {}).get(ADAPTER)
    return config.lora_alpha / config.r if config is not None else None


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A PEFT model's full state dict as (the base model's, under its own names; the adapter's)."""
    base, adapter = {}, {}
    for name, tensor in state.items():
        if is_adapter_key(name):
            adapter[name] = tensor
        else:
            base[base_name(name)] = tensor
    return base, adapter


def merged_weights(base: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor], scale: float
                   ) -> dict[str, torch.Tensor]:
    """Each adapted weight of ``base`` (the base model's names) as ``W + scale * B @ A``, computed in fp32 and cast
    back to ``W``'s dtype and device."""
    out = {}
    for name, a in adapter.items():
        if ".lora_A." not in name:
            continue
        key = base_name(name.split(".lora_A.")[0]) + ".weight"
        b, weight = adapter[name.replace(".lora_A.", ".lora_B.")], base[key]
        delta = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
        out[key] = (weight.float() + scale * delta).to(weight.dtype)
    return out


def merge(base: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor], scale: float
          ) -> dict[str, torch.Tensor]:
    """The base model's state dict with the adapter merged into its weights."""
    return {**base, **merged_weights(base, adapter, scale)}


def adapter_config(cfg: Any, adapter: Mapping[str, torch.Tensor], base: str):
    """The PEFT config of a run's adapter, naming the modules that hold one and the base model."""
    modules = sorted({name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name in adapter if ".lora_A." in name})
    return _config(cfg, modules, base)


def save_adapter(out_dir: Path, adapter: Mapping[str, torch.Tensor], config: Any) -> Path:
    """The adapter alone as PEFT writes one (``adapter_config.json`` and ``adapter_model.safetensors``), loadable
    with ``PeftModel.from_pretrained(base_model, out_dir)``; ``config`` is its PEFT ``LoraConfig``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file({name.replace(f".{ADAPTER}.", "."): t.detach().contiguous() for name, t in adapter.items()},
              str(out_dir / ADAPTER_FILE))
    return out_dir
