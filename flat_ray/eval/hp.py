"""Harry-Potter-style completion test (docs/eval.md): the first ``eval.prompt_words`` words of a passage
after an instruction, a greedy continuation of ``eval.max_new_tokens`` tokens, and BLEU (sacrebleu, 0-100) and
ROUGE-L recall against the true continuation cut to the same number of tokens. On forget passages low is good;
on retain passages (utility) high is good. BLEU is computed per passage the way the released FLAT code does
(UCSC-REAL/FLAT@bf2ef07, ``evaluate.py``): sacrebleu's *corpus* BLEU of a one-sentence corpus (default ``exp``
smoothing, all four n-gram orders), then averaged over passages. Model utility beyond that is lm-eval's (``flat-ray eval --tasks``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flat_ray.data import load_split
from flat_ray.data.text import completion_rows

INSTRUCTION = "Continue this passage in the same words as its original text:\n\n"


def eval_rows(benchmark: str, data_dir: str | None, limit: int | None, prompt_words: int) -> dict[str, list[dict]]:
    return {split: completion_rows(load_split(benchmark, split, data_dir), prompt_words, limit)
            for split in ("forget", "retain")}


def bleu(prediction: str, target: str) -> float:
    """BLEU (0-100) of one completion. Corpus BLEU over one pair, not ``sentence_bleu``: the latter uses the
    "effective order" (it drops n-gram orders longer than the hypothesis), so a completion under 4 tokens scores
    above 0 there but 0 here, as in FLAT's numbers."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu([prediction], [[target]]).score)


def evaluate(model: Any, tokenizer: Any, rows: Mapping[str, list[dict]], *, max_new_tokens: int, batch_size: int,
             rank: int = 0, world_size: int = 1, device: Any = "cpu") -> dict[str, float]:
    from flat_ray.eval.runner import generate_texts, rouge_l_recall

    out: dict[str, float] = {}
    for split, items in rows.items():
        prompts = [INSTRUCTION + r["prompt"] for r in items]
        gens = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              rank=rank, world_size=world_size, device=device)
        refs = [tokenizer.decode(tokenizer(" " + r["continuation"], add_special_tokens=False)["input_ids"]
                                 [:max_new_tokens]).strip() for r in items]
        out[f"{split}_bleu"] = float(np.mean([bleu(g, t) for g, t in zip(gens, refs, strict=True)]))
        out[f"{split}_rougeL_recall"] = float(np.mean([rouge_l_recall(g, t) for g, t in zip(gens, refs, strict=True)]))
    return out
