"""The FLAT loss (Wang et al., ICLR 2025): maximise a variational f-divergence between the template answer and
the answer to forget, using only forget data. Math: docs/losses.md.

Reference implementation: UCSC-REAL/FLAT@bf2ef07 (``dataloader.py``); flat_ray differs where that code pushes
unlearning the wrong way (see :mod:`flat_ray.losses.fdiv`) and adds the ``paper`` normalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flat_ray.losses.fdiv import DIVERGENCES, Fn
from flat_ray.losses.sequence import token_probs
from flat_ray.registry import Registry


@dataclass
class LossOutput:
    """A scalar ``loss`` to backpropagate and detached 0-d ``stats`` tensors for logging.

    ``metrics`` turns the stats into floats with a single device-to-host copy; the step only pays for that sync
    when it actually logs.
    """

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        if not self.stats:
            return {}
        values = torch.stack([v.detach().float().reshape(()) for v in self.stats.values()]).tolist()
        return dict(zip(self.stats, values, strict=True))


def _paper_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean probability of the answer tokens of each sample, ``(B,)``."""
    h, mask = token_probs(logits, labels)
    return h.sum(-1) / mask.sum(-1).clamp(min=1)


def _repo_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of answer-token probabilities over all ``B * (T - 1)`` positions of the padded batch, ``(1,)``.

    This matches the released code and makes the loss scale depend on padding; it exists for parity studies.
    """
    h, _ = token_probs(logits, labels)
    return h.sum().reshape(1) / h.numel()


NORMALIZATIONS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("normalization")
NORMALIZATIONS.register("paper", _paper_scores)
NORMALIZATIONS.register("repo", _repo_scores)
# normalizations whose score depends on the padded length: their training batches are padded to data.max_length,
# as the released code pads every sequence, so that B * (T - 1) is its denominator
PADDED_TO_MAX_LENGTH = frozenset({"repo"})


def _derivative(fn: Fn, x: torch.Tensor) -> torch.Tensor:
    """Elementwise derivative of ``fn`` at ``x`` (detached); the implicit sample weights FLAT applies."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return grad


def flat_loss(
    template_logits: torch.Tensor,
    template_labels: torch.Tensor,
    forget_logits: torch.Tensor,
    forget_labels: torch.Tensor,
    *,
    divergence: str = "tv",
    normalize: str = "paper",
) -> LossOutput:
    """FLAT loss ``mean[-g*(s_e) + f*(g*(s_f))]``.

    Args:
        template_logits: ``(B, T_e, V)`` logits of prompt + template answer ``y_e``.
        template_labels: ``(B, T_e)``; ``-100`` on prompt and padding.
        forget_logits: ``(B, T_f, V)`` logits of prompt + answer to forget ``y_f``.
        forget_labels: ``(B, T_f)``; ``-100`` on prompt and padding.
        divergence: a key or alias of :data:`DIVERGENCES`.
        normalize: ``paper`` (per-sample mean token probability, default) or ``repo`` (released code).

    Returns:
        :class:`LossOutput` whose metrics include ``score_template``, ``score_forget`` (mean scores),
        ``weight_template`` = g*'(s_e) and ``weight_forget`` = (f*∘g*)'(s_f) (mean implicit weights) and
        ``divergence_estimate`` (= -loss, the variational lower bound).
    """
    div = DIVERGENCES[divergence]
    scores = NORMALIZATIONS[normalize]
    s_e = scores(template_logits, template_labels)
    s_f = scores(forget_logits, forget_labels)
    # mean over pairs of [-g*(s_e,i) + f*(g*(s_f,i))] splits into two means, so B_e need not equal B_f.
    loss = -div.activation(s_e).mean() + div.conjugate(s_f).mean()
    stats = {
        "loss": loss.detach(),
        "divergence_estimate": -loss.detach(),
        "score_template": s_e.detach().mean(),
        "score_forget": s_f.detach().mean(),
        "weight_template": _derivative(div.activation, s_e).mean(),
        "weight_forget": _derivative(div.conjugate, s_f).mean(),
    }
    return LossOutput(loss, stats)
