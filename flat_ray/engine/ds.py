"""Everything DeepSpeed: the only module that imports it.

The DeepSpeed config is a dict built from the run config: explicit batch sizes, stage,
offload and precision; no ``"auto"`` and no JSON path. Under ZeRO-3 the model is created partitioned
(transformers' ``HfDeepSpeedConfig`` hook) and every rank takes part in saving and exporting.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from flat_ray import lora
from flat_ray.config import RunConfig

log = logging.getLogger(__name__)
TAG = "state"  # one DeepSpeed tag per checkpoint directory; Ray Train keeps the directories apart


def version() -> str:
    return deepspeed.__version__


def on_gpu() -> bool:
    return get_accelerator().device_name() == "cuda"


def precision(cfg: RunConfig) -> str:
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    return "bf16" if on_gpu() else "fp32"


def init_distributed(rank: int, world_size: int, local_rank: int) -> None:
    """Join the process group Ray Train created (gloo on CPU, nccl on GPU). DeepSpeed reads these variables when
    it is not started by its own launcher."""
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` ranks."""
    o, d = cfg.optim, cfg.deepspeed
    zero: dict[str, Any] = {"stage": d.stage}
    if d.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu()}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu()}
    prec = precision(cfg)
    return {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum_steps,
        "train_batch_size": o.micro_batch_size * o.grad_accum_steps * world_size,
        "gradient_clipping": o.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "weight_decay": o.weight_decay,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                # DeepSpeed's fused Adam needs CUDA; on CPU (without offload) use torch's AdamW
                "torch_adam": not on_gpu() and not d.offload_optimizer,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def load_model(path: str, ds_config: dict[str, Any], *, trust_remote_code: bool = False, revision: str | None = None):
    """Load a causal LM (at ``revision`` for a hub id); under ZeRO-3 it is created partitioned (never materialised
    whole on one rank)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    hook = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else (torch.float16 if ds_config["fp16"]["enabled"] else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 revision=revision)
    model._flat_ray_ds_hook = hook  # keep transformers' ZeRO-3 hook alive as long as the model
    return model


def build_engine(model, ds_config: dict[str, Any], lr_lambda: Callable[[int], float]):
    """Wrap ``model`` in a DeepSpeed engine with AdamW and a LambdaLR schedule (warm-up + decay)."""
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        # stepped by engine.step() at accumulation boundaries and saved in its checkpoints
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda),
    )
    return engine


def compile_engine(engine) -> None:
    """torch.compile the engine's model through DeepSpeed, with the accelerator's compile backend as it is set now
    (DeepSpeed's own default argument is read once, when DeepSpeed is imported)."""
    engine.compile(backend=get_accelerator().get_compile_backend())


@contextmanager
def eager(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` called without the torch.compile wrapper that ``engine.compile()`` put on it: evaluation brings a
    new shape with every batch and generated token, so compiling it costs more than it saves (minutes on a small
    model). Restored afterwards; a module that was never compiled is unchanged."""
    compiled = getattr(module, "_compiled_call_impl", None)
    module._compiled_call_impl = None
    try:
        yield module
    finally:
        module._compiled_call_impl = compiled


def build_reference(model, ds_config: dict[str, Any]):
    """A frozen reference model for methods that need one (NPO, DPO). Under ZeRO-3 it is its own DeepSpeed
    engine in inference mode, sharded like the trained model; otherwise a full copy on this rank's device.
    Never a deepcopy of a (possibly partitioned) trained model."""
    for p in model.parameters():
        p.requires_grad_(False)
    if ds_config["zero_optimization"]["stage"] == 3:
        ref_config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "gradient_clipping")}
        engine, _, _, _ = deepspeed.initialize(model=model, config=ref_config)
        engine.eval()
        return engine
    return model.to(get_accelerator().current_device_name()).eval()


def save_checkpoint(engine, directory: str | Path, client_state: dict[str, Any]) -> None:
    """Every rank writes its own shard (DeepSpeed's file names carry the rank). Frozen parameters (a LoRA run's
    base weights, which every start loads from the model anyway) are left out: such a checkpoint is the adapter
    and its optimizer state."""
    engine.save_checkpoint(str(directory), tag=TAG, client_state=client_state, exclude_frozen_parameters=True)


def consolidated_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from a checkpoint written by :func:`save_checkpoint`, on this process's CPU,
    without a DeepSpeed engine or a process group: under ZeRO-1/2/3 they are joined from every rank's optimizer
    shard (the fp32 master copy; DeepSpeed's ``zero_to_fp32``), any world size; under stage 0 the one model file
    holds them."""
    root = Path(directory)
    quiet = open(os.devnull, "w")  # noqa: SIM115 - zero_to_fp32 prints its progress and a tqdm bar
    with quiet, redirect_stdout(quiet), redirect_stderr(quiet):
        return _consolidate(root)


def _consolidate(root: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not list((root / TAG).glob("*optim_states.pt")):  # stage 0: no ZeRO partitions, the module's own state
        state = torch.load(root / TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in state["module"].items()}
    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=TAG)


def load_checkpoint(engine, directory: str | Path) -> dict[str, Any]:
    """The trainable parameters and optimizer state; a checkpoint without frozen parameters loads into a model
    that has some (LoRA), any other mismatch fails."""
    strict = all(p.requires_grad for p in engine.module.parameters())
    _, client_state = engine.load_checkpoint(str(directory), tag=TAG, load_module_strict=strict)
    if client_state is None:
        raise RuntimeError(f"no DeepSpeed checkpoint in {directory}")
    return client_state


def gathered_state_dict(engine, rank: int) -> dict[str, torch.Tensor]:
    """Full parameters on rank 0 (empty elsewhere), gathered one tensor at a time so that no rank holds more
    than one extra full parameter under ZeRO-3. All ranks must call this."""
    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.data.detach().to("cpu", copy=True)
    if rank == 0:
        for name, buf in engine.module.named_buffers():
            if name in engine.module.state_dict():
                state[name] = buf.detach().to("cpu", copy=True)
    return state


def full_bytes(engine) -> int:
    """Bytes of the whole model's parameters (ZeRO-3 partitions counted whole)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in engine.module.parameters())


def full_copy(engine) -> torch.nn.Module:
    """A plain, unpartitioned copy of a ZeRO-3 engine's model on this rank's device for evaluation: parameters
    gathered once, one tensor at a time, instead of at every forward; a LoRA model's copy is its base model with
    the adapter merged. All ranks must call this; each then holds the whole model (check :func:`full_bytes`
    against the room first)."""
    module = engine.module
    scale = lora.scale_of(module)
    base = module.get_base_model() if scale is not None else module
    dtype = next(module.parameters()).dtype
    with torch.device(engine.device):  # a plain constructor: transformers partitions only in from_pretrained
        copy = type(base)(base.config).to(dtype)
    params, adapter = dict(copy.named_parameters()), {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if lora.is_adapter_key(name):
                adapter[name] = param.data.detach().clone()
            else:
                params[lora.base_name(name)].data.copy_(param.data)
    if adapter:
        for name, weight in lora.merged_weights({k: p.data for k, p in params.items()}, adapter, scale).items():
            params[name].data.copy_(weight)
    buffers = dict(copy.named_buffers())
    for name, buf in module.named_buffers():
        if lora.base_name(name) in buffers:
            buffers[lora.base_name(name)].copy_(buf)
    return copy.eval()


def export_hf(engine, tokenizer, out_dir: str | Path, rank: int) -> Path | None:
    """Consolidated Hugging Face directory (safetensors + config + tokenizer), written by rank 0; a LoRA model's is
    its base model with the adapter merged, with the adapter alone in its ``adapter`` folder (PEFT's layout)."""
    state = gathered_state_dict(engine, rank)
    if rank != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module, scale = engine.module, lora.scale_of(engine.module)
    if scale is not None:
        base, adapter = lora.split_state(state)
        lora.save_adapter(out / "adapter", adapter, module.peft_config[lora.ADAPTER])
        state, module = lora.merge(base, adapter, scale), module.get_base_model()
    module.save_pretrained(out, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
