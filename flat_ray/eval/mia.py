"""Membership inference and memorization on a forget split (docs/eval.md, Membership inference), as
open-unlearning computes them (``src/evals/metrics/mia/`` and ``memorization.py`` there).

Per question, from one teacher-forced forward of prompt + answer (the answer's n labelled tokens, the last of them
the end-of-sequence token):

- ``loss``: the mean NLL of the n answer tokens (TOFU's ``avg_gt_loss``);
- ``zlib``: ``loss`` divided by the zlib-compressed byte length of the answer text;
- ``min_k``: minus the mean of the lowest ``max(1, int(0.4 * m))`` log-probabilities of the first m = n - 1 answer
  tokens (open-unlearning leaves the end-of-sequence token out of its token-wise statistics);
- ``min_k_plus_plus``: the same over z-scores ``(log p(y_t) - mu_t) / sigma_t``, with mu_t and sigma_t^2 the
  mean and variance of the log-probability under the model's own next-token distribution (sigma^2 at least 1e-6);
- ``em``: exact memorization, the fraction of the m tokens that are the model's argmax;
- ``es``: extraction strength, 1 - k/m for the smallest k whose suffix of argmax predictions equals the answer's
  (open-unlearning's loop: when no suffix matches, k stops at m - 1, so ``es`` is 1/m, not 0).

GradNorm (``eval.mia_gradnorm``, off by default as in open-unlearning's evaluation configs: one backward pass per
question) scores each question by the mean, over the model's parameter tensors, of the 2-norm of the gradient of
minus the mean log-probability of its first m answer tokens, the question on its own (a batch of one).

The Reference attack scores ``loss`` minus a reference model's ``loss`` on the same question; flat_ray takes the
reference's losses from its evaluation logs (a retain model evaluated on the same forget and held-out questions, as
``eval.reference=auto`` does) instead of loading a second model at every evaluation.

The attacks score the forget questions (label 0) against held-out questions no model was trained on (label 1); the
AUC is 1 when the forget answers are far more likely than the held-out ones (still memorized) and 0.5 when the model
cannot tell them apart. PrivLeak compares the Min-K% AUC with a reference model's (a retain model, 0.5 when none):
``100 * ((1 - auc) - (1 - ref)) / (1 - ref)``, the same quantity as MUSE's PrivLeak written with open-unlearning's
AUC orientation.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from flat_ray.losses import IGNORE_INDEX

MIN_K = 0.4
STATS = ("loss", "zlib", "min_k", "min_k_plus_plus", "em", "es")
# metric name -> the per-question statistic its AUC ranks by
GRADNORM = "gradnorm"  # a statistic only where eval.mia_gradnorm asks for it
ATTACKS = {"mia_loss": "loss", "mia_zlib": "zlib", "mia_min_k": "min_k", "mia_min_k_plus_plus": "min_k_plus_plus",
           "mia_gradnorm": GRADNORM}
DEFAULT_REFERENCE_AUC = 0.5  # open-unlearning's privleak ref_value when no retain model's AUC is known


def _lowest_mean(values: torch.Tensor, k: float) -> float:
    n = max(1, int(len(values) * k))
    return float(-values.sort().values[:n].mean())


def _extraction_strength(preds: torch.Tensor, labels: torch.Tensor) -> float:
    m = len(labels)
    if m == 0:
        return 0.0
    k = 0
    for k in range(m):
        if torch.equal(preds[k:], labels[k:]):
            break
    return 1.0 - k / m


@torch.no_grad()
def answer_stats(logits: torch.Tensor, labels: torch.Tensor, texts: Sequence[str], k: float = MIN_K
                 ) -> dict[str, list[float]]:
    """The per-question statistics above for each row of a batch: ``logits`` (B, T, V), ``labels`` (B, T) with
    -100 outside the answer, ``texts`` the answers' decoded text (for ``zlib``)."""
    out: dict[str, list[float]] = {name: [] for name in STATS}
    for row, lab, text in zip(logits, labels, texts, strict=True):
        pos = (lab != IGNORE_INDEX).nonzero(as_tuple=True)[0]
        logp = row[pos - 1].double().log_softmax(-1)  # the distributions that predict the answer tokens
        gold = lab[pos]
        gold_lp = logp.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
        loss = float(-gold_lp.mean()) if len(pos) else float("nan")
        out["loss"].append(loss)
        out["zlib"].append(loss / len(zlib.compress(text.encode("utf-8"))))
        lp, vocab, tokens = gold_lp[:-1], logp[:-1], gold[:-1]  # the end-of-sequence token left out
        if len(tokens) == 0:
            out["min_k"].append(0.0)
            out["min_k_plus_plus"].append(0.0)
            out["em"].append(float("nan"))
            out["es"].append(0.0)
            continue
        p = vocab.exp()
        mu = (p * vocab).sum(-1)
        sigma = ((p * vocab.square()).sum(-1) - mu.square()).clamp(min=1e-6).sqrt()
        out["min_k"].append(_lowest_mean(lp, k))
        out["min_k_plus_plus"].append(_lowest_mean((lp - mu) / sigma, k))
        preds = vocab.argmax(-1)
        out["em"].append(float((preds == tokens).double().mean()))
        out["es"].append(_extraction_strength(preds, tokens))
    return out


