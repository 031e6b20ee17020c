"""Baseline losses: hand-derived values (forget-only and with open-unlearning's retain term), NPO from two real
models' log-probs, DPO's reference term, the retain batch switched off at retain_weight=0, config checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from flat_ray.config import load_config
from flat_ray.errors import FlatRayError
from flat_ray.losses import METHODS, sequence_logprob
from flat_ray.losses.baselines import dpo, grad_ascent, grad_diff, idk, npo, simnpo
from tests.losses.test_flat import seq_with_probs


def logsig(x):
    return -math.log1p(math.exp(-x))


def test_hand_values():
    f = seq_with_probs([[0.5]])          # log p_f = log 0.5
    r = seq_with_probs([[0.8]])
    t = seq_with_probs([[0.2, 0.4]])     # CE over 2 tokens = -(log .2 + log .4) / 2
    assert_close(grad_ascent({"forget": f}).loss, torch.tensor(math.log(0.5)))
    assert_close(grad_diff({"forget": f, "retain": r}, retain_weight=2.0).loss,
                 torch.tensor(math.log(0.5) - 2 * math.log(0.8)))
    assert_close(idk({"template": t, "retain": r}, retain_weight=1.0).loss,
                 torch.tensor(-(math.log(0.2) + math.log(0.4)) / 2 - math.log(0.8)))
    beta, ref = 0.1, math.log(0.9)
    expected = -(2 / beta) * logsig(beta * (ref - math.log(0.5)))
    assert_close(npo({"forget": f}, beta=beta, ref_logp={"forget": torch.tensor([ref])}, retain_weight=0.0).loss,
                 torch.tensor(expected))
    ref_e, ref_f = math.log(0.1), math.log(0.7)
    margin = (math.log(0.2) + math.log(0.4) - math.log(0.5)) - (ref_e - ref_f)
    out = dpo({"template": t, "forget": f}, beta=beta, ref_logp={"template": torch.tensor([ref_e]), "forget": torch.tensor([ref_f])},
              retain_weight=0.0)
    assert_close(out.loss, torch.tensor(-(2 / beta) * logsig(beta * margin)))
    f2 = seq_with_probs([[0.5, 0.25]])
    avg = (math.log(0.5) + math.log(0.25)) / 2
    assert_close(simnpo({"forget": f2}, simnpo_beta=2.5, gamma=0.3, retain_weight=0.0).loss,
                 torch.tensor(-(2 / 2.5) * logsig(-2.5 * avg - 0.3)))


def test_npo_equals_direct_computation_from_two_models(tiny):
    from flat_ray.data import BUILTIN_TEMPLATES, Collator, TemplateSource, UnlearnDataset, load_split
    from flat_ray.models import PROFILES

    model, tok = tiny
    ref = type(model)(model.config)
    ref.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()})
    rows = load_split("demo", "forget10")[:3]
    ds = UnlearnDataset(rows, tok, PROFILES["generic"], TemplateSource(pool=BUILTIN_TEMPLATES, seed=0), max_length=64)
    b = Collator(tok.pad_token_id)([ds[i] for i in range(3)])["forget"]
    with torch.no_grad():
        lp = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lr = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    def direct(logits):  # sum of log softmax at the gold next tokens, answer positions only
        lsm = torch.log_softmax(logits[:, :-1].double(), -1)
        labels = b["labels"][:, 1:]
        gold = lsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (gold * (labels != -100)).sum(-1)

    beta = 0.1
    expected = -(2 / beta) * torch.nn.functional.logsigmoid(beta * (direct(lr) - direct(lp))).mean()
    got = npo({"forget": (lp, b["labels"])}, beta=beta, ref_logp={"forget": sequence_logprob(lr, b["labels"])},
              retain_weight=0.0)
    assert_close(got.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(direct(lr), direct(lp))


def test_dpo_with_reference_differs_from_reference_free():
    t, f = seq_with_probs([[0.2]]), seq_with_probs([[0.6]])
    with_ref = dpo({"template": t, "forget": f}, beta=0.1, retain_weight=0.0,
                   ref_logp={"template": torch.tensor([math.log(0.05)]), "forget": torch.tensor([math.log(0.9)])})
    zeroed = dpo({"template": t, "forget": f}, beta=0.1, retain_weight=0.0,
                 ref_logp={"template": torch.zeros(1), "forget": torch.zeros(1)})
    assert abs(with_ref.metrics["loss"] - zeroed.metrics["loss"]) > 1e-3


def test_npo_simnpo_dpo_add_open_unlearnings_retain_term_by_hand():
    """open-unlearning (NPO, SimNPO, DPO trainers): loss = forget term + alpha * NLL(retain), alpha = 1 by default,
    NLL = the model's mean token cross-entropy on the retain batch. Retain tokens of probability 0.8 and 0.4:
    NLL = -(log .8 + log .4) / 2."""
    f, t, r = seq_with_probs([[0.5]]), seq_with_probs([[0.2]]), seq_with_probs([[0.8, 0.4]])
    nll_r = -(math.log(0.8) + math.log(0.4)) / 2
    beta, alpha, ref_f, ref_e = 0.1, 0.7, math.log(0.9), math.log(0.3)
    npo_forget = -(2 / beta) * logsig(beta * (ref_f - math.log(0.5)))
    out = npo({"forget": f, "retain": r}, beta=beta, ref_logp={"forget": torch.tensor([ref_f])}, retain_weight=alpha)
    assert_close(out.loss, torch.tensor(npo_forget + alpha * nll_r))
    assert out.metrics["ce_retain"] == pytest.approx(nll_r)
    dpo_forget = -(2 / beta) * logsig(beta * ((math.log(0.2) - math.log(0.5)) - (ref_e - ref_f)))
    out = dpo({"forget": f, "template": t, "retain": r}, beta=beta, retain_weight=1.0,
              ref_logp={"template": torch.tensor([ref_e]), "forget": torch.tensor([ref_f])})
    assert_close(out.loss, torch.tensor(dpo_forget + nll_r))
    # SimNPO: the SimNPO code's and open-unlearning's delta sits inside as beta * (NLL/|y| - delta), i.e. gamma = beta*delta
    s_beta, delta = 4.5, 0.2
    code_form = -(2 / s_beta) * logsig(s_beta * (-math.log(0.5) - delta)) + nll_r
    out = simnpo({"forget": f, "retain": r}, simnpo_beta=s_beta, gamma=s_beta * delta, retain_weight=1.0)
    assert_close(out.loss, torch.tensor(code_form))


@pytest.mark.parametrize("name", ["grad_diff", "idk", "npo", "dpo", "simnpo"])
def test_retain_weight_zero_needs_no_retain_batch(name):
    """At retain_weight=0 the loss never reads "retain" (the batch has none) and equals the forget-only form."""
    inputs = {"forget": seq_with_probs([[0.5]]), "template": seq_with_probs([[0.2]])}
    ref = {"forget": torch.tensor([math.log(0.9)]), "template": torch.tensor([math.log(0.3)])}
    method = METHODS[name]
    knobs = {"retain_weight": 0.0, "beta": 0.1, "simnpo_beta": 2.5, "gamma": 0.0}
    assert "retain" not in method.splits(knobs) and "retain" in method.splits({**knobs, "retain_weight": 1.0})
    extra = {"ref_logp": ref} if method.needs_reference else {}
    out = method.loss({k: inputs[k] for k in method.splits(knobs)}, **{k: knobs[k] for k in method.knobs}, **extra)
    assert torch.isfinite(out.loss) and "ce_retain" not in out.metrics


@pytest.mark.parametrize("name", ["grad_ascent", "grad_diff", "idk", "npo", "dpo", "simnpo"])
def test_registry_declares_what_each_method_needs(name):
    m = METHODS[name]
    assert m.needs_reference == (name in ("npo", "dpo"))
    assert ("retain" in m.batch_keys) == (name != "grad_ascent")
    assert ("retain_weight" in m.knobs) == (name != "grad_ascent")
    assert set(m.reference_keys) <= set(m.batch_keys) and "retain" not in m.reference_keys
    assert METHODS["flat"].needs_reference is False


def test_knob_defaults_and_validation():
    cfg = load_config(None, ["method.name=npo"])
    assert cfg.method.beta == 0.1 and cfg.method.simnpo_beta == 2.5 and cfg.method.gamma == 0.0
    assert cfg.method.retain_weight == 1.0
    with pytest.raises(FlatRayError, match="method.beta must be > 0"):
        load_config(None, ["method.beta=0"])


def test_retain_methods_need_retain_data_at_config_time(tmp_path):
    (tmp_path / "forget.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(FlatRayError, match="method grad_diff needs retain data.*method.retain_split"):
        load_config(None, ["method.name=grad_diff", "data.benchmark=tofu", f"data.data_dir={tmp_path}", "data.split=forget"])
    cfg = load_config(None, ["method.name=grad_diff"])  # the demo's forget10 has retain90
    assert cfg.method.name == "grad_diff"
    with pytest.raises(FlatRayError, match="method.retain_split='nope' is not valid"):
        load_config(None, ["method.name=idk", "method.retain_split=nope"])
    with pytest.raises(FlatRayError, match="method npo needs retain data.*method.retain_weight=0"):
        load_config(None, ["method.name=npo", "data.benchmark=tofu", f"data.data_dir={tmp_path}", "data.split=forget"])
    forget_only = load_config(None, ["method.name=npo", "method.retain_weight=0", "data.benchmark=tofu",
                                     f"data.data_dir={tmp_path}", "data.split=forget"])
    assert forget_only.method.retain_weight == 0.0


@pytest.mark.parametrize("name", ["flat", "grad_ascent", "grad_diff", "idk", "npo", "dpo", "simnpo", "npo:0"])
def test_dry_run_builds_the_batch_each_method_needs(name, tiny_model_dir, tmp_path):
    from flat_ray.dryrun import dry_run

    name, _, weight = name.partition(":")
    cfg = load_config(None, [f"method.name={name}", f"model.name_or_path={tiny_model_dir}", "optim.micro_batch_size=2",
                             f"paths.workdir={tmp_path}", f"method.retain_weight={weight or 1}"])
    summary = dry_run(cfg)
    expected = set(METHODS[name].batch_keys) - ({"retain"} if weight == "0" else set())
    assert set(summary["first_batch"]) == expected
    assert math.isfinite(summary["first_batch_loss"])
    if "retain" in expected:
        assert summary["first_batch"]["retain"][0] == 2
