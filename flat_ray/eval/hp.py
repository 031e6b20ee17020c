"""Harry-Potter-style completion test (docs/eval.md): the first ``eval.prompt_words`` words of a passage
after an instruction, a greedy continuation of ``eval.max_new_tokens`` tokens, and BLEU (sacrebleu, 0-100) and
ROUGE-L recall against the true continuation cut to the same number of tokens. On forget passages low is good;
on retain passages (utility) high is good. BLEU is computed per passage the way the released FLAT code does
(UCSC-REAL/FLAT@bf2ef07, ``evaluate.py``): sacrebleu's *corpus* BLEU of a one-sentence corpus (default ``exp``
smoothing, all four n-gram orders), then averaged over passages. Model utility beyond that is lm-eval's (``flat-ray eval --tasks``).

With ``eval.completion_file`` (FLAT's own completion rows, ``data/hp/hp_{train,test}_qa_200.jsonl``) the forget
side is FLAT's test as its ``evaluate.py`` runs it, its quirks included (docs/eval.md): ``### Question: `` tags, the
prompts padded by FLAT's batching and attending to their pads, 600 tokens in all, the first generated token
dropped, the tagged response uncut as the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flat_ray.data import load_split
from flat_ray.data.files import read_rows
from flat_ray.data.text import completion_rows
from flat_ray.errors import FlatRayError

INSTRUCTION = "Continue this passage in the same words as its original text:\n\n"
# FLAT's completion test (UCSC-REAL/FLAT@bf2ef07: evaluate.py, dataset/harrypotter.py), its OPT tags
FLAT_QUESTION, FLAT_QUESTION_END, FLAT_ANSWER = "### Question: ", "\n", "### Answer: "
FLAT_TOTAL_TOKENS = 600  # generate's max_length: the padded prompt and the continuation together
FLAT_TRUNCATE = 1024  # prompt tokens kept when tokenising
FLAT_MAP_ROWS = 1000  # `datasets.map` pads each block of this many prompts to the block's longest
FLAT_BATCH = 16  # evaluate.py's batch size; a batch across two blocks pads again to its longest


def eval_rows(benchmark: str, data_dir: str | None, limit: int | None, prompt_words: int,
              completion_file: str | None = None) -> dict[str, list[dict]]:
    def passages(split: str) -> list[dict]:
        return completion_rows(load_split(benchmark, split, data_dir), prompt_words, limit)

    # a completion file's every row: the padding of the first ``limit`` depends on all of them
    forget = first_rows(read_completion_file(completion_file), limit) if completion_file else passages("forget")
    return {"forget": forget, "retain": passages("retain")}


def read_completion_file(path: str) -> list[dict]:
    """FLAT's completion rows: ``prompt`` and ``response`` strings, every one."""
    rows = read_rows(Path(path).expanduser(), required=("prompt", "response"))
    bad = next((i for i, r in enumerate(rows, 1) if not all(isinstance(r[k], str) for k in ("prompt", "response"))),
               None)
    if bad is not None:
        raise FlatRayError(f"eval.completion_file {path}: row {bad} has a prompt or response that is not text")
    return rows


def first_rows(rows: list[dict], limit: int | None) -> list[dict]:
    """The completion file's rows, the first ``limit`` of them scored (all are kept: FLAT pads each prompt as among
    all of them)."""
    return [{**r, "scored": not limit or i < limit} for i, r in enumerate(rows)]


def flat_widths(lengths: Sequence[int], block: int = FLAT_MAP_ROWS, batch: int = FLAT_BATCH) -> list[int]:
    """The padded width of each prompt in FLAT's evaluation: its ``datasets.map`` block's longest prompt, or, for
    a batch that spans two blocks, the longer of the two."""
    longest = [max(lengths[s:s + block]) for s in range(0, len(lengths), block)]
    out: list[int] = []
    for s in range(0, len(lengths), batch):
        rows = range(s, min(s + batch, len(lengths)))
        out += [max(longest[j // block] for j in rows)] * len(rows)
    return out


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
        if items and "response" in items[0]:
            gens, refs = _flat_completions(model, tokenizer, items, batch_size=batch_size, rank=rank,
                                           world_size=world_size, device=device)
        else:
            prompts = [INSTRUCTION + r["prompt"] for r in items]
            gens = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  rank=rank, world_size=world_size, device=device)
            refs = [tokenizer.decode(tokenizer(" " + r["continuation"], add_special_tokens=False)["input_ids"]
                                     [:max_new_tokens]).strip() for r in items]
        out[f"{split}_bleu"] = float(np.mean([bleu(g, t) for g, t in zip(gens, refs, strict=True)]))
        out[f"{split}_rougeL_recall"] = float(np.mean([rouge_l_recall(g, t) for g, t in zip(gens, refs, strict=True)]))
    return out


def _flat_completions(model: Any, tokenizer: Any, items: list[dict], **shard: Any) -> tuple[list[str], list[str]]:
    """FLAT's generations and references for the scored rows of its completion file (see the module docstring)."""
    from flat_ray.eval.runner import context_length, generate_at_width

    prompts = [tokenizer(FLAT_QUESTION + r["prompt"] + FLAT_QUESTION_END, truncation=True,
                         max_length=FLAT_TRUNCATE)["input_ids"] for r in items]
    widths = flat_widths([len(p) for p in prompts])
    scored = [i for i, r in enumerate(items) if r["scored"]]
    gens = generate_at_width(model, tokenizer, [prompts[i] for i in scored], [widths[i] for i in scored],
                             pad_id=tokenizer.eos_token_id,  # FLAT's pad token is the EOS token
                             total_length=min(FLAT_TOTAL_TOKENS, context_length(model)), skip=1, **shard)
    return gens, [FLAT_ANSWER + items[i]["response"] for i in scored]
