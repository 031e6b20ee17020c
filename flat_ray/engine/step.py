"""One forward pass for all named splits a method needs, and the method's loss on the result (pure torch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from flat_ray.losses import LossOutput, Method, sequence_logprob


def to_device(batch: Any, device: Any) -> Any:
    """A collated batch (tensors, possibly nested in mappings) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def concat_forward(model: Any, batch: Mapping[str, Mapping[str, torch.Tensor]], keys: Sequence[str]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model`` once on the splits ``keys`` of ``batch`` concatenated along the batch dimension.

    Each split is right-padded to the longest split; with causal attention, positions before the padding are
    unaffected, so each split's logits are cut back to its own length afterwards. That keeps the ``repo``
    normalisation (which divides by the padded length) identical to separate forward passes, at the cost of one
    forward instead of ``len(keys)``. Returns ``{key: (logits (B_k, T_k, V), labels (B_k, T_k))}``.
    """
    parts = [batch[k] for k in keys]
    width = max(p["input_ids"].shape[1] for p in parts)

    def cat(name: str, value: int) -> torch.Tensor:
        return torch.cat([F.pad(p[name], (0, width - p[name].shape[1]), value=value) for p in parts])

    logits = model(input_ids=cat("input_ids", 0), attention_mask=cat("attention_mask", 0)).logits
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    start = 0
    for key, part in zip(keys, parts, strict=True):
        b, t = part["labels"].shape
        out[key] = (logits[start:start + b, :t], part["labels"])
        start += b
    return out


def method_loss(model: Any, batch: Mapping[str, Any], method: Method, knobs: Mapping[str, Any],
                reference: Any = None) -> LossOutput:
    """Forward the splits ``method`` reads with these ``knobs`` and return its loss; knobs are the method config
    fields (it takes those it lists). Methods that need a reference model get, without gradient, its per-sample answer
    log-probs of their ``reference_keys`` splits as ``ref_logp``, or its logits of them as ``ref_logits``."""
    inputs = concat_forward(model, batch, method.splits(knobs))
    extra: dict[str, Any] = {}
    if method.needs_reference:
        if reference is None:
            raise ValueError(f"method {method.name!r} needs a reference model")
        with torch.no_grad():
            ref = concat_forward(reference, batch, method.reference_keys)
        if method.reference_output == "logits":
            extra["ref_logits"] = {k: logits for k, (logits, _) in ref.items()}
        else:
            extra["ref_logp"] = {k: sequence_logprob(logits, labels) for k, (logits, labels) in ref.items()}
    return method.loss(inputs, **{k: knobs[k] for k in method.knobs}, **extra)


__all__ = ["concat_forward", "method_loss", "to_device"]
