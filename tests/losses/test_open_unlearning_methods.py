"""WGA, SatImp, UNDIAL and CE-U against open-unlearning's code (src/trainer/utils.py and
src/trainer/unlearn/ceu.py there), transcribed below as the reference: the same shifts, masks, detaches and
reductions, applied to identical random logits. One deliberate difference, UNDIAL's average (docs/losses.md): there
every position of the sequence counts, prompt and padding included; here the answer tokens only. The UNDIAL check
therefore uses batches whose every shifted position is an answer token, and a second check shows the difference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from flat_ray.config import load_config
from flat_ray.errors import FlatRayError
from flat_ray.losses import METHODS
from flat_ray.losses.baselines import ceu, satimp, undial, wga

V = 131  # over 100: open-unlearning's UNDIAL indexes the vocabulary with the -100 of masked labels (token V - 100)


def batch(seed: int, prompt: int = 2, rows: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and labels: ``prompt`` leading positions at -100, then answers of different lengths (a padded
    tail at -100)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, V, generator=g) * 2
    labels = torch.randint(0, V, (rows, length), generator=g)
    labels[:, :prompt] = -100
    for r in range(rows):
        labels[r, length - r:] = -100  # row r has r padding positions
    return logits, labels


# ---------------------------------------------------------------- open-unlearning's formulas, as their code has them
def ref_token_ce(logits, labels):
    shift_logits, shift_labels = logits[..., :-1, :].contiguous(), labels[..., 1:].contiguous()
    lm_loss = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(
        shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    return lm_loss, shift_labels.view(-1) != -100


def ref_wga(logits, labels, beta):
    lm_loss, valid = ref_token_ce(logits, labels)
    weight = ((-lm_loss).exp().detach()) ** beta
    return -(weight * lm_loss)[valid].mean()


def ref_satimp(logits, labels, beta1, beta2):
    lm_loss, valid = ref_token_ce(logits, labels)
    weight = ((-lm_loss).exp().detach()) ** beta1 * (1 - (-lm_loss).exp().detach()) ** beta2
    return -(weight * lm_loss)[valid].mean()


def ref_undial(logits, teacher_logits, labels, beta):
    shift_labels, shift_logits = labels[..., 1:].contiguous(), logits[..., :-1, :].contiguous()
    shift_teacher = teacher_logits[..., :-1, :].contiguous()
    mask = torch.zeros_like(shift_teacher)
    mask[torch.arange(mask.shape[0]).view(-1, 1, 1), torch.arange(mask.shape[1]).view(1, -1, 1),
         shift_labels.unsqueeze(-1)] = 1.0
    soft_label = F.softmax(shift_teacher - mask * beta, dim=-1)
    loss = nn.CrossEntropyLoss(reduction="none")(shift_logits.view(-1, shift_logits.size(-1)),
                                                 soft_label.view(-1, soft_label.size(-1)))
    return loss.mean()


def ref_ceu(logits, labels, ignore_first_n_answer_tokens):
    valid_mask = labels != -100
    update_mask = (valid_mask.cumsum(dim=-1) <= ignore_first_n_answer_tokens) & valid_mask
    labels = labels.masked_fill(update_mask, -100)[..., 1:].contiguous()
    logits = logits[..., :-1, :].contiguous()
    valid = labels != -100
    valid_logits, valid_labels = logits[valid], labels[valid]
    target = valid_logits.detach().clone()
    target.scatter_(dim=-1, index=valid_labels.unsqueeze(-1), value=float("-inf"))
    return F.cross_entropy(input=valid_logits, target=F.softmax(target, dim=-1))


def ref_retain_nll(logits, labels):  # HF's causal-LM loss: mean over the retain answer tokens
    lm_loss, valid = ref_token_ce(logits, labels)
    return lm_loss[valid].mean()


# -------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_wga_is_open_unlearnings_with_its_retain_term(beta):
    f, r = batch(0), batch(1)
    for gamma, alpha in ((1.0, 1.0), (0.5, 0.0)):
        expected = gamma * ref_wga(*f, beta) + alpha * ref_retain_nll(*r)
        inputs = {"forget": f, "retain": r} if alpha else {"forget": f}
        assert_close(wga(inputs, wga_beta=beta, forget_weight=gamma, retain_weight=alpha).loss, expected)


@pytest.mark.parametrize(("beta1", "beta2"), [(5.0, 1.0), (1.0, 2.0)])
def test_satimp_is_open_unlearnings(beta1, beta2):
    f, r = batch(2), batch(3)
    expected = 0.1 * ref_satimp(*f, beta1, beta2) + 1.0 * ref_retain_nll(*r)
    out = satimp({"forget": f, "retain": r}, satimp_beta1=beta1, satimp_beta2=beta2, forget_weight=0.1,
                 retain_weight=1.0)
    assert_close(out.loss, expected)


def test_undial_is_open_unlearnings_where_every_position_is_an_answer_token():
    logits, labels = batch(4, prompt=1, length=6)
    labels = torch.randint(0, V, labels.shape, generator=torch.Generator().manual_seed(9))
    labels[:, 0] = -100  # dropped by the shift anyway: every shifted position is an answer token
    teacher = batch(5, length=6)[0]
    for beta in (10.0, 1.0):
        out = undial({"forget": (logits, labels)}, undial_beta=beta, forget_weight=1.0, retain_weight=0.0,
                     ref_logits={"forget": teacher})
        assert_close(out.loss, ref_undial(logits, teacher, labels, beta))


def test_undial_averages_over_answer_tokens_where_open_unlearning_averages_over_every_position():
    logits, labels = batch(6)
    teacher = batch(7)[0]
    ours = undial({"forget": (logits, labels)}, undial_beta=10.0, forget_weight=1.0, retain_weight=0.0,
                  ref_logits={"forget": teacher}).loss
    # the answer-token mean, by hand from the per-position terms
    shift = labels[:, 1:]
    target = (teacher[:, :-1] - 10.0 * F.one_hot(shift.clamp(min=0), V)).softmax(-1)
    per_position = -(target * logits[:, :-1].log_softmax(-1)).sum(-1)
    assert_close(ours, per_position[shift != -100].mean())
    assert not torch.isclose(ours, ref_undial(logits, teacher, labels, 10.0))  # the documented difference


@pytest.mark.parametrize("n", [0, 1, 2])
def test_ceu_is_open_unlearnings(n):
    logits, labels = batch(8)
    assert_close(ceu({"forget": (logits, labels)}, ceu_ignore_first=n).loss, ref_ceu(logits, labels, n))


def test_gradients_match_too():
    """The detaches sit where open-unlearning's do: the weights of WGA and SatImp and CE-U's target carry no
    gradient (a gradient through them would change the update, not the value)."""
    for ours, theirs in (
        (lambda x, y: wga({"forget": (x, y)}, wga_beta=1.0, forget_weight=1.0, retain_weight=0.0).loss,
         lambda x, y: ref_wga(x, y, 1.0)),
        (lambda x, y: satimp({"forget": (x, y)}, satimp_beta1=5.0, satimp_beta2=1.0, forget_weight=1.0,
                             retain_weight=0.0).loss,
         lambda x, y: ref_satimp(x, y, 5.0, 1.0)),
        (lambda x, y: ceu({"forget": (x, y)}, ceu_ignore_first=1).loss, lambda x, y: ref_ceu(x, y, 1)),
    ):
        logits, labels = batch(10)
        a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours(a, labels).backward()
        theirs(b, labels).backward()
        assert_close(a.grad, b.grad)


def test_registry_and_config_carry_open_unlearnings_defaults():
    assert [METHODS[m].needs_reference for m in ("wga", "satimp", "undial", "ceu")] == [False, False, True, False]
    assert METHODS["undial"].reference_output == "logits" and METHODS["ceu"].batch_keys == ("forget",)
    m = {name: load_config(None, [f"method.name={name}"]).method for name in ("wga", "satimp", "undial", "ceu")}
    assert (m["wga"].wga_beta, m["wga"].forget_weight, m["wga"].retain_weight) == (1.0, 1.0, 1.0)
    assert (m["satimp"].satimp_beta1, m["satimp"].satimp_beta2, m["satimp"].forget_weight,
            m["satimp"].retain_weight) == (5.0, 1.0, 0.1, 1.0)
    assert (m["undial"].undial_beta, m["undial"].forget_weight, m["undial"].retain_weight) == (10.0, 1.0, 0.0)
    assert "retain" not in METHODS["undial"].splits(vars(m["undial"])) and m["ceu"].ceu_ignore_first == 1
    assert load_config(None, ["method.name=undial", "method.retain_weight=1"]).method.retain_weight == 1.0
    with pytest.raises(FlatRayError, match="method.undial_beta must be > 0"):
        load_config(None, ["method.name=undial", "method.undial_beta=0"])


# --------------------------------------------------------------------------------------------------------- RMU
def ref_forward_with_cache(model, inputs, module, no_grad=True):  # open-unlearning's RMU.forward_with_cache
    cache = []

    def hook(module, input, output):
        cache.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    with torch.set_grad_enabled(not no_grad):
        outputs = model(**inputs)
    handle.remove()
    return cache[0], outputs


def ref_activation_loss(activation1, activation2, mask, keepdim=True):  # open-unlearning's compute_activation_loss
    squared_diff = torch.nn.functional.mse_loss(activation1, activation2, reduction="none")
    expanded_mask = mask.unsqueeze(-1).expand_as(squared_diff)
    squared_diff_sum = (squared_diff * expanded_mask).mean(dim=2).sum(dim=(1))
    num_tokens = mask.sum(dim=-1, keepdim=keepdim)  # keepdim=True: theirs, a (b,) / (b, 1) broadcast to (b, b)
    return (squared_diff_sum / num_tokens).mean()


def test_rmus_activation_distance_is_open_unlearnings_per_example_mean():
    """Their ``squared_diff_sum / num_tokens`` divides a (b,) tensor by a (b, 1) one, which broadcasts to (b, b): its
    mean is mean_j(s_j) * mean_i(1 / n_i), not the per-example mean_i(s_i / n_i) the code means. The two agree when
    every example has the same number of answer tokens; flat_ray computes the per-example mean (docs/losses.md)."""
    from flat_ray.losses.baselines import activation_mse

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 6, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    labels = torch.randint(0, 9, (3, 6), generator=g)
    labels[:, :2] = -100
    assert_close(activation_mse(a, b, labels), ref_activation_loss(a, b, labels != -100))  # 4 answer tokens each
    labels[1, 4:], labels[2, 5:] = -100, -100  # 4, 2 and 3 answer tokens
    mask = labels != -100
    s, n = ((a - b).square().mean(-1) * mask).sum(-1), mask.sum(-1)
    assert_close(ref_activation_loss(a, b, mask), s.mean() * (1.0 / n).mean())  # theirs, as it computes
    assert_close(activation_mse(a, b, labels), (s / n).mean())  # ours
    assert_close(activation_mse(a, b, labels), ref_activation_loss(a, b, mask, keepdim=False))


def test_rmu_is_open_unlearnings_on_a_real_model(tiny):
    """RMU through flat_ray's step (one concatenated forward, the layer read by a hook) against open-unlearning's
    forward_with_cache and compute_activation_loss (its per-example mean as meant: the test above) on the same
    model, batch and control vector; the frozen reference a copy of the start model, as theirs."""
    import copy

    from flat_ray.data import BUILTIN_TEMPLATES, Collator, TemplateSource, UnlearnDataset, load_split
    from flat_ray.engine.step import decoder_layers, method_loss
    from flat_ray.losses.baselines import control_vector
    from flat_ray.models import PROFILES

    model, tok = tiny
    ds = UnlearnDataset(load_split("demo", "forget10")[:3], tok, PROFILES["generic"],
                        TemplateSource(pool=BUILTIN_TEMPLATES, seed=0), max_length=64,
                        retain_rows=load_split("demo", "retain90")[:3], seed=0)
    b = Collator(tok.pad_token_id)([ds[i] for i in range(3)])
    model = copy.deepcopy(model).train()
    torch.manual_seed(0)
    with torch.no_grad():  # move the model off its start so the retain term is not zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    reference = copy.deepcopy(tiny[0]).eval()
    knobs = {**vars(load_config(None, ["method.name=rmu", "method.rmu_layer=1"]).method)}
    ours = method_loss(model, b, METHODS["rmu"], knobs, reference).loss

    def part(k):
        return {key: b[k][key] for key in ("input_ids", "attention_mask", "labels")}
    a_f, _ = ref_forward_with_cache(model, part("forget"), decoder_layers(model)[1], no_grad=False)
    c = control_vector(a_f.shape[-1], 2.0).view(1, 1, -1).expand_as(a_f)
    forget = ref_activation_loss(a_f, c, part("forget")["labels"] != -100, keepdim=False)
    a_r, _ = ref_forward_with_cache(model, part("retain"), decoder_layers(model)[1], no_grad=False)
    r_r, _ = ref_forward_with_cache(reference, part("retain"), decoder_layers(reference)[1])
    retain = ref_activation_loss(a_r, r_r, part("retain")["labels"] != -100, keepdim=False)
    assert float(retain) > 0
    assert_close(ours, 1.0 * forget + 1.0 * retain, rtol=1e-5, atol=1e-6)
    assert abs(float(control_vector(64, 2.0).norm()) - 2.0) < 1e-5 and bool((control_vector(64, 2.0) >= 0).all())
