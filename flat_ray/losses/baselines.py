"""Baseline unlearning losses (docs/losses.md, Baselines), pure torch, over logits/labels and reference log-probs.

``ce`` is the mean next-token cross-entropy over all answer tokens of a split; ``logp`` the per-sample sum of
answer-token log-probabilities. Reference log-probs arrive precomputed (``ref_logp``: split -> (B,)); losses
never see a model.

- GA (gradient ascent): -CE(forget)
- GradDiff: -CE(forget) + w * CE(retain)
- IDK: CE(prompt + template) + w * CE(retain)
- NPO (Zhang et al. 2024): -(2/beta) * mean log sigmoid(beta * (NLL_sum(theta; y_f) - NLL_sum(ref; y_f)))
  + w * CE(retain)
- DPO with the template as the preferred answer: -(2/beta) * mean log sigmoid(beta * ((logp(y_e) - logp(y_f)) -
  (logp_ref(y_e) - logp_ref(y_f)))) + w * CE(retain); the reference term is kept (the released FLAT code
  zeroes it)
- SimNPO (Fan et al. 2024), reference-free: -(2/beta) * mean log sigmoid(-beta * logp(y_f) / |y_f| - gamma)
  + w * CE(retain); gamma is beta * delta of the SimNPO code's and open-unlearning's parametrisation

``w`` is ``retain_weight``: open-unlearning's ``alpha`` (1 by default there and in flat_ray's config). At
``w = 0`` the retain term is left out and the retain batch is never read, which gives the forget-only forms.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from flat_ray.losses.flat import LossOutput
from flat_ray.losses.sequence import token_logprobs

Inputs = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over all answer tokens of the batch (token-weighted, as HF's causal-LM loss)."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum() / mask.sum().clamp(min=1)


def logp_and_length(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp, mask = token_logprobs(logits, labels)
    return logp.sum(-1), mask.sum(-1).clamp(min=1)


def with_retain(out: LossOutput, inputs: Inputs, retain_weight: float) -> LossOutput:
    """``out`` plus ``retain_weight * CE(retain)``; at weight 0, ``out`` itself (``inputs`` may lack "retain")."""
    if retain_weight == 0:
        return out
    ce_r = cross_entropy(*inputs["retain"])
    loss = out.loss + retain_weight * ce_r
    return LossOutput(loss, {**out.stats, "loss": loss.detach(), "ce_retain": ce_r.detach()})


def grad_ascent(inputs: Inputs) -> LossOutput:
    ce_f = cross_entropy(*inputs["forget"])
    return LossOutput(-ce_f, {"loss": -ce_f.detach(), "ce_forget": ce_f.detach()})


def grad_diff(inputs: Inputs, *, retain_weight: float) -> LossOutput:
    return with_retain(grad_ascent(inputs), inputs, retain_weight)


def idk(inputs: Inputs, *, retain_weight: float) -> LossOutput:
    ce_t = cross_entropy(*inputs["template"])
    return with_retain(LossOutput(ce_t, {"loss": ce_t.detach(), "ce_template": ce_t.detach()}), inputs, retain_weight)


def npo(inputs: Inputs, *, beta: float, ref_logp: Mapping[str, torch.Tensor], retain_weight: float) -> LossOutput:
    logp_f, _ = logp_and_length(*inputs["forget"])
    # NLL_sum(theta) - NLL_sum(ref) = logp_ref - logp_theta
    margin = ref_logp["forget"].detach() - logp_f
    loss = -(2.0 / beta) * F.logsigmoid(beta * margin).mean()
    out = LossOutput(loss, {"loss": loss.detach(), "logp_forget": logp_f.detach().mean(),
                            "logratio_forget": (-margin).detach().mean()})
    return with_retain(out, inputs, retain_weight)


def dpo(inputs: Inputs, *, beta: float, ref_logp: Mapping[str, torch.Tensor], retain_weight: float) -> LossOutput:
    logp_e, _ = logp_and_length(*inputs["template"])
    logp_f, _ = logp_and_length(*inputs["forget"])
    ref = ref_logp["template"].detach() - ref_logp["forget"].detach()
    margin = (logp_e - logp_f) - ref
    loss = -(2.0 / beta) * F.logsigmoid(beta * margin).mean()
    out = LossOutput(loss, {"loss": loss.detach(), "margin": margin.detach().mean(),
                            "logp_template": logp_e.detach().mean(), "logp_forget": logp_f.detach().mean()})
    return with_retain(out, inputs, retain_weight)


def simnpo(inputs: Inputs, *, simnpo_beta: float, gamma: float, retain_weight: float) -> LossOutput:
    logp_f, length = logp_and_length(*inputs["forget"])
    loss = -(2.0 / simnpo_beta) * F.logsigmoid(-simnpo_beta * logp_f / length - gamma).mean()
    out = LossOutput(loss, {"loss": loss.detach(), "logp_forget_per_token": (logp_f / length).detach().mean()})
    return with_retain(out, inputs, retain_weight)
