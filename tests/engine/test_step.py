"""The concatenated forward equals separate forwards; the method loss trains the tiny model the right way."""

from __future__ import annotations

import copy

import torch
from torch.testing import assert_close

from flat_ray.data import BUILTIN_TEMPLATES, Collator, TemplateSource, UnlearnDataset, load_split
from flat_ray.engine.step import concat_forward, method_loss
from flat_ray.losses import METHODS, flat_loss
from flat_ray.models import PROFILES


def _batch(tok, n=4):
    rows = load_split("demo", "forget10")[:n]
    ds = UnlearnDataset(rows, tok, PROFILES["generic"], TemplateSource(pool=BUILTIN_TEMPLATES, seed=0), max_length=128)
    return Collator(tok.pad_token_id)([ds[i] for i in range(n)])


def test_concat_forward_matches_separate_forwards(tiny):
    model, tok = tiny
    model.eval()
    batch = _batch(tok)
    assert batch["forget"]["input_ids"].shape[1] != batch["template"]["input_ids"].shape[1]
    with torch.no_grad():
        joint = concat_forward(model, batch, ("forget", "template"))
        for key in ("forget", "template"):
            alone = model(input_ids=batch[key]["input_ids"], attention_mask=batch[key]["attention_mask"]).logits
            logits, labels = joint[key]
            assert logits.shape == alone.shape and labels is batch[key]["labels"]
            valid = batch[key]["attention_mask"].bool()
            assert_close(logits[valid], alone[valid], atol=1e-4, rtol=1e-4)
        for norm in ("paper", "repo"):
            sep = flat_loss(*[t for k in ("template", "forget") for t in (
                model(input_ids=batch[k]["input_ids"], attention_mask=batch[k]["attention_mask"]).logits,
                batch[k]["labels"])], normalize=norm)
            got = flat_loss(*joint["template"], *joint["forget"], normalize=norm)
            assert_close(got.loss, sep.loss, atol=1e-5, rtol=1e-4)


def test_a_few_flat_steps_change_parameters_and_move_scores_the_right_way(tiny):
    model, tok = tiny
    model = copy.deepcopy(model).train()
    batch = _batch(tok)
    method = METHODS["flat"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    first = method_loss(model, batch, method, {"divergence": "tv", "normalize": "paper"}).metrics
    for _ in range(10):
        out = method_loss(model, batch, method, {"divergence": "tv", "normalize": "paper"})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = method_loss(model, batch, method, {"divergence": "tv", "normalize": "paper"}).metrics
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    assert last["score_template"] > first["score_template"]
    assert last["score_forget"] < first["score_forget"]
