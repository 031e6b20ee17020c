"""Small collective helpers that run the same on one CPU process, gloo (CPU) and NCCL (GPU).

NCCL only reduces device tensors, so values go to the current CUDA device there and come back to the host.
Outside a process group every helper is the identity, so library code needs no ``if distributed`` branches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def multi_process() -> bool:
    """More than one rank: sharding and gathering are needed."""
    return initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum, max or min of ``t`` over all ranks, returned on the host."""
    if not initialized():
        return t
    x = t.to(collective_device())
    dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return x.cpu()


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def partitioned(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds ZeRO-3 partitions instead of its weights (its parameters carry DeepSpeed's ``ds_id``):
    every forward then gathers with the other ranks, so all of them must run the same forward passes."""
    return any(hasattr(p, "ds_id") for p in model.parameters())
