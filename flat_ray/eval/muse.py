"""MUSE-News metrics (docs/FLAT_SPEC.md §4): VerbMem, KnowMem on forget and retain, PrivLeak. Reported ×100.

- VerbMem: ROUGE-L F1 of a greedy 128-token continuation of each ``verbmem_forget`` prompt against the first 128
  tokens of its ground truth.
- KnowMem: ROUGE-L F1 of the answer to ``Question: {q}\\nAnswer: `` after 10 in-context pairs (the ``*_qa_icl``
  split), greedy, at most 32 new tokens, cut at the first blank line or ``Question``.
- PrivLeak: ROC-AUC of forget (label 0) vs holdout (label 1) texts scored by -Min-40% (Min-40% = -mean of the
  lowest 40% token log-probs), relative to the retrained model's AUC: ``100 * (AUC - AUC_retrain) / AUC_retrain``.
  ``eval.privleak_auc_retrain`` is MUSE's published News constant 0.4772 by default; ``flat-ray eval`` of a
  retain model prints its ``privleak_auc`` to use instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from flat_ray.data import load_split

VERBMEM_TOKENS = 128
KNOWMEM_TOKENS = 32
ICL_PAIRS = 10
MIN_K = 0.4


def eval_rows(benchmark: str, data_dir: str | None, limit: int | None) -> dict[str, list[dict]]:
    def first(split: str, n: int | None = limit) -> list[dict]:
        rows = load_split(benchmark, split, data_dir)
        return rows[:n] if n else rows

    return {"verbmem": first("verbmem_forget"), "knowmem_forget": first("knowmem_forget_qa"),
            "knowmem_retain": first("knowmem_retain_qa"), "icl_forget": first("knowmem_forget_qa_icl", ICL_PAIRS),
            "icl_retain": first("knowmem_retain_qa_icl", ICL_PAIRS), "privleak_forget": first("privleak_forget"),
            "privleak_holdout": first("privleak_holdout")}


def rouge_l_f1(prediction: str, target: str) -> float:
    from flat_ray.eval.runner import rouge_scorer_l

    return rouge_scorer_l().score(target, prediction)["rougeL"].fmeasure


def icl_prompt(shots: Sequence[Mapping[str, str]], question: str) -> str:
    context = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return f"{context}Question: {question}\nAnswer: "


def cut_answer(text: str) -> str:
    """KnowMem's post-processing: keep what comes before the first blank line or ``Question``."""
    for stop in ("\n\n", "Question"):
        text = text.split(stop, 1)[0]
    return text.strip()


def min_k_score(token_logprobs: np.ndarray, k: float = MIN_K) -> float:
    """Min-k% of one text: minus the mean of its lowest ``k`` fraction of token log-probs (at least one)."""
    lp = np.sort(np.asarray(token_logprobs, dtype=float))
    n = max(1, int(len(lp) * k))
    return float(-lp[:n].mean())


def roc_auc(scores_label0: Sequence[float], scores_label1: Sequence[float]) -> float:
    """ROC-AUC of telling label 1 from label 0 by score (Mann-Whitney U with average ranks for ties)."""
    s0, s1 = np.asarray(scores_label0, float), np.asarray(scores_label1, float)
    ranks = rankdata(np.concatenate([s0, s1]))
    u1 = ranks[len(s0):].sum() - len(s1) * (len(s1) + 1) / 2
    return float(u1 / (len(s0) * len(s1)))


def privleak(auc: float, auc_retrain: float) -> float:
    return 100.0 * (auc - auc_retrain) / auc_retrain


def evaluate(model: Any, tokenizer: Any, rows: Mapping[str, list[dict]], *, max_length: int, batch_size: int,
             auc_retrain: float, rank: int = 0, world_size: int = 1, device: Any = "cpu") -> dict[str, float]:
    from flat_ray.eval.runner import generate_texts, text_token_logprobs

    kw = {"batch_size": batch_size, "rank": rank, "world_size": world_size, "device": device}
    out: dict[str, float] = {}
    verb = rows["verbmem"]
    gens = generate_texts(model, tokenizer, [r["prompt"] for r in verb], max_new_tokens=VERBMEM_TOKENS, **kw)
    refs = [tokenizer.decode(tokenizer(r["gt"], add_special_tokens=False)["input_ids"][:VERBMEM_TOKENS]) for r in verb]
    out["verbmem_forget"] = 100.0 * float(np.mean([rouge_l_f1(g, t) for g, t in zip(gens, refs, strict=True)]))
    for split in ("forget", "retain"):
        qa, shots = rows[f"knowmem_{split}"], rows[f"icl_{split}"]
        prompts = [icl_prompt(shots, r["question"]) for r in qa]
        gens = generate_texts(model, tokenizer, prompts, max_new_tokens=KNOWMEM_TOKENS, **kw)
        out[f"knowmem_{split}"] = 100.0 * float(np.mean([rouge_l_f1(cut_answer(g), r["answer"])
                                                         for g, r in zip(gens, qa, strict=True)]))
    scores = {}
    for split in ("forget", "holdout"):
        lps = text_token_logprobs(model, tokenizer, [r["text"] for r in rows[f"privleak_{split}"]],
                                  max_length=max_length, **kw)
        scores[split] = [-min_k_score(lp) for lp in lps]  # higher = more likely a training member
    auc = roc_auc(scores["forget"], scores["holdout"])
    out["privleak_auc"] = auc
    out["privleak"] = privleak(auc, auc_retrain)
    return out
