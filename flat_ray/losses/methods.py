"""The registry of unlearning methods. A method declares which named batch splits it needs and whether it
needs a frozen reference model; the training loop reads those declarations instead of branching on names.

A method's ``loss`` takes ``inputs``, a mapping from split name to ``(logits, labels)``, plus the method's knobs
as keyword arguments (their names are listed in ``knobs`` and are fields of the ``method`` config section).
``splits(knobs)`` is the set of splits a run actually reads: a split listed in ``optional`` is dropped while
its knob is 0 (the retain batch of the baselines at ``retain_weight=0``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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
    # splits whose frozen-reference answer log-probs the loss reads (as ``ref_logp``); empty: no reference model
    reference_keys: tuple[str, ...] = ()
    description: str = ""
    # (split, knob) pairs: the split is read only while the knob is non-zero
    optional: tuple[tuple[str, str], ...] = ()
    # what the loss gets of the reference model: "logp" (``ref_logp``: split -> per-sample answer log-prob sums),
    # "logits" (``ref_logits``: split -> the reference's (B, T, V) logits) or "activations" (``ref_activations``)
    reference_output: str = "logp"
    # the method knob naming a decoder layer whose output the loss reads (``activations``: split -> (B, T, d)
    # tensors of the trained model; with "activations" as reference output, the reference's too); None: none
    activation_layer: str | None = None
    # this method's defaults for shared knobs whose config value is null (open-unlearning's per-method defaults)
    defaults: tuple[tuple[str, Any], ...] = ()

    @property
    def needs_reference(self) -> bool:
        return bool(self.reference_keys)

    def splits(self, knobs: Mapping[str, Any]) -> tuple[str, ...]:
        """The batch splits this method reads with these knob values (``batch_keys`` minus switched-off ones)."""
        off = {split for split, knob in self.optional if knob in knobs and knobs[knob] == 0}
        return tuple(k for k in self.batch_keys if k not in off)


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


# Baselines (docs/losses.md, Baselines). Knobs are `method` config fields; methods with `reference_keys` get `ref_logp`, the
# frozen reference model's per-sample answer log-probs of those splits. Every baseline with a retain term adds
# `retain_weight * CE(retain)` (open-unlearning's alpha); at retain_weight=0 its retain batch is not built.
_RETAIN = (("retain", "retain_weight"),)
for _name, _fn, _keys, _knobs, _ref, _desc in (
    ("grad_ascent", baselines.grad_ascent, ("forget",), (), (), "gradient ascent on the forget answers"),
    ("grad_diff", baselines.grad_diff, ("forget", "retain"), ("retain_weight",), (),
     "gradient ascent on forget plus descent on retain"),
    ("idk", baselines.idk, ("template", "retain"), ("retain_weight",), (),
     "fine-tune towards the template answer, plus retain"),
    ("npo", baselines.npo, ("forget", "retain"), ("beta", "retain_weight"), ("forget",),
     "negative preference optimisation plus retain (needs a reference model)"),
    ("dpo", baselines.dpo, ("forget", "template", "retain"), ("beta", "retain_weight"), ("forget", "template"),
     "DPO with the template preferred over the forget answer, plus retain (needs a reference model)"),
    ("simnpo", baselines.simnpo, ("forget", "retain"), ("simnpo_beta", "gamma", "retain_weight"), (),
     "reference-free, length-normalised NPO with margin gamma, plus retain"),
):
    _optional = _RETAIN if "retain" in _keys else ()
    METHODS.register(_name, Method(_name, _fn, batch_keys=_keys, knobs=_knobs, reference_keys=_ref,
                                   description=_desc, optional=_optional))

# open-unlearning's token-level methods, with its defaults (configs/trainer/*.yaml there): ``forget_weight`` is its
# gamma, ``retain_weight`` its alpha
for _name, _fn, _keys, _knobs, _ref, _defaults, _desc in (
    ("wga", baselines.wga, ("forget", "retain"), ("wga_beta", "forget_weight", "retain_weight"), (), (),
     "weighted gradient ascent: each forget token weighted by its probability to the power beta, plus retain"),
    ("satimp", baselines.satimp, ("forget", "retain"),
     ("satimp_beta1", "satimp_beta2", "forget_weight", "retain_weight"), (), (("forget_weight", 0.1),),
     "gradient ascent weighted by p^beta1 (1-p)^beta2 per forget token (saturation and importance), plus retain"),
    ("undial", baselines.undial, ("forget", "retain"), ("undial_beta", "forget_weight", "retain_weight"),
     ("forget",), (("retain_weight", 0.0),),
     "self-distillation towards the reference's distribution with the gold token's logit lowered by beta "
     "(needs a reference model)"),
    ("ceu", baselines.ceu, ("forget",), ("ceu_ignore_first",), (), (),
     "cross-entropy unlearning: towards the model's own distribution without the gold token, forget only"),
):
    METHODS.register(_name, Method(_name, _fn, batch_keys=_keys, knobs=_knobs, reference_keys=_ref,
                                   description=_desc, optional=_RETAIN if "retain" in _keys else (),
                                   reference_output="logits" if _ref else "logp", defaults=_defaults))

METHODS.register("rmu", Method(
    "rmu", baselines.rmu, batch_keys=("forget", "retain"), knobs=("steering_coeff", "forget_weight", "retain_weight"),
    reference_keys=("retain",), reference_output="activations", activation_layer="rmu_layer", optional=_RETAIN,
    description="representation misdirection (WMDP): one layer's activations on forget answers pushed towards a "
                "random vector, kept on retain answers (needs a reference model)"))
