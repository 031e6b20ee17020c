"""The unlearning dataset: each item holds named splits (``forget``, ``template``) ready for the collator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from flat_ray.data.formatting import encode_qa
from flat_ray.data.templates import TemplateSource
from flat_ray.models import PromptProfile


class UnlearnDataset(Dataset):
    """Forget rows paired with template answers.

    Item ``i`` is ``{"forget": enc(q_i, y_f,i), "template": enc(q_i, y_e,i), "index": i}``: the template is its
    own sequence (prompt + y_e; a standalone template, y_e alone), never the forget ``input_ids`` with other
    labels. Template assignment is fixed per epoch (:meth:`set_epoch`) and reproducible from the source's seed. With ``templates=None`` (methods that
    need no template, such as fine-tuning) items hold only ``forget``: the rows of the configured split. With
    ``retain_rows`` (methods with a retain term) each item also holds ``retain``, a retain example drawn per epoch from a
    generator seeded by ``(seed, epoch)``.
    """

    def __init__(self, rows: Sequence[dict], tokenizer: Any, profile: PromptProfile, templates: TemplateSource | None,
                 *, max_length: int, retain_rows: Sequence[dict] | None = None, seed: int = 0):
        self.rows = list(rows)
        self.tokenizer = tokenizer
        self.profile = profile
        self.templates = templates
        self.max_length = max_length
        self.forget = [encode_qa(tokenizer, profile, r["question"], r["answer"], max_length) for r in self.rows]
        self.retain = [encode_qa(tokenizer, profile, r["question"], r["answer"], max_length) for r in retain_rows or []]
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.assignment = self.templates.assign(len(self.rows), epoch) if self.templates else []
        # each forget example is paired with a retain example drawn per epoch, seeded like the templates
        rng = np.random.default_rng([self.seed, epoch, 1])
        self.retain_pick = rng.integers(0, len(self.retain), len(self.rows)).tolist() if self.retain else []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"forget": self.forget[i], "index": i}
        if self.templates:
            question = "" if self.templates.standalone else self.rows[i]["question"]
            item["template"] = encode_qa(self.tokenizer, self.profile, question, self.assignment[i], self.max_length)
        if self.retain:
            item["retain"] = self.retain[self.retain_pick[i]]
        return item
