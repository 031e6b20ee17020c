"""Running a model over the TOFU evaluation splits: batched teacher-forced scoring and batched greedy generation.

All candidate answers of a shard (answer, paraphrase, every perturbed answer) are scored in one sorted, batched
pass; generation is batched with left padding. Under several ranks every rank takes an equal shard, runs the
same number of forward calls (ZeRO-3 needs every rank in each one) and the per-question values are gathered, so
the metrics are identical to a single-process run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flat_ray.data import BENCHMARKS, Collator, encode_qa, load_split
from flat_ray.distributed import all_reduce, multi_process, partitioned
from flat_ray.errors import FlatRayError
from flat_ray.eval.tofu import SplitValues
from flat_ray.losses import IGNORE_INDEX, mean_token_nll, token_logprobs
from flat_ray.models import PromptProfile

_SCORER = None

# evaluation split -> the benchmark split holding it, TOFU's names; "{forget}" is the forget split
EVAL_SPLITS = {
    "forget": "{forget}_perturbed",
    "retain": "retain_perturbed",
    "real_authors": "real_authors_perturbed",
    "world_facts": "world_facts_perturbed",
}


HOLDOUT = "holdout"  # the held-out questions of the forget split's membership-inference metrics


def eval_split_names(benchmark: str, split: str, holdout: bool = False) -> dict[str, str]:
    """Benchmark split of each evaluation split. When ``split`` is not a forget split, the forget evaluation uses
    the forget split it is the complement of (``retain95`` -> ``forget05``: how a retain model is evaluated as
    the reference of that split), else (``full``) the benchmark's default forget split. ``holdout`` adds the
    forget split's held-out questions (where the benchmark has them)."""
    bench = BENCHMARKS[benchmark]
    complement = next((f for f, r in bench.retain_of.items() if split == r or split.startswith(f"{r}_")), None)
    forget = split if split.startswith("forget") else complement or bench.default_split
    names = {name: pattern.format(forget=forget) for name, pattern in EVAL_SPLITS.items()}
    if holdout and forget in bench.holdout_of:
        names[HOLDOUT] = bench.holdout_of[forget]
    return names


def eval_split_rows(benchmark: str, split: str, data_dir: str | None, max_examples: int | None,
                    holdout: bool | None = False) -> dict[str, list[dict]]:
    """The rows of every evaluation split (the first ``max_examples`` of each). ``holdout`` (``eval.mia``): True
    adds the held-out questions, None adds them where the data has them, False leaves them out."""
    out = {}
    for name, source in eval_split_names(benchmark, split, holdout is not False).items():
        try:
            rows = load_split(benchmark, source, data_dir)
        except FlatRayError:
            if name == HOLDOUT and holdout is None:  # a local TOFU copy without its holdout files
                continue
            raise
        out[name] = rows[:max_examples] if max_examples else rows
    return out


