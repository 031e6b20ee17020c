"""A per-GPU memory plan for one trial, before anything is paid for (pure arithmetic; docs/memory.md).

From the model's architecture (its ``config.json``, or a known hub model) and the run config, it estimates what one
rank holds at its peak of training and of evaluation:

- weights, gradients and AdamW state per ZeRO stage (sharded over the ranks from stage 3, 2 and 1), none of
  the ones offloaded to CPU;
- under ZeRO-3, the parameters gathered for the layers being computed (DeepSpeed's live-parameter limit);
- activations for one micro-batch (forget + template sequences, plus retain ones where the method has a retain
  term), with or without gradient checkpointing, and the logits with their gradient;
- NPO's and DPO's frozen reference model (sharded like the trained one under ZeRO-3);
- the evaluation's key/value cache for ``eval.batch_size`` prompts of ``data.max_length`` plus
  ``eval.max_new_tokens`` tokens;
- a fixed allowance for the CUDA context and communication buffers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flat_ray.config import RunConfig
from flat_ray.errors import FlatRayError
from flat_ray.losses import METHODS

GIB = 2**30
CONTEXT_BYTES = 1.0 * GIB  # CUDA context, NCCL buffers, allocator slack
LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters default
HINT_LORA_RANK = 8  # TOFU's LoRA rank
BYTES_PER_ACTIVATION = 34  # per token, hidden unit and layer in 16-bit with a fused attention kernel (no s^2 term)


@dataclass(frozen=True)
class Arch:
    """What the memory plan needs to know about a decoder-only transformer."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    gated_mlp: bool = True  # Llama-style gate/up/down (3 matrices) or fc1/fc2 (2)
    tied_embeddings: bool = False

    @property
    def params(self) -> int:
        return sum(n for _, n in self.named_params())

    def adapter_params(self, rank: int) -> int:
        """LoRA parameters at ``rank`` on every linear layer but the head (A: rank x in, B: out x rank): an upper
        bound for a narrower target list."""
        kv = self.hidden // self.heads * self.kv_heads
        attention = 2 * (self.hidden + self.hidden) + 2 * (self.hidden + kv)  # q, o; k, v
        mlp = (3 if self.gated_mlp else 2) * (self.hidden + self.intermediate)
        return self.layers * rank * (attention + mlp)

    def named_params(self) -> list[tuple[str, int]]:
        """(name, size) of each parameter tensor under Llama-style names (``model.layers.7.mlp.down_proj.weight``):
        :attr:`params` and what ``model.trainable`` names."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        mlp = ("gate_proj", "up_proj", "down_proj") if self.gated_mlp else ("fc1", "fc2")
        out = [("model.embed_tokens.weight", self.vocab * h)]
        for i in range(self.layers):
            layer = f"model.layers.{i}."
            out += [(f"{layer}self_attn.{m}.weight", n) for m, n in (("q_proj", h * h), ("k_proj", h * kv),
                                                                    ("v_proj", h * kv), ("o_proj", h * h))]
            out += [(f"{layer}mlp.{m}.weight", h * self.intermediate) for m in mlp]
            out += [(f"{layer}input_layernorm.weight", h), (f"{layer}post_attention_layernorm.weight", h)]
        out.append(("model.norm.weight", h))
        return out + ([] if self.tied_embeddings else [("lm_head.weight", self.vocab * h)])

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Arch:
        """From a transformers ``config.json`` (Llama, Mistral, Phi, GPT-NeoX and OPT key names)."""
        hidden = c.get("hidden_size") or c["n_embd"]
        heads = c.get("num_attention_heads") or c["n_head"]
        return cls(vocab=c["vocab_size"], hidden=hidden, layers=c.get("num_hidden_layers") or c["n_layer"],
                   intermediate=c.get("intermediate_size") or c.get("ffn_dim") or 4 * hidden, heads=heads,
                   kv_heads=c.get("num_key_value_heads") or heads,
                   gated_mlp=c.get("hidden_act", c.get("activation_function", "")) in ("silu", "swiglu"),
                   tied_embeddings=bool(c.get("tie_word_embeddings", False)))


# the shipped spaces' hub models, for dry runs on a machine that has not downloaded them
KNOWN: dict[str, Arch] = {
    "locuslab/tofu_ft_llama2-7b": Arch(32000, 4096, 32, 11008, 32, 32),
    "meta-llama/Llama-2-7b-hf": Arch(32000, 4096, 32, 11008, 32, 32),
    "meta-llama/Llama-2-7b-chat-hf": Arch(32000, 4096, 32, 11008, 32, 32),
    "NousResearch/Llama-2-7b-chat-hf": Arch(32000, 4096, 32, 11008, 32, 32),  # TOFU's base (hf_key)
    "muse-bench/MUSE-news_target": Arch(32000, 4096, 32, 11008, 32, 32),
    "HuggingFaceH4/zephyr-7b-beta": Arch(32000, 4096, 32, 14336, 32, 8),  # Mistral-7B: grouped-query attention
    "locuslab/tofu_ft_phi-1.5": Arch(51200, 2048, 24, 8192, 32, 32, gated_mlp=False),
    "microsoft/phi-1_5": Arch(51200, 2048, 24, 8192, 32, 32, gated_mlp=False),
    "facebook/opt-2.7b": Arch(50272, 2560, 32, 10240, 32, 32, gated_mlp=False, tied_embeddings=True),
}


def arch_for(name_or_path: str) -> Arch | None:
    """The architecture of a local model directory, a hub model in the local cache, or a known hub model."""
    local = Path(name_or_path).expanduser() / "config.json"
    if local.is_file():
        return Arch.from_config(json.loads(local.read_text()))
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = cache.expanduser() / f"models--{name_or_path.replace('/', '--')}" / "snapshots"
    for found in sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []:
        return Arch.from_config(json.loads(found.read_text()))
    return KNOWN.get(name_or_path)


@dataclass(frozen=True)
class Plan:
    """Bytes per GPU, by part; ``train`` and ``evaluate`` are the two peaks, ``peak`` the larger."""

    parts: dict[str, float]
    train: float
    evaluate: float

    @property
    def peak(self) -> float:
        return max(self.train, self.evaluate)

    def lines(self, peaks: tuple[str, str] = ("peak of training", "peak of evaluation")) -> list[str]:
        out = [f"  {name:<22}{value / GIB:8.2f} GiB" for name, value in self.parts.items() if value]
        return out + [f"  {peaks[0]:<22}{self.train / GIB:8.2f} GiB",
                      f"  {peaks[1]:<22}{self.evaluate / GIB:8.2f} GiB"]


def plan(cfg: RunConfig, arch: Arch, world_size: int | None = None, precision: str = "bf16") -> Plan:
    """The per-GPU plan of ``cfg`` on ``world_size`` ranks (default ``launch.num_workers``) in ``precision``
    (what ``deepspeed.precision=auto`` means on a GPU is bf16)."""
    n = world_size or cfg.launch.num_workers
    ds, o = cfg.deepspeed, cfg.optim
    p, t = arch.params, trainable(cfg, arch)  # with LoRA the frozen base weights take no gradient or optimizer state
    w = 4 if (ds.precision if ds.precision != "auto" else precision) == "fp32" else 2
    stage = ds.stage
    parts = {
        "weights": 0.0 if ds.offload_params else (p + (t if cfg.model.lora_rank else 0)) * w / (n if stage == 3 else 1),
        "gradients": t * w / (n if stage >= 2 else 1),
        # AdamW: m and v in fp32, plus an fp32 master copy of 16-bit weights
        "optimizer": 0.0 if ds.offload_optimizer else t * (8 + (4 if w == 2 else 0)) / (n if stage >= 1 else 1),
        "gathered (ZeRO-3)": min(p, LIVE_PARAMETERS) * w if stage == 3 else 0.0,
    }
    splits = METHODS[cfg.method.name].splits(vars(cfg.method))
    rows = o.micro_batch_size * len(splits)  # forget, template and retain sequences go through one forward
    tokens = rows * cfg.data.max_length
    per_layer = BYTES_PER_ACTIVATION * tokens * arch.hidden * w / 2
    if cfg.model.gradient_checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        parts["activations"] = arch.layers * tokens * arch.hidden * w + per_layer
    else:
        parts["activations"] = arch.layers * per_layer
    parts["logits"] = 2 * tokens * arch.vocab * w  # the logits and their gradient
    method = METHODS[cfg.method.name]
    if method.needs_reference and not cfg.model.lora_rank:  # LoRA: the adapter switched off
        # a second engine with the same ZeRO settings: sharded under ZeRO-3, in CPU memory with parameter offload
        parts["reference model"] = 0.0 if ds.offload_params else p * w / (n if stage == 3 else 1)
    if method.reference_output == "logits":  # UNDIAL: the reference's logits and the fp32 target built from them
        parts["reference logits"] = (o.micro_batch_size * len(method.reference_keys) * cfg.data.max_length
                                     * arch.vocab * (w + 4))
    kv_dim = arch.hidden * arch.kv_heads // arch.heads
    parts["eval KV cache"] = (2 * arch.layers * cfg.eval.batch_size * (cfg.data.max_length + cfg.eval.max_new_tokens)
                              * kv_dim * w) if cfg.eval.enabled else 0.0
    parts["CUDA context"] = CONTEXT_BYTES
    resident = sum(parts[k] for k in ("weights", "gradients", "optimizer", "gathered (ZeRO-3)", "CUDA context"))
    resident += parts.get("reference model", 0.0)
    train = resident + parts["activations"] + parts["logits"] + parts.get("reference logits", 0.0)
    return Plan(parts, train, resident + parts["eval KV cache"])


def trainable(cfg: RunConfig, arch: Arch) -> int:
    """The parameters that train: every one, with LoRA the adapters', with ``model.trainable`` those its pattern
    names (under Llama-style names; all of them, an upper bound, where it names none of those)."""
    if cfg.model.lora_rank:
        return arch.adapter_params(cfg.model.lora_rank)
    if cfg.model.trainable:
        named = sum(n for name, n in arch.named_params() if re.fullmatch(cfg.model.trainable, name))
        return named or arch.params
    return arch.params


# ------------------------------------------------------------------------------------------- host memory
PROCESS_HOST_BYTES = 2.0 * GIB  # a worker process: Python with torch, transformers, DeepSpeed and Ray, its data
CUDA_HOST_BYTES = 1.0 * GIB  # the CUDA runtime's and NCCL's host side, on a GPU worker
OFFLOAD_STATE_BYTES = 16  # per offloaded parameter: fp32 master weight, Adam m and v, fp32 gradient partition
OFFLOAD_BUFFER_FACTOR = 1.5  # DeepSpeed's own estimator's allowance for pinned staging buffers on offloaded state
SHARD_BYTES = 5e9  # transformers' default checkpoint shard: what a ZeRO-3 rank holds at once while loading


def host_plan(cfg: RunConfig, arch: Arch | None, world_size: int | None = None, precision: str = "bf16") -> Plan:
    """Host (CPU) memory one rank holds at its peak, by part (docs/memory.md). ``train`` is the steady state
    (process, offloaded optimizer and parameters with DeepSpeed's buffer allowance, an offloaded reference model),
    ``evaluate`` the loading of the checkpoint (the whole model on each rank below ZeRO-3, one shard under it),
    which comes before the optimizer state exists. Without an architecture: the process alone."""
    n = world_size or cfg.launch.num_workers
    ds = cfg.deepspeed
    process = PROCESS_HOST_BYTES + (CUDA_HOST_BYTES if cfg.launch.gpus_per_worker else 0.0)
    parts = {"process": process}
    if arch is not None:
        p = arch.params
        w = 4 if (ds.precision if ds.precision != "auto" else precision) == "fp32" else 2
        offloaded = {"offloaded optimizer": OFFLOAD_STATE_BYTES * trainable(cfg, arch) / n if ds.offload_optimizer
                     else 0.0,
                     "offloaded parameters": p * w / n if ds.offload_params else 0.0}
        if METHODS[cfg.method.name].needs_reference and ds.offload_params and not cfg.model.lora_rank:
            offloaded["offloaded reference"] = p * w / n
        parts.update(offloaded)
        parts["pinned buffers"] = (OFFLOAD_BUFFER_FACTOR - 1) * sum(offloaded.values())
        parts["checkpoint loading"] = min(p * w, SHARD_BYTES) if ds.stage == 3 else p * w
    loading = parts.get("checkpoint loading", 0.0)
    steady = sum(v for k, v in parts.items() if k != "checkpoint loading")
    return Plan(parts, steady, process + loading)


def fit_hint(cfg: RunConfig, arch: Arch, gpu_bytes: float, world_size: int | None = None) -> str | None:
    """None when ``cfg`` fits in ``gpu_bytes`` per GPU; else what to change, trying the knobs in the order that
    costs least speed (gradient checkpointing, optimizer offload, a smaller evaluation batch, parameter offload)."""

    current = plan(cfg, arch, world_size)
    if current.peak <= gpu_bytes:
        return None
    steps = [("model.gradient_checkpointing=true", "model", {"gradient_checkpointing": True}),
             ("deepspeed.offload_optimizer=true", "deepspeed", {"offload_optimizer": True}),
             (f"eval.batch_size={max(1, cfg.eval.batch_size // 2)}", "eval",
              {"batch_size": max(1, cfg.eval.batch_size // 2)}),
             ("deepspeed.offload_params=true", "deepspeed", {"offload_params": True})]
    knobs, trial = [], cfg
    for knob, section, change in steps:
        if section == "deepspeed" and trial.deepspeed.stage < (3 if "params" in knob else 1):
            continue  # parameter offload needs ZeRO-3, optimizer offload ZeRO 1-3
        if all(getattr(getattr(trial, section), k) == v for k, v in change.items()):
            continue
        trial = dataclasses.replace(trial, **{section: dataclasses.replace(getattr(trial, section), **change)})
        knobs.append(knob)
        if plan(trial, arch, world_size).peak <= gpu_bytes:
            return f"set {', '.join(knobs)}"
    if not cfg.model.lora_rank:  # the adapters train in place of the weights: a different method, so the last resort
        adapted = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora_rank=HINT_LORA_RANK))
        hint = fit_hint(adapted, arch, gpu_bytes, world_size)
        if hint is None or hint.startswith("set "):
            more = f", {hint.removeprefix('set ')}" if hint else ""
            return f"set model.lora_rank={HINT_LORA_RANK}{more} (LoRA: the base weights stay frozen)"
    return "it does not fit even with every memory knob; use more workers or GPUs with more memory"


def misfits(runs: list[tuple[str, RunConfig]], gpu_gib: float) -> list[str]:
    """One line per GPU run of ``runs`` ((name, config) pairs) whose plan does not fit in ``gpu_gib``: how much it
    needs and the knobs that would make it fit. Runs on CPU, and models whose architecture is unknown here, fit."""
    out = []
    for name, cfg in runs:
        arch = arch_for(cfg.model.name_or_path) if cfg.launch.gpus_per_worker else None
        hint = fit_hint(cfg, arch, gpu_gib * GIB) if arch else None
        if hint:
            p = plan(cfg, arch)
            when = "training" if p.train >= p.evaluate else "evaluation"
            out.append(f"{name} needs about {p.peak / GIB:.1f} GiB per GPU at its peak of {when}, the GPUs have "
                       f"{gpu_gib:g} GiB: {hint}")
    return out


def check_fits(runs: list[tuple[str, RunConfig]], gpu_gib: float) -> None:
    """Refuse the first run of :func:`misfits`."""
    problems = misfits(runs, gpu_gib)
    if problems:
        raise FlatRayError(f"{problems[0]} (--dry-run shows the plan)")
