"""Per-token quantities of answer tokens, computed from logits and labels (pure torch).

Shapes: ``logits`` is ``(B, T, V)`` in any float dtype, ``labels`` is ``(B, T)`` with ``-100`` at positions that
do not count (prompt, padding). The next-token shift happens here: logits at position ``t`` predict the label at
``t + 1``, so every returned tensor is ``(B, T - 1)``.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

# Rows of the (positions, vocabulary) logits turned to fp32 at once: bounds the transient fp32 memory to about
# CHUNK_ELEMENTS * 4 bytes (256 MiB) whatever the batch, sequence length or vocabulary.
CHUNK_ELEMENTS = 2**26


class _GoldLogprob(torch.autograd.Function):
    """``log_softmax(logits)[target]`` in fp32 over the rows of ``(N, V)`` logits, computed chunk by chunk.

    Autograd's own ``logits.float().logsumexp()`` keeps an fp32 copy of the whole ``(N, V)`` logits for backward
    and builds an fp32 gradient of the same size; here only the logits (in their own dtype) and the ``(N,)``
    log-normaliser are kept, and the gradient ``g * (onehot - softmax)`` is built chunk by chunk in the logits'
    dtype. Values and gradients are those of the plain formula (the tests compare them).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        rows = max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
        lse = torch.cat([c.float().logsumexp(-1) for c in logits.split(rows)]) if logits.shape[0] else \
            logits.new_zeros(0, dtype=torch.float32)
        gold = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1).float()
        ctx.save_for_backward(logits, target, lse)
        ctx.rows = rows
        return gold - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        logits, target, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            sl = slice(start, start + ctx.rows)
            g = grad[sl].float().unsqueeze(-1)
            chunk = (logits[sl].float() - lse[sl].unsqueeze(-1)).exp_().mul_(-g)
            chunk.scatter_add_(-1, target[sl].unsqueeze(-1), g)
            out[sl] = chunk
        return out, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each gold next token, in fp32, and the mask of positions that count.

    Returns ``(logp, mask)``, both ``(B, T - 1)``; ``logp`` is 0 where ``mask`` is False. Log-softmax runs in
    fp32 whatever the logits' dtype (bf16 log-probs lose ~3 significant digits), chunk by chunk, so no fp32 copy
    of the ``(B, T, V)`` logits is ever built or kept for backward (see :class:`_GoldLogprob`). There is no
    data-dependent indexing, hence no device-to-host sync.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    b, t, v = logits.shape
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    # shift the targets rather than the logits, so the logits are flattened as a view (no copy); the last
    # position predicts nothing and is dropped afterwards
    target = torch.cat([labels.masked_fill(~mask, 0), labels.new_zeros(b, 1)], dim=1)
    logp = _GoldLogprob.apply(logits.reshape(b * t, v), target.reshape(b * t)).reshape(b, t)[:, :-1]
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
