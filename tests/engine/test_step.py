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


def test_repo_normalization_trains_on_batches_padded_to_max_length_as_the_released_code(tiny_model_dir):
    """The released FLAT code pads every sequence to max_length and averages -p over all B * (max_length - 1)
    shifted positions of a split (0 where the label is -100); `repo` gets that denominator from the training
    batches' padding. `paper` batches pad only to their longest sequence."""
    from flat_ray.config import load_config
    from flat_ray.pipeline import prepare

    base = [f"model.name_or_path={tiny_model_dir}", "data.max_length=96", "method.divergence=tv"]
    prep = prepare(load_config(None, [*base, "method.normalize=repo"]))
    batch = prep.collator([prep.dataset[i] for i in range(2)])
    assert batch["forget"]["input_ids"].shape == batch["template"]["input_ids"].shape == (2, 96)
    model = prep.model.eval()
    released = {}
    with torch.no_grad():
        for key in ("forget", "template"):
            ids, labels = batch[key]["input_ids"], batch[key]["labels"]
            probs = torch.softmax(model(input_ids=ids, attention_mask=batch[key]["attention_mask"]).logits[:, :-1], -1)
            shifted = labels[:, 1:]
            p = probs.gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1) * (shifted != -100)
            released[key] = float(p.sum() / (2 * 95))
        out = method_loss(model, batch, METHODS["flat"], {"divergence": "tv", "normalize": "repo"}).metrics
    assert abs(out["score_forget"] - released["forget"]) < 1e-6
    assert abs(out["score_template"] - released["template"]) < 1e-6
    assert abs(out["loss"] - (-0.5 * torch.tanh(torch.tensor(released["template"]))
                              + 0.5 * torch.tanh(torch.tensor(released["forget"]))).item()) < 1e-6
    paper = prepare(load_config(None, [*base, "method.normalize=paper"]), load_model=False)
    assert paper.collator([paper.dataset[i] for i in range(2)])["forget"]["input_ids"].shape[1] < 96
