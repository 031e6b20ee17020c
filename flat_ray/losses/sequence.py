"""Per-token quantities of answer tokens, computed from logits and labels (pure torch).

Shapes: ``logits`` is ``(B, T, V)`` in any float dtype, ``labels`` is ``(B, T)`` with ``-100`` at positions that
do not count (prompt, padding). The next-token shift happens here: logits at position ``t`` predict the label at
``t + 1``, so every returned tensor is ``(B, T - 1)``.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each gold next token, in fp32, and the mask of positions that count.

    Returns ``(logp, mask)``, both ``(B, T - 1)``; ``logp`` is 0 where ``mask`` is False. Log-softmax runs in
    fp32 whatever the logits' dtype (bf16 log-probs lose ~3 significant digits); it is computed as
    ``gather(logits) - logsumexp(logits)`` so that no full ``(B, T, V)`` log-softmax tensor is kept for backward.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    logits = logits[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0).unsqueeze(-1)
    gold = logits.gather(-1, safe).squeeze(-1).float()
    logp = gold - torch.logsumexp(logits.float(), dim=-1)
    return logp.masked_fill(~mask, 0.0), mask


def token_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability (not log-probability) of each gold next token: ``exp(logp)``, zeroed where masked."""
    logp, mask = token_logprobs(logits, labels)
    return logp.exp() * mask, mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of answer-token log-probabilities per sample, ``(B,)``. Baselines (NPO, DPO) build on this."""
    logp, _ = token_logprobs(logits, labels)
    return logp.sum(dim=-1)


def mean_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per answer token, per sample, ``(B,)``; TOFU's ``L(a)``."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum(-1) / mask.sum(-1).clamp(min=1)
