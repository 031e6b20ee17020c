"""What a run or a sweep would do, before anything is started (``--dry-run``) and without Ray: one batch's loss
through the method, the memory plan per GPU and per host, and for a sweep its trial table, the cells that would not
fit, their forget-quality references, the node types they land on and the cost estimate. Each function returns the
lines the CLI prints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flat_ray import lora
from flat_ray.config import RunConfig
from flat_ray.data import BENCHMARKS
from flat_ray.errors import FlatRayError
from flat_ray.losses import METHODS
from flat_ray.memory import GIB, arch_for, fit_hint, host_plan, misfits, plan
from flat_ray.models import count_parameters, load_model_and_tokenizer
from flat_ray.pipeline import prepare
from flat_ray.placement import gpu_memory_gib, landing, node_types_from_yaml, this_machine, trials_per_node
from flat_ray.sweep import Space, load_space, shipped_spaces
from flat_ray.sweep_table import format_table, reference_source, trial_table


def dry_run(cfg: RunConfig) -> dict[str, Any]:
    """Build model, data and one batch; compute the method's loss once (no optimizer step). Returns a summary."""
    import torch

    from flat_ray.engine.step import method_loss
    from flat_ray.schedule import micro_batches_per_epoch, optimizer_steps

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
        "first_templates": [t if len(t) <= 80 else t[:77] + "..." for t in prep.dataset.assignment[:3]],
        "method": f"{method.name} ({', '.join(f'{k}={getattr(cfg.method, k)}' for k in method.knobs)})",
        "optimizer_steps": optimizer_steps(micro, cfg.optim.epochs, cfg.optim.grad_accum_steps),
        "first_batch": {k: tuple(batch[k]["input_ids"].shape) for k in method.splits(vars(cfg.method))},
        **{f"first_batch_{k}": round(v, 6) for k, v in out.metrics.items()},
    }


def run_lines(cfg: RunConfig, gpu_gib: float | None) -> list[str]:
    """``flat-ray train --dry-run``: the one-batch summary and the memory plan."""
    summary = dry_run(cfg)
    width = max(map(len, summary))
    return ([f"{key:<{width}}  {value}" for key, value in summary.items()] + memory_plan_lines(cfg, summary["model"], gpu_gib)
            + ["dry run ok: no parameters were updated"])


def memory_plan_lines(cfg: RunConfig, model_path: str, gpu_gib: float | None) -> list[str]:
    """The per-GPU and per-host memory plan of a run, and whether (else how) it fits in ``gpu_gib``."""
    arch = arch_for(model_path)
    if arch is None:
        return [f"memory plan: the architecture of {model_path} is unknown here (no config.json)"]
    size = f"{arch.params / 1e9:.2f} B" if arch.params >= 1e8 else f"{arch.params / 1e6:.2f} M"
    if cfg.model.lora_rank:
        size += f" frozen, LoRA rank {cfg.model.lora_rank}: {arch.adapter_params(cfg.model.lora_rank) / 1e6:.2f} M training"
    out = [f"memory plan per GPU ({size} parameters, {cfg.launch.num_workers} ranks, ZeRO-{cfg.deepspeed.stage}, "
           "bf16 unless deepspeed.precision says otherwise):", *plan(cfg, arch).lines(),
           "host memory per rank (what each worker asks Ray for as its memory resource):",
           *host_plan(cfg, arch).lines(("steady state", "while loading"))]
    if gpu_gib is not None:
        hint = fit_hint(cfg, arch, gpu_gib * GIB)
        out.append(f"  fits in {gpu_gib:g} GiB" if hint is None else f"  does not fit in {gpu_gib:g} GiB: {hint}")
    return out


def space_lines() -> list[str]:
    """``flat-ray tune --list``: the shipped spaces."""
    return [f"{name:<16}{sp.total_trials():>4} trials  {sp.description}"
            for name, sp in ((n, load_space(n, check_files=False)) for n in shipped_spaces())]


def sweep_lines(sp: Space, gpu_memory: str | None, prices: str | None) -> list[str]:
    """``flat-ray tune --dry-run``: the space, its trial table (resources, concurrency, memory per GPU where
    ``gpu_memory`` gives GPUs), the cells that would not fit, each cell's reference, the node types of a cluster
    YAML and the cost estimate (money with ``prices``)."""
    from flat_ray.cost import cost_lines, read_prices

    cpus, gpus, gpu_gib = os.cpu_count() or 1, local_gpus(), gpu_gib_of(gpu_memory)
    cluster = cluster_nodes(gpu_memory)
    if prices and not cluster:
        raise FlatRayError("--prices needs --gpu-memory CLUSTER.yaml (the node types the prices are for)")
    price_table = read_prices(prices, cluster) if prices else None
    objective = ", ".join(f"{m} ({mo})" for m, mo in zip(sp.objective, sp.modes, strict=True))
    out = [f"space {sp.name} ({sp.path}): {sp.total_trials()} trials in {len(sp.cells)} cell(s); search "
           f"{sp.algorithm} (seed {sp.seed}), scheduler {sp.scheduler}, objective {objective}",
           format_table(trial_table(sp, cluster or [this_machine(cpus, gpus)], gpu_gib, cluster))]
    out += misfits([(f"cell {c.name}", c.config) for c in sp.cells], gpu_gib) if gpu_gib is not None else []
    out += ["forget-quality references:", *(f"  cell {c.name}: {reference_source(c.config)}" for c in sp.cells)]
    out += node_type_lines(sp, cluster, gpu_memory) if cluster else []
    out += cost_lines(sp, cluster, price_table)
    where = f"the cluster of {gpu_memory} at its largest" if cluster else f"this machine ({cpus} CPUs, {gpus} GPUs)"
    return out + [f"concurrency computed for {where}; nothing was started"]


def node_type_lines(sp: Space, cluster: list, source: str | None) -> list[str]:
    """Each node type of a cluster YAML, and how many trials of each cell one node of it holds."""
    out = [f"node types of {source} (Ray's memory resource: 70% of the RAM unless the YAML sets it):"]
    for node in cluster:
        gpus = f", {node.gpu_gib:g} GiB per GPU" if node.gpu_gib else ""
        out.append(f"  {node.name}: {node.describe().split(' (', 1)[1][:-1]}{gpus}; up to {node.max_count} node(s)")
    for cell in sp.cells:
        node = landing(cell.config, cluster)
        out.append(f"  cell {cell.name} -> " + (f"{node.name}, {trials_per_node(cell.config, node)} trial(s) per node"
                                               if node else "no node type can hold its trials"))
    return out


def gpu_gib_of(spec: str | None) -> float | None:
    """``--gpu-memory`` (GiB, or the smallest GPU of a cluster YAML), else this machine's first GPU's memory,
    else None (nothing to check against)."""
    if spec:
        return gpu_memory_gib(spec)
    if local_gpus():
        import torch

        return torch.cuda.get_device_properties(0).total_memory / GIB
    return None


def cluster_nodes(spec: str | None) -> list | None:
    """The node types of ``--gpu-memory CLUSTER.yaml`` (None for a number of GiB or no option)."""
    if not spec or not Path(spec).expanduser().is_file():
        return None
    return node_types_from_yaml(Path(spec).expanduser())


def local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0
