"""Turning a (question, answer) pair into token ids and labels for a causal LM.

The full text ``prompt + answer`` is tokenised once and EOS is appended. Labels are -100 on the profile's context
(the prompt, or the prompt before its answer tag where the tag counts as the answer's, as for TOFU's Phi): every
token that lies wholly inside the context's characters (found with the fast tokenizer's offsets). A token that
straddles the boundary, such as `` Kalo`` after ``A:``, belongs to the answer. TOFU instead masks the first
``len(tokenize(context))`` tokens, which for a context ending in a space also masks the answer's first word; the
offsets avoid that, and the masked prefix is exactly the prompt a generator should be given.

Nothing is padded here: the collator pads each batch to its own longest sequence (to ``data.max_length``
under FLAT's ``repo`` normalization). Sequences longer than ``max_length`` are cut at the end (EOS included),
which only ever shortens the answer.
"""

from __future__ import annotations

from typing import Any

from flat_ray.errors import FlatRayError
from flat_ray.losses.sequence import IGNORE_INDEX
from flat_ray.models import PromptProfile


def encode_qa(tokenizer: Any, profile: PromptProfile, question: str, answer: str, max_length: int) -> dict[str, list[int]]:
    """Return ``{"input_ids", "attention_mask", "labels"}`` lists for ``profile.prompt(question) + answer``."""
    prompt = profile.prompt(question, tokenizer)
    # A chat template already writes BOS and the turn markers; otherwise the tokenizer adds its specials.
    add_special = not profile.chat_template
    enc = tokenizer(prompt + answer, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    boundary = len(profile.context(question, tokenizer))
    # special tokens carry (0, 0) offsets and so count as prompt
    prompt_len = next((i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > boundary), len(ids))
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    ids = ids[:max_length]
    if prompt_len >= len(ids):
        raise FlatRayError(
            f"the prompt of question {question[:60]!r} has {prompt_len} tokens, leaving no answer tokens within "
            f"data.max_length={max_length}; raise data.max_length"
        )
    labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
