"""One collator for every batch: it recurses over nested dicts of named splits and pads each to its own max.

>>> c = Collator(pad_token_id=0)
>>> batch = c([{"forget": {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]}, "index": 0},
...            {"forget": {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": [-100, 9]}, "index": 1}])
>>> batch["forget"]["input_ids"].tolist(), batch["forget"]["labels"].tolist(), batch["index"].tolist()
([[5, 6, 7], [8, 9, 0]], [[-100, 6, 7], [-100, 9, -100]], [0, 1])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flat_ray.losses.sequence import IGNORE_INDEX


class Collator:
    """Pads lists of token ids into named tensors.

    ``labels`` pad with -100, ``attention_mask`` with 0, ``input_ids`` (and any other id list) with the pad
    token id. Scalars become 1-d tensors, strings stay lists. ``padding_side="left"`` is for generation.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_values = {"labels": IGNORE_INDEX, "attention_mask": 0}
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.multiple = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self._collate(features)

    def _collate(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in features[0]:
            values = [f[key] for f in features]
            first = values[0]
            if isinstance(first, Mapping):
                out[key] = self._collate(values)
            elif isinstance(first, (list, tuple, torch.Tensor)):
                out[key] = self._pad([list(v) if not isinstance(v, torch.Tensor) else v.tolist() for v in values],
                                     self.pad_values.get(key, self.pad_token_id))
            elif isinstance(first, (int, float, bool)):
                out[key] = torch.tensor(values)
            else:
                out[key] = values
        return out

    def _pad(self, seqs: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        padded = torch.full((len(seqs), width), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            if not s:
                continue
            if self.padding_side == "right":
                padded[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            else:
                padded[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        return padded
