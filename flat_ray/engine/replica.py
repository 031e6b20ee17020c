"""A one-process, plain-torch replica of a training run, for fast learning-rate studies on small models.

It replays what ``world_size`` DeepSpeed ranks do in :mod:`flat_ray.engine.loop`, in one process and without
Ray or DeepSpeed: the same per-rank shards and data order (``DistributedSampler`` with the run's seed), the same
template assignment per epoch, the gradient averaged over ranks and accumulation steps, global-norm clipping,
torch's AdamW with DeepSpeed's betas and eps, and the same warm-up/decay multiplier at the same optimizer steps.
On the embedded demo (fp32, ZeRO-3, two ranks) it gives the real run's numbers to the fourth decimal. With an
``eval.reference`` (eval logs or a result JSON; not ``auto``, which the driver resolves) it also scores forget
quality against it.

It runs in fp32 (the demo's precision) on one device (the CPU by default; a GPU for larger models in
``benchmarks/selectivity.py``); NPO's and DPO's reference model is a frozen copy of the start weights, as in the
real run.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from flat_ray.config import RunConfig
from flat_ray.data import Collator, load_split
from flat_ray.engine.step import method_loss, to_device
from flat_ray.errors import FlatRayError
from flat_ray.eval.suites import suite_for
from flat_ray.eval.tofu import read_reference, read_reference_mia
from flat_ray.losses import METHODS
from flat_ray.models import load_model_and_tokenizer
from flat_ray.pipeline import build_dataset, profile_for, train_collator
from flat_ray.schedule import lr_multiplier, micro_batches_per_epoch, optimizer_steps, warmup_steps


def replay(cfg: RunConfig, model_path: str, world_size: int | None = None, device: str = "cpu",
           evaluate_before: bool = True) -> dict[str, dict[str, float]]:
    """Train ``model_path`` as ``cfg`` would on ``world_size`` ranks (default ``cfg.launch.num_workers``);
    returns the evaluation suite's float metrics ``{"before": ..., "after": ...}`` (``before`` empty without
    ``evaluate_before``: replays of one model at several learning rates share it)."""
    if cfg.model.lora_rank:
        raise FlatRayError("the replica trains every weight; run a LoRA config (model.lora_rank > 0) with flat-ray train")
    world = world_size or cfg.launch.num_workers
    model, tokenizer = load_model_and_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code,
                                                tokenizer=cfg.model.tokenizer)
    model.to(device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    profile = profile_for(cfg, cfg.model.name_or_path, tokenizer)
    dataset = build_dataset(cfg, tokenizer, profile, load_split(cfg.data.benchmark, cfg.data.split,
                                                                 cfg.data.data_dir))
    suite, rows = suite_for(cfg), suite_for(cfg).rows(cfg, cfg.eval.max_examples)
    reference = read_reference(cfg.eval.reference)[0] if cfg.eval.reference else None
    reference_mia = read_reference_mia(cfg.eval.reference) if cfg.eval.reference else None

    def evaluate() -> dict[str, float]:
        model.eval()
        out = suite.run(model, tokenizer, profile, rows, cfg, device=device, reference_tr=reference,
                        reference_mia=reference_mia)
        model.train()
        return {k: v for k, v in out.items() if isinstance(v, float)}

    before = evaluate() if evaluate_before else {}
    train(cfg, model, dataset, train_collator(cfg, tokenizer), world, device)
    return {"before": before, "after": evaluate()}


def train(cfg: RunConfig, model: Any, dataset: Any, collate: Collator, world: int, device: Any = "cpu") -> None:
    """``cfg``'s optimisation of ``model`` (already on ``device``) on ``dataset``, as ``world`` ranks would run it."""
    o = cfg.optim
    samplers = [DistributedSampler(dataset, num_replicas=world, rank=r, shuffle=True, seed=o.seed)
                for r in range(world)]
    per_epoch = micro_batches_per_epoch(len(dataset), o.micro_batch_size, world)
    total = max(1, optimizer_steps(per_epoch, o.epochs, o.grad_accum_steps))
    warmup = warmup_steps(total, o.warmup_ratio)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, total, warmup, o.schedule))
    method, knobs = METHODS[cfg.method.name], vars(cfg.method)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if method.needs_reference else None
    torch.manual_seed(o.seed)
    model.train()
    micro = 0
    for epoch in range(o.epochs):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        shards = [list(s) for s in samplers]
        for i in range(per_epoch):
            for shard in shards:  # every rank's micro-batch; DeepSpeed averages over ranks and accumulation
                batch = to_device(collate([dataset[j] for j in shard[i * o.micro_batch_size:(i + 1) * o.micro_batch_size]]),
                            device)
                (method_loss(model, batch, method, knobs, reference).loss / (world * o.grad_accum_steps)).backward()
            micro += 1
            if micro % o.grad_accum_steps:
                continue
            if o.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