def rouge_scorer_l():
    """One ROUGE-L scorer with the Porter stemmer (``rouge_score``), as TOFU uses it (MUSE does not stem: see
    :func:`flat_ray.eval.muse.rouge_l_f1`)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def rouge_l_recall(prediction: str, target: str) -> float:
    """ROUGE-L recall, as TOFU computes it."""
    return rouge_scorer_l().score(target, prediction)["rougeL"].recall


def shard(n: int, rank: int, world_size: int) -> tuple[list[int], list[bool]]:
    """Indices of ``rank``'s shard of ``n`` items, padded with repeats so every rank has the same count, and
    which of them are real (not padding)."""
    per_rank = math.ceil(n / world_size)
    idx = [rank + world_size * i for i in range(per_rank)]
    return [min(i, n - 1) for i in idx], [i < n for i in idx]


def _same_count(n: int) -> int:
    """The largest ``n`` over all ranks, so that every rank runs the same number of forward passes."""
    return int(all_reduce(torch.tensor([n]), op="max").item())


@torch.no_grad()
def answer_losses(model: Any, tokenizer: Any, profile: PromptProfile, pairs: Sequence[tuple[str, str]], *,
                  max_length: int, batch_size: int, device: Any = "cpu") -> np.ndarray:
    """Mean NLL per answer token of each (question, answer) pair, batched in order of length."""
    encoded = [encode_qa(tokenizer, profile, q, a, max_length) for q, a in pairs]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    collate = Collator(tokenizer.pad_token_id)
    losses = np.zeros(len(encoded))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for b in range(_same_count(len(batches))):
        if b < len(batches):
            chunk: list[int] | None = batches[b]
            items = [encoded[i] for i in chunk]
        else:  # this rank is done but others are not: join their forward passes with a throwaway batch
            chunk = None
            items = [encoded[order[0]]] if encoded else [encode_qa(tokenizer, profile, "?", "?", max_length)]
        batch = collate(items)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        if chunk is not None:
            losses[chunk] = mean_token_nll(logits, batch["labels"].to(device)).double().cpu().numpy()
    return losses


@torch.no_grad()
def question_stats(model: Any, tokenizer: Any, profile: PromptProfile, rows: Sequence[Mapping[str, Any]], *,
                   max_length: int, batch_size: int, rank: int = 0, world_size: int = 1, device: Any = "cpu",
                   gradnorm: bool = False) -> dict[str, np.ndarray]:
    """The membership and memorization statistics of each (question, answer) row (:mod:`flat_ray.eval.mia`),
    sharded over the ranks and gathered, in row order; with ``gradnorm`` also GradNorm's (one backward pass per
    row, on a model that holds its full weights: none where ZeRO-3 evaluates from the shards)."""
    from flat_ray.eval.mia import GRADNORM, STATS, answer_stats, grad_norm

    idx, keep = shard(len(rows), rank, world_size)
    encoded = [encode_qa(tokenizer, profile, rows[i]["question"], rows[i]["answer"], max_length) for i in idx]
    collate = Collator(tokenizer.pad_token_id)
    values: dict[str, list] = {name: [] for name in STATS}
    was_training = model.training
    model.eval()
    try:
        n_batches = math.ceil(len(encoded) / batch_size)
        for b in range(_same_count(n_batches)):
            batch = collate(encoded[b * batch_size:(b + 1) * batch_size] or encoded[-1:])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            if b < n_batches:
                labels = batch["labels"]
                texts = [tokenizer.decode(ids[lab != IGNORE_INDEX].tolist(), skip_special_tokens=True)
                         for ids, lab in zip(batch["input_ids"], labels, strict=True)]
                for name, v in answer_stats(logits, labels.to(logits.device), texts).items():
                    values[name] += v
        if gradnorm and not partitioned(model):
            values[GRADNORM] = [grad_norm(model, *(t.to(device) for t in _one(collate, item))) for item in encoded]
    finally:
        model.train(was_training)
    return {name: np.asarray(v, dtype=float) for name, v in _gather(values, keep, idx).items()}


def _one(collate: Collator, item: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = collate([item])
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


@torch.no_grad()
def generate(model: Any, tokenizer: Any, profile: PromptProfile, pairs: Sequence[tuple[str, str]], *,
             max_length: int, max_new_tokens: int, batch_size: int, device: Any = "cpu") -> tuple[list[str], list[str]]:
    """Greedy continuations of each (question, answer) pair's prompt, batched with left padding.

    The prompt is the masked prefix of the tokenised question + answer: exactly the tokens the model was trained
    to continue (a prompt tokenised alone can end in a lone space token that training never showed it).
    Returns (prompts, texts)."""
    prompts = []
    for q, a in pairs:
        enc = encode_qa(tokenizer, profile, q, a, max_length)
        n = enc["labels"].count(-100)
        prompts.append({"input_ids": enc["input_ids"][:n], "attention_mask": [1] * n})
    texts = _generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          device=device)
    prompt_texts = [tokenizer.decode(p["input_ids"], skip_special_tokens=True) for p in prompts]
    return prompt_texts, [t.strip() for t in texts]


def _generate_ids(model: Any, tokenizer: Any, prompts: list[dict], *, max_new_tokens: int, batch_size: int,
                  device: Any) -> list[str]:
    """Greedy continuations of tokenised prompts, left-padded batches; every rank runs the same number of
    ``generate`` calls (ZeRO-3 needs each rank in each forward)."""
    collate = Collator(tokenizer.pad_token_id, padding_side="left")
    texts: list[str] = []
    n_batches = math.ceil(len(prompts) / batch_size)
    for b in range(_same_count(n_batches)):
        chunk = prompts[b * batch_size:(b + 1) * batch_size] or prompts[-1:]
        batch = collate(chunk)
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             synced_gpus=multi_process())
        if b < n_batches:
            texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def _encode_text(tokenizer: Any, text: str, max_length: int, keep: str) -> dict[str, list[int]]:
    ids = tokenizer(text)["input_ids"]
    ids = ids[-max_length:] if keep == "end" else ids[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


@torch.no_grad()
def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int,
                   max_length: int | None = None, rank: int = 0, world_size: int = 1, device: Any = "cpu") -> list[str]:
    """Greedy continuations of raw text prompts, sharded over the ranks and gathered: every rank returns all of
    them, in order, as decoded (not stripped). A prompt keeps its last ``max_length`` tokens (default: what the
    model's context leaves after the new tokens)."""
    if max_length is None:
        max_length = max(1, context_length(model) - max_new_tokens)
    idx, keep = shard(len(prompts), rank, world_size)
    items = [_encode_text(tokenizer, prompts[i], max_length, "end") for i in idx]
    was_training = model.training
    model.eval()
    try:
        texts = _generate_ids(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              device=device) if items else []
    finally:
        model.train(was_training)
    return _gather({"text": texts}, keep, idx)["text"]  # as decoded: MUSE cuts KnowMem's answer before stripping


@torch.no_grad()
def generate_at_width(model: Any, tokenizer: Any, prompts: Sequence[list[int]], widths: Sequence[int], *,
                      pad_id: int, total_length: int, skip: int, batch_size: int, rank: int = 0, world_size: int = 1,
                      device: Any = "cpu") -> list[str]:
    """Greedy continuations of tokenised prompts as code that pads by hand generates them: each prompt left-padded
    with ``pad_id`` to its own ``widths`` entry and attending to those pads (an all-ones mask, what ``generate``
    assumes when given none and the pad token is the EOS token), ``total_length`` tokens in all (padding
    included), decoded from ``skip`` tokens past the padded prompt. Batches hold prompts of one width; sharded over
    the ranks and gathered, in order."""
    idx, keep = shard(len(prompts), rank, world_size)
    batches = []
    for width in sorted({widths[i] for i in idx}):
        same = [i for i in idx if widths[i] == width]
        batches += [(width, same[b:b + batch_size]) for b in range(0, len(same), batch_size)]
    texts: dict[int, str] = {}
    was_training = model.training
    model.eval()
    try:
        for k in range(_same_count(len(batches))):
            width, chunk = batches[min(k, len(batches) - 1)]
            ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + list(prompts[i]) for i in chunk],
                               device=device)
            # what max_length=total_length leaves after the padded prompt; a prompt that fills it gets no text
            # (transformers refuses such a max_length; every rank still runs the call)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max(1, total_length - width), do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, synced_gpus=multi_process())
            if k < len(batches):
                decoded = tokenizer.batch_decode(out[:, width + skip:], skip_special_tokens=True)
                if width >= total_length:
                    decoded = [""] * len(chunk)
                texts.update(zip(chunk, decoded, strict=True))
    finally:
        model.train(was_training)
    return _gather({"text": [texts[i] for i in idx]}, keep, idx)["text"]


