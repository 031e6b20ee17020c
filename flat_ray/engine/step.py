"""One forward pass for all named splits a method needs, and the method's loss on the result (pure torch)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from flat_ray.errors import FlatRayError
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
    labels = {k: batch[k]["labels"] for k in keys}
    return {k: (cut, labels[k]) for k, cut in _split_rows(logits, labels).items()}


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The model's decoder layers (the ModuleList with one entry per ``num_hidden_layers``), through a DeepSpeed
    engine, a PEFT wrapper or flat_ray's adapter-off reference."""
    model = getattr(model, "owner", model)  # lora.AdapterOff: the engine or model whose adapter it switches off
    inner = getattr(model, "module", model)  # a DeepSpeed engine's model
    n = inner.config.num_hidden_layers
    return next(m for _, m in inner.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)


@contextmanager
def layer_output(model: Any, index: int) -> Iterator[list[torch.Tensor]]:
    """Collect the hidden states decoder layer ``index`` outputs during the forwards inside the block. A forward hook
    reads the layer's own output tensor: under ZeRO-3 nothing more is gathered than the forward gathers anyway
    (parameters are sharded, activations are not)."""
    got: list[torch.Tensor] = []

    def hook(module, args, output):  # noqa: ANN001, ARG001
        got.append(output[0] if isinstance(output, tuple) else output)

    layers = decoder_layers(model)
    if not 0 <= index < len(layers):
        raise FlatRayError(f"decoder layer {index} is outside the model: its decoder layers are 0..{len(layers) - 1}")
    handle = layers[index].register_forward_hook(hook)
    try:
        yield got
    finally:
        handle.remove()


def _split_rows(tensor: torch.Tensor, labels: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A concatenated forward's (B, T, ...) tensor cut back into its splits, each to its labels' (B_k, T_k)."""
    out, start = {}, 0
    for key, lab in labels.items():
        b, t = lab.shape
        out[key] = tensor[start:start + b, :t]
        start += b
    return out


def method_loss(model: Any, batch: Mapping[str, Any], method: Method, knobs: Mapping[str, Any],
                reference: Any = None) -> LossOutput:
    """Forward the splits ``method`` reads with these ``knobs`` and return its loss; knobs are the method config
    fields (it takes those it lists). Methods that need a reference model get, without gradient, its per-sample answer
    log-probs of their ``reference_keys`` splits as ``ref_logp``, or its logits of them as ``ref_logits``."""
    keys = method.splits(knobs)
    layer = knobs[method.activation_layer] if method.activation_layer else None
    extra: dict[str, Any] = {}
    with layer_output(model, layer) if layer is not None else nullcontext([]) as hidden:
        inputs = concat_forward(model, batch, keys)
    if layer is not None:
        extra["activations"] = _split_rows(hidden[0], {k: lab for k, (_, lab) in inputs.items()})
    ref_keys = [k for k in method.reference_keys if k in keys]
    if method.needs_reference and ref_keys:
        if reference is None:
            raise ValueError(f"method {method.name!r} needs a reference model")
        with torch.no_grad(), layer_output(reference, layer) if layer is not None else nullcontext([]) as ref_hidden:
            ref = concat_forward(reference, batch, ref_keys)
        if method.reference_output == "activations":
            extra["ref_activations"] = _split_rows(ref_hidden[0], {k: lab for k, (_, lab) in ref.items()})
        elif method.reference_output == "logits":
            extra["ref_logits"] = {k: logits for k, (logits, _) in ref.items()}
        else:
            extra["ref_logp"] = {k: sequence_logprob(logits, labels) for k, (logits, labels) in ref.items()}
    return method.loss(inputs, **{k: knobs[k] for k in method.knobs}, **extra)


__all__ = ["concat_forward", "decoder_layers", "layer_output", "method_loss", "to_device"]
