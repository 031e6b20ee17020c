"""The registry of unlearning methods. A method declares which named batch splits it needs and whether it
needs a frozen reference model; the training loop reads those declarations instead of branching on names.

A method's ``loss`` takes ``inputs``, a mapping from split name to ``(logits, labels)``, plus the method's knobs
as keyword arguments (their names are listed in ``knobs`` and are fields of the ``method`` config section).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from flat_ray.losses import baselines
from flat_ray.losses.flat import LossOutput, flat_loss
from flat_ray.losses.sequence import token_logprobs
from flat_ray.registry import Registry

Inputs = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    name: str
    loss: Callable[..., LossOutput]
    batch_keys: tuple[str, ...]
    knobs: tuple[str, ...] = ()
    needs_reference: bool = False
    description: str = ""


METHODS: Registry[Method] = Registry("method")


def _flat(inputs: Inputs, *, divergence: str, normalize: str) -> LossOutput:
    return flat_loss(*inputs["template"], *inputs["forget"], divergence=divergence, normalize=normalize)


METHODS.register(
    "flat",
    Method(
        "flat",
        _flat,
        batch_keys=("forget", "template"),
        knobs=("divergence", "normalize"),
        needs_reference=False,
        description="FLAT: f-divergence between template and forget answers, forget data only",
    ),
)


def _sft(inputs: Inputs) -> LossOutput:
    """Next-token cross-entropy averaged over all answer tokens of the batch (fine-tuning, e.g. the original
    and retain models of TOFU-style benchmarks)."""
    logp, mask = token_logprobs(*inputs["forget"])
    loss = -logp.sum() / mask.sum().clamp(min=1)
    return LossOutput(loss, {"loss": loss.detach()})


METHODS.register(
    "sft",
    Method(
        "sft",
        _sft,
        batch_keys=("forget",),
        description="supervised fine-tuning on the configured split (used by `flat-ray finetune`)",
    ),
)


# Baselines (FLAT_SPEC.md §6). Knobs are `method` config fields; `needs_reference` methods get `ref_logp`, the
# frozen reference model's per-sample answer log-probs of each split in `batch_keys`.
for _name, _fn, _keys, _knobs, _ref, _desc in (
    ("grad_ascent", baselines.grad_ascent, ("forget",), (), False, "gradient ascent on the forget answers"),
    ("grad_diff", baselines.grad_diff, ("forget", "retain"), ("retain_weight",), False,
     "gradient ascent on forget plus descent on retain"),
    ("idk", baselines.idk, ("template", "retain"), ("retain_weight",), False,
     "fine-tune towards the template answer, plus retain"),
    ("npo", baselines.npo, ("forget",), ("beta",), True, "negative preference optimisation (needs a reference model)"),
    ("dpo", baselines.dpo, ("forget", "template"), ("beta",), True,
     "DPO with the template preferred over the forget answer (needs a reference model)"),
    ("simnpo", baselines.simnpo, ("forget",), ("simnpo_beta", "gamma"), False,
     "reference-free, length-normalised NPO with margin gamma"),
):
    METHODS.register(_name, Method(_name, _fn, batch_keys=_keys, knobs=_knobs, needs_reference=_ref, description=_desc))