def context_length(model: Any) -> int:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None) or 4096


@torch.no_grad()
def text_token_logprobs(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int,
                        max_length: int | None = None, rank: int = 0, world_size: int = 1,
                        device: Any = "cpu") -> list[np.ndarray]:
    """Log-probability of every token of each text given the tokens before it (the first ``max_length``
    tokens; default: as many as the model's context holds), sharded over the ranks and gathered."""
    max_length = max_length or context_length(model)
    idx, keep = shard(len(texts), rank, world_size)
    items = [_encode_text(tokenizer, texts[i], max_length, "start") for i in idx]
    collate = Collator(tokenizer.pad_token_id)
    out: list[list[float]] = []
    was_training = model.training
    model.eval()
    try:
        n_batches = math.ceil(len(items) / batch_size)
        for b in range(_same_count(n_batches)):
            chunk = items[b * batch_size:(b + 1) * batch_size] or items[-1:]
            batch = collate(chunk)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            # fp32 log-probs of the gold tokens, chunk by chunk: no fp32 copy of the (B, T, V) logits
            lp, valid = token_logprobs(model(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                                       ids.masked_fill(mask == 0, IGNORE_INDEX))
            if b < n_batches:
                out += [row[m].cpu().tolist() for row, m in zip(lp, valid, strict=True)]
    finally:
        model.train(was_training)
    return [np.asarray(v) for v in _gather({"lp": out}, keep, idx)["lp"]]


def _gather(values: dict[str, list], keep: list[bool], idx: list[int]) -> dict[str, list]:
    """Per-question lists from every rank, put back in question order (padding repeats dropped)."""
    mine = [(i, {k: v[j] for k, v in values.items()}) for j, (i, real) in enumerate(zip(idx, keep, strict=True)) if real]
    if multi_process():
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        mine = [item for part in parts for item in part]
    mine.sort(key=lambda item: item[0])
    return {k: [row[k] for _, row in mine] for k in values}


def evaluate_split(model: Any, tokenizer: Any, profile: PromptProfile, rows: Sequence[Mapping[str, Any]], *,
                   max_length: int, batch_size: int, max_new_tokens: int, rank: int = 0, world_size: int = 1,
                   device: Any = "cpu") -> SplitValues:
    """Per-question values of one split; every rank returns the full, gathered result."""
    idx, keep = shard(len(rows), rank, world_size)
    mine = [rows[i] for i in idx]
    pairs: list[tuple[str, str]] = []
    spans = []
    for r in mine:
        perturbed = list(r.get("perturbed_answer") or [])
        candidates = [r["answer"], r.get("paraphrased_answer") or r["answer"], *perturbed]
        spans.append((len(pairs), len(perturbed)))
        pairs += [(r["question"], a) for a in candidates]
    was_training = model.training
    model.eval()
    try:
        losses = answer_losses(model, tokenizer, profile, pairs, max_length=max_length, batch_size=batch_size,
                               device=device)
        prompts, texts = generate(model, tokenizer, profile, [(r["question"], r["answer"]) for r in mine],
                                  max_length=max_length,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    finally:
        model.train(was_training)
    values: dict[str, list] = {"gt": [], "para": [], "pert": [], "rouge": [], "text": []}
    for r, (start, k), prompt, text in zip(mine, spans, prompts, texts, strict=True):
        values["gt"].append(losses[start])
        values["para"].append(losses[start + 1])
        values["pert"].append(list(losses[start + 2:start + 2 + k]))
        values["rouge"].append(rouge_l_recall(text, r["answer"]))
        values["text"].append([prompt, text, r["answer"]])
    full = _gather(values, keep, idx)
    width = max((len(p) for p in full["pert"]), default=0)
    pert = np.array([p + [np.nan] * (width - len(p)) for p in full["pert"]], dtype=float).reshape(len(full["pert"]), width)
    return SplitValues(np.array(full["gt"]), np.array(full["para"]), pert, np.array(full["rouge"]), full["text"])


def evaluate_tofu(model: Any, tokenizer: Any, profile: PromptProfile, split_rows: Mapping[str, Sequence[dict]], *,
                  max_length: int, batch_size: int, max_new_tokens: int, rank: int = 0, world_size: int = 1,
                  device: Any = "cpu", progress: Callable[[str, int, int], None] | None = None,
                  gradnorm: bool = False) -> dict[str, SplitValues]:
    """Every split's values; ``progress(split, done, total)`` is called before the first and after each split. With
    a ``holdout`` split among ``split_rows``, the forget split also gets the membership and memorization statistics
    of its questions and of the held-out ones (``SplitValues.stats`` and ``holdout_stats``; GradNorm's too with
    ``gradnorm``)."""
    split_rows = dict(split_rows)
    holdout = split_rows.pop(HOLDOUT, None)
    out: dict[str, SplitValues] = {}
    kw = {"max_length": max_length, "batch_size": batch_size, "rank": rank, "world_size": world_size,
          "device": device}
    for done, (name, rows) in enumerate(split_rows.items()):
        if progress:
            progress(name, done, len(split_rows))
        out[name] = evaluate_split(model, tokenizer, profile, rows, max_new_tokens=max_new_tokens, **kw)
        if name == "forget" and holdout:
            out[name].stats = question_stats(model, tokenizer, profile, rows, gradnorm=gradnorm, **kw)
            out[name].holdout_stats = question_stats(model, tokenizer, profile, holdout, gradnorm=gradnorm, **kw)
    if progress:
        progress("done", len(split_rows), len(split_rows))
    return out
