"""MUSE-News metrics (docs/eval.md, MUSE-News): VerbMem, KnowMem on forget and retain, PrivLeak. Reported ×100.

- VerbMem: ROUGE-L F1 of a greedy 128-token continuation of each ``verbmem_forget`` prompt against its ground
  truth cut as MUSE cuts it: tokenised *with* special tokens, the first 128 ids kept, decoded without them (127
  content tokens with a tokenizer that adds BOS).
- KnowMem: ROUGE-L F1 of the answer to ``Question: {q}\\nAnswer: `` after 10 in-context pairs (the ``*_qa_icl``
  split), greedy, at most 32 new tokens, cut before the first ``\\n\\n``, ``\\nQuestion`` or ``Question:``.
- ROUGE here is MUSE's: ``rouge_score`` *without* the Porter stemmer (TOFU's metrics use the stemmer).
- PrivLeak: ROC-AUC of forget (label 0) vs holdout (label 1) texts scored by -Min-40% (Min-40% = -mean of the
  lowest 40% token log-probs), relative to the retrained model's AUC: ``100 * (AUC - AUC_retrain) / AUC_retrain``.
  ``eval.privleak_auc_retrain`` is MUSE's published News constant 0.4772 by default; ``flat-ray eval`` of a
  retain model prints its ``privleak_auc`` to use instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flat_ray.data import load_split
from flat_ray.eval.mia import roc_auc

_SCORER = None

VERBMEM_TOKENS = 128
KNOWMEM_TOKENS = 32
ICL_PAIRS = 10
MIN_K = 0.4
# muse_bench's metrics/knowmem.py cuts the generated answer before the first of these
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")


def eval_rows(benchmark: str, data_dir: str | None, limit: int | None) -> dict[str, list[dict]]:
    def first(split: str, n: int | None = limit) -> list[dict]:
        rows = load_split(benchmark, split, data_dir)
        return rows[:n] if n else rows

    return {"verbmem": first("verbmem_forget"), "knowmem_forget": first("knowmem_forget_qa"),
            "knowmem_retain": first("knowmem_retain_qa"), "icl_forget": first("knowmem_forget_qa_icl", ICL_PAIRS),
            "icl_retain": first("knowmem_retain_qa_icl", ICL_PAIRS), "privleak_forget": first("privleak_forget"),
            "privleak_holdout": first("privleak_holdout")}


def rouge_l_f1(prediction: str, target: str) -> float:
    """ROUGE-L F1 as MUSE scores it: no stemming, so "cats" and "cat" are different words."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _SCORER.score(target, prediction)["rougeL"].fmeasure


def verbmem_reference(tokenizer: Any, gt: str, n_ids: int = VERBMEM_TOKENS) -> str:
    """VerbMem's ground truth as MUSE cuts it: the first ``n_ids`` ids of ``gt`` tokenised with special tokens
    (so a BOS, when the tokenizer adds one, takes one of them), decoded without special tokens."""
    ids = tokenizer(gt, add_special_tokens=True)["input_ids"][:n_ids]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


def icl_prompt(shots: Sequence[Mapping[str, str]], question: str) -> str:
    context = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return f"{context}Question: {question}\nAnswer: "


def cut_answer(text: str) -> str:
    """KnowMem's post-processing: keep what comes before the first of :data:`KNOWMEM_STOPS` (a bare "Question"
    inside the answer stays). Stripping does not change ROUGE, which tokenises on non-alphanumerics."""
    for stop in KNOWMEM_STOPS:
        text = text.split(stop, 1)[0]
    return text.strip()


def min_k_score(token_logprobs: np.ndarray, k: float = MIN_K) -> float:
    """Min-k% of one text: minus the mean of its lowest ``k`` fraction of token log-probs (at least one)."""
    lp = np.sort(np.asarray(token_logprobs, dtype=float))
    n = max(1, int(len(lp) * k))
    return float(-lp[:n].mean())


def privleak(auc: float, auc_retrain: float) -> float:
    return 100.0 * (auc - auc_retrain) / auc_retrain


def evaluate(model: Any, tokenizer: Any, rows: Mapping[str, list[dict]], *, batch_size: int,
             auc_retrain: float, rank: int = 0, world_size: int = 1, device: Any = "cpu") -> dict[str, float]:
    """MUSE's four numbers. Prompts and PrivLeak's texts are used whole (up to the model's context), as MUSE
    tokenises them, whatever the run's ``data.max_length``."""
    from flat_ray.eval.runner import generate_texts, text_token_logprobs

    kw = {"batch_size": batch_size, "rank": rank, "world_size": world_size, "device": device}
    out: dict[str, float] = {}
    verb = rows["verbmem"]
    gens = generate_texts(model, tokenizer, [r["prompt"] for r in verb], max_new_tokens=VERBMEM_TOKENS, **kw)
    refs = [verbmem_reference(tokenizer, r["gt"]) for r in verb]
    out["verbmem_forget"] = 100.0 * float(np.mean([rouge_l_f1(g, t) for g, t in zip(gens, refs, strict=True)]))
    for split in ("forget", "retain"):
        qa, shots = rows[f"knowmem_{split}"], rows[f"icl_{split}"]
        prompts = [icl_prompt(shots, r["question"]) for r in qa]
        gens = generate_texts(model, tokenizer, prompts, max_new_tokens=KNOWMEM_TOKENS, **kw)
        out[f"knowmem_{split}"] = 100.0 * float(np.mean([rouge_l_f1(cut_answer(g), r["answer"])
                                                         for g, r in zip(gens, qa, strict=True)]))
    scores = {}
    for split in ("forget", "holdout"):
        # one text per forward, as MUSE scores them: a whole text may be far longer than data.max_length, and the
        # memory plan holds one of them, not eval.batch_size
        lps = text_token_logprobs(model, tokenizer, [r["text"] for r in rows[f"privleak_{split}"]],
                                  **{**kw, "batch_size": 1})
        scores[split] = [-min_k_score(lp) for lp in lps]  # higher = more likely a training member
    auc = roc_auc(scores["forget"], scores["holdout"])
    out["privleak_auc"] = auc
    out["privleak"] = privleak(auc, auc_retrain)
    return out
