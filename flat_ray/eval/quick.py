"""Per-epoch evaluation on a bounded subset: mean answer probability and ROUGE-L recall of greedy generations.

Every rank evaluates an equal-sized shard (the last shard is padded with weight-0 repeats so that all ranks
run the same number of batches, which ZeRO-3 needs); sums are all-reduced and then divided, so one worker and
several give the same numbers. The full TOFU metric suite arrives with the evaluation issue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from flat_ray.data import Collator, encode_qa
from flat_ray.losses import mean_token_nll
from flat_ray.models import PromptProfile

_SCORER = None


def rouge_l_recall(prediction: str, target: str) -> float:
    """ROUGE-L recall with the Porter stemmer, as TOFU computes it (``rouge_score``)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER.score(target, prediction)["rougeL"].recall


def shard(n: int, rank: int, world_size: int) -> tuple[list[int], list[float]]:
    """Indices of ``rank``'s shard of ``n`` items and their weights (0 for padding repeats)."""
    per_rank = math.ceil(n / world_size)
    idx = [rank + world_size * i for i in range(per_rank)]
    return [i if i < n else n - 1 for i in idx], [1.0 if i < n else 0.0 for i in idx]


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # a sync point: called once per split, not per batch
    return t


@torch.no_grad()
def evaluate_qa(model: Any, tokenizer: Any, profile: PromptProfile, rows: Sequence[dict], *, max_length: int,
                batch_size: int, max_new_tokens: int, rank: int = 0, world_size: int = 1, device: Any = "cpu"
                ) -> dict[str, float]:
    """``{"prob": mean P(answer), "rougeL_recall": mean recall, "n": count}`` over ``rows``."""
    idx, weights = shard(len(rows), rank, world_size)
    right = Collator(tokenizer.pad_token_id)
    left = Collator(tokenizer.pad_token_id, padding_side="left")
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # prob, rouge, count
    try:
        for start in range(0, len(idx), batch_size):
            chunk = [rows[i] for i in idx[start:start + batch_size]]
            w = torch.tensor(weights[start:start + batch_size], dtype=torch.float64)
            enc = [encode_qa(tokenizer, profile, r["question"], r["answer"], max_length) for r in chunk]
            batch = right(enc)
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            prob = torch.exp(-mean_token_nll(logits, batch["labels"].to(device))).double().cpu()
            # the generation prompt is exactly the masked prefix the model was trained to continue
            prompts = [{"input_ids": e["input_ids"][: e["labels"].count(-100)],
                        "attention_mask": [1] * e["labels"].count(-100)} for e in enc]
            gen_in = left(prompts)
            out = model.generate(input_ids=gen_in["input_ids"].to(device), attention_mask=gen_in["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 synced_gpus=world_size > 1)
            texts = tokenizer.batch_decode(out[:, gen_in["input_ids"].shape[1]:], skip_special_tokens=True)
            rouge = torch.tensor([rouge_l_recall(t, r["answer"]) for t, r in zip(texts, chunk, strict=True)], dtype=torch.float64)
            sums += torch.stack([(prob * w).sum(), (rouge * w).sum(), w.sum()])
    finally:
        model.train(was_training)
    sums = _all_reduce_sum(sums)
    count = max(sums[2].item(), 1.0)
    return {"prob": sums[0].item() / count, "rougeL_recall": sums[1].item() / count, "n": int(sums[2].item())}