def grad_norm(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
              p: float = 2.0) -> float:
    """GradNorm of one question (a batch of one): the mean over the model's parameter tensors of the ``p``-norm of
    the gradient of minus the mean log-probability of its first m answer tokens (the end-of-sequence token left
    out, as in the statistics above). The gradients come from ``torch.autograd.grad``: no parameter's ``.grad``
    is written, so an engine's accumulated gradients and optimizer are untouched. NaN for an answer of one token."""
    params = list(model.parameters())
    flags = [q.requires_grad for q in params]
    try:
        for q in params:
            q.requires_grad_(True)
        with torch.enable_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[0]
            pos = (labels[0] != IGNORE_INDEX).nonzero(as_tuple=True)[0][:-1]
            if len(pos) == 0:
                return float("nan")
            logp = logits[pos - 1].float().log_softmax(-1).gather(-1, labels[0, pos].unsqueeze(-1)).squeeze(-1)
            grads = torch.autograd.grad(-logp.mean(), params, allow_unused=True)
    finally:
        for q, flag in zip(params, flags, strict=True):
            q.requires_grad_(flag)
    return float(torch.stack([g.detach().norm(p=p) for g in grads if g is not None]).mean())


def roc_auc(scores_label0: Sequence[float], scores_label1: Sequence[float]) -> float:
    """ROC-AUC of telling label 1 from label 0 by score (Mann-Whitney U with average ranks for ties)."""
    s0, s1 = np.asarray(scores_label0, float), np.asarray(scores_label1, float)
    ranks = rankdata(np.concatenate([s0, s1]))
    u1 = ranks[len(s0):].sum() - len(s1) * (len(s1) + 1) / 2
    return float(u1 / (len(s0) * len(s1)))


def auc(forget: Sequence[float], holdout: Sequence[float]) -> float:
    """ROC-AUC of telling held-out (label 1) from forget (label 0) questions by score, ties at average rank (what
    scikit-learn's ``roc_auc_score`` gives)."""
    return roc_auc(forget, holdout)


def privleak(auc_min_k: float, reference_auc: float | None) -> float:
    ref = DEFAULT_REFERENCE_AUC if reference_auc is None else reference_auc
    return ((1 - auc_min_k) - (1 - ref)) / ((1 - ref) + 1e-10) * 100


def metrics(forget: Mapping[str, np.ndarray], holdout: Mapping[str, np.ndarray],
            reference: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The MIA AUCs, PrivLeak, extraction strength and exact memorization of a forget split against its holdout.
    ``reference`` (:func:`flat_ray.eval.tofu.read_reference_mia`): the reference (retain) model's Min-K% ``auc`` for
    PrivLeak, and its per-question losses on the same forget and held-out questions for the Reference attack."""
    out = {name: auc(forget[stat], holdout[stat]) for name, stat in ATTACKS.items() if stat in forget and stat in holdout}
    reference = reference or {}
    ref_forget, ref_holdout = reference.get("forget_loss"), reference.get("holdout_loss")
    if (ref_forget is not None and ref_holdout is not None and len(ref_forget) == len(forget["loss"])
            and len(ref_holdout) == len(holdout["loss"])):
        out["mia_reference"] = auc(np.asarray(forget["loss"]) - ref_forget, np.asarray(holdout["loss"]) - ref_holdout)
    out["privleak"] = privleak(out["mia_min_k"], reference.get("auc"))
    out["extraction_strength"] = float(np.mean(forget["es"]))
    em = np.asarray(forget["em"], dtype=float)
    out["exact_memorization"] = float(np.mean(em[~np.isnan(em)])) if (~np.isnan(em)).any() else float("nan")
    return out
