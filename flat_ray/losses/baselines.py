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

- WGA: f * mean_tokens(sg(p)^beta * log p(y_f)) + w * CE(retain)
- SatImp: f * mean_tokens(sg(p)^beta1 * (1 - sg(p))^beta2 * log p(y_f)) + w * CE(retain)
- UNDIAL: f * mean_tokens CE(softmax(z_ref - beta * onehot(y)), p_theta) + w * CE(retain)
- CE-U: mean_tokens CE(softmax(sg(z) with the gold logit at -inf), p_theta), forget only
- RMU: f * MSE_tokens(h_l(forget), c) + w * MSE_tokens(h_l(retain), h_l_ref(retain)), h_l a layer's output

``w`` is ``retain_weight``: open-unlearning's ``alpha`` (1 by default there and in flat_ray's config; 0 for UNDIAL,
as there); ``f`` is ``forget_weight``, open-unlearning's ``gamma`` (1; 0.1 for SatImp); ``sg`` stops the gradient.
At ``w = 0`` the retain term is left out and the retain batch is never read, which gives the forget-only forms.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from flat_ray.losses.flat import LossOutput
from flat_ray.losses.sequence import IGNORE_INDEX, token_logprobs

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


# ------------------------------------------------------------------ open-unlearning's token-weighted methods
# WGA, SatImp, UNDIAL and CE-U work per answer token. ``logp`` below is the (B, T-1) gold-token log-probability
# of :func:`token_logprobs` (0 where masked), ``mask`` its answer positions; "mean over answer tokens" divides by
# the batch's number of answer tokens, as open-unlearning's ``[labels != -100].mean()``.


def _answer_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _weighted_ascent(inputs: Inputs, weight_of, forget_weight: float, retain_weight: float,
                     name: str) -> LossOutput:
    """``forget_weight * mean(w(p) * logp)`` over the forget answer tokens (a weighted gradient ascent: minimising
    it lowers each token's log-probability in proportion to the detached weight ``w`` of its probability ``p``),
    plus the retain term."""
    logp, mask = token_logprobs(*inputs["forget"])
    weight = weight_of(logp.detach().exp())
    forget = _answer_mean(weight * logp, mask)
    loss = forget_weight * forget
    out = LossOutput(loss, {"loss": loss.detach(), f"{name}_forget": forget.detach(),
                            "weight_mean": _answer_mean(weight, mask).detach()})
    return with_retain(out, inputs, retain_weight)


def wga(inputs: Inputs, *, wga_beta: float, forget_weight: float, retain_weight: float) -> LossOutput:
    """WGA (weighted gradient ascent, Wang et al. 2025): token weight ``p ** beta``: tokens the model already
    finds unlikely get little push."""
    return _weighted_ascent(inputs, lambda p: p ** wga_beta, forget_weight, retain_weight, "wga")


def satimp(inputs: Inputs, *, satimp_beta1: float, satimp_beta2: float, forget_weight: float,
           retain_weight: float) -> LossOutput:
    """SatImp (Yang et al. 2025): token weight ``p ** beta1 * (1 - p) ** beta2``, small for tokens the model is
    sure of (saturated) and for those already forgotten (unimportant)."""
    return _weighted_ascent(inputs, lambda p: p ** satimp_beta1 * (1 - p) ** satimp_beta2, forget_weight,
                            retain_weight, "satimp")


def _answer_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token logits ``(N, V)`` of the N answer positions and their gold tokens ``(N,)``."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    return logits[:, :-1][mask], shifted[mask]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 at least (bf16 and fp16 logits are widened, fp64 kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_v target_v * log_softmax(logits)_v`` in fp32 at least."""
    return -(target * _wide(logits).log_softmax(-1)).sum(-1).mean() if logits.shape[0] else logits.sum() * 0


def undial(inputs: Inputs, *, undial_beta: float, forget_weight: float, retain_weight: float,
           ref_logits: Mapping[str, torch.Tensor]) -> LossOutput:
    """UNDIAL (Dong et al. 2025): self-distillation towards the frozen reference's next-token distribution with the
    gold token's logit lowered by ``beta``: ``CE(student, softmax(teacher - beta * onehot(gold)))``, mean over the
    forget answer tokens."""
    logits, labels = inputs["forget"]
    student, gold = _answer_rows(logits, labels)
    teacher, _ = _answer_rows(ref_logits["forget"].detach(), labels)
    target = (_wide(teacher) - undial_beta * F.one_hot(gold, teacher.shape[-1])).softmax(-1)
    forget = _soft_cross_entropy(student, target)
    loss = forget_weight * forget
    return with_retain(LossOutput(loss, {"loss": loss.detach(), "undial_forget": forget.detach()}), inputs,
                       retain_weight)


def ceu(inputs: Inputs, *, ceu_ignore_first: int) -> LossOutput:
    """CE-U (Yang et al. 2025): cross-entropy towards the model's own detached next-token distribution with the
    gold token removed (its logit at -inf), mean over the forget answer tokens after the first ``ceu_ignore_first``
    of each answer (the CE-U paper's trick, open-unlearning's default 1)."""
    logits, labels = inputs["forget"]
    answer = labels != IGNORE_INDEX
    labels = labels.masked_fill(answer & (answer.cumsum(-1) <= ceu_ignore_first), IGNORE_INDEX)
    rows, gold = _answer_rows(logits, labels)
    target = _wide(rows.detach()).scatter(-1, gold.unsqueeze(-1), float("-inf")).softmax(-1)
    loss = _soft_cross_entropy(rows, target)
    return LossOutput(loss, {"loss": loss.detach()})


# ------------------------------------------------------------------------------------------------------ RMU
RMU_CONTROL_SEED = 0  # the control vector's direction: the same on every rank, and again after a restart


def control_vector(dim: int, steering_coeff: float) -> torch.Tensor:
    """RMU's fixed random direction: u uniform on [0, 1)^dim, scaled to norm ``steering_coeff``."""
    u = torch.rand(dim, generator=torch.Generator().manual_seed(RMU_CONTROL_SEED), dtype=torch.float64)
    return (u / u.norm() * steering_coeff).float()


def activation_mse(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example, the squared difference of two (B, T, d) activations averaged over d and over the answer
    positions (``labels`` != -100, unshifted); then the mean over examples (open-unlearning's RMU)."""
    mask = (labels != IGNORE_INDEX).float()
    per_token = (a.float() - b.float()).square().mean(-1)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def rmu(inputs: Inputs, *, steering_coeff: float, forget_weight: float, retain_weight: float,
        activations: Mapping[str, torch.Tensor], ref_activations: Mapping[str, torch.Tensor] | None = None
        ) -> LossOutput:
    """RMU (Li et al. 2024, WMDP): push one layer's activations on the forget answers towards a fixed random
    vector of norm ``steering_coeff``, and keep them on the retain answers where the frozen reference has them:
    ``f * MSE(a_forget, c) + w * MSE(a_retain, a_ref_retain)``."""
    a_forget = activations["forget"]
    c = control_vector(a_forget.shape[-1], steering_coeff).to(a_forget.device)
    forget = activation_mse(a_forget, c.expand_as(a_forget), inputs["forget"][1])
    loss = forget_weight * forget
    stats = {"rmu_forget": forget.detach()}
    if retain_weight:
        retain = activation_mse(activations["retain"], ref_activations["retain"].detach(), inputs["retain"][1])
        loss = loss + retain_weight * retain
        stats["rmu_retain"] = retain.detach()
    return LossOutput(loss, {"loss": loss.detach(), **stats})
