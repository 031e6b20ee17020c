"""One optimisation step of every registered unlearning method, in process on the tiny model (plain torch SGD, no
Ray, no DeepSpeed): the forget answer becomes less likely and, for methods with a template term, the template
answer more likely. The start model is the tiny random model first fitted to the batch's forget and retain answers
(an "original" model that knows what it is asked to forget) and to refusals of two other questions (as a chat
model has seen refusals: FLAT's probability-based template term has no pull on a template whose tokens the model
gives ~1e-5 each); every method runs with its config defaults, so the baselines carry their retain term."""

from __future__ import annotations

import copy

import pytest
import torch

from flat_ray.config import MethodConfig
from flat_ray.engine.step import method_loss
from flat_ray.losses import DIVERGENCES, METHODS

LR = 0.05
FIT_STEPS = 30
CASES = [("flat", {"divergence": key}) for key in DIVERGENCES] + [
    (name, {}) for name in METHODS if name not in ("flat", "sft")]


@pytest.fixture(scope="module")
def batch(tiny):
    """Two demo forget questions with their answers, template answers and two retain examples (other question
    types than the forget ones: a retain answer phrased like the forget answer pulls it back up, which on this tiny
    model outweighs SimNPO's forget term in a small first step)."""
    from flat_ray.data import BUILTIN_TEMPLATES, Collator, TemplateSource, UnlearnDataset, load_split
    from flat_ray.models import PROFILES

    _, tok = tiny
    ds = UnlearnDataset(load_split("demo", "forget10")[:2], tok, PROFILES["generic"],
                        TemplateSource(pool=BUILTIN_TEMPLATES, seed=0), max_length=64,
                        retain_rows=load_split("demo", "retain90")[4:6], seed=0)
    return Collator(tok.pad_token_id)([ds[i] for i in range(2)])


@pytest.fixture(scope="module")
def refusals(tiny):
    """Two retain questions answered with template answers (not the batch's questions)."""
    from flat_ray.data import BUILTIN_TEMPLATES, Collator, TemplateSource, UnlearnDataset, load_split
    from flat_ray.models import PROFILES

    _, tok = tiny
    ds = UnlearnDataset(load_split("demo", "retain90")[10:12], tok, PROFILES["generic"],
                        TemplateSource(pool=BUILTIN_TEMPLATES, seed=1), max_length=64, seed=1)
    return Collator(tok.pad_token_id)([ds[i] for i in range(2)])["template"]


@pytest.fixture(scope="module")
def original(tiny, batch, refusals):
    """The tiny model after a few Adam steps of next-token fitting on the forget and retain sequences, and on
    refusals of other questions."""
    from flat_ray.losses.baselines import cross_entropy

    model = copy.deepcopy(tiny[0]).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(FIT_STEPS):
        for part in (batch["forget"], batch["retain"], refusals):
            logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
            cross_entropy(logits, part["labels"]).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def answer_logprob(model, part) -> float:
    """log P(answer | prompt) summed over the batch's rows, from log_softmax at the gold next tokens."""
    with torch.no_grad():
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    labels = part["labels"][:, 1:]
    gold = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float((gold * (labels != -100)).sum())


@pytest.mark.parametrize(("name", "knobs"), CASES, ids=[f"{n}-{k.get('divergence', '')}".rstrip("-") for n, k in CASES])
def test_one_step_lowers_forget_and_raises_template(name, knobs, original, batch):
    base = original
    method = METHODS[name]
    model = copy.deepcopy(base).train()
    reference = copy.deepcopy(base).eval() if method.needs_reference else None
    knobs = {**vars(MethodConfig(name=name)), **knobs}
    before = {k: answer_logprob(model, batch[k]) for k in ("forget", "template")}
    method_loss(model, batch, method, knobs, reference).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as training clips (optim.max_grad_norm)
    torch.optim.SGD(model.parameters(), lr=LR).step()
    after = {k: answer_logprob(model, batch[k]) for k in ("forget", "template")}
    assert after["forget"] < before["forget"], (before, after)
    if "template" in method.batch_keys:
        assert after["template"] > before["template"], (before, after)


def test_every_unlearning_method_is_covered():
    assert {n for n, _ in CASES} == set(METHODS) - {"sft"}
    assert {k["divergence"] for n, k in CASES if n == "flat"} == set(DIVERGENCES)
