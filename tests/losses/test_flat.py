"""FLAT loss: hand-derived values, direction property, normalisations, masking, dtypes, registry behaviour."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from flat_ray.errors import FlatRayError
from flat_ray.losses import DIVERGENCES, NORMALIZATIONS, flat_loss, token_logprobs, token_probs

V = 5


def seq_with_probs(rows: list[list[float]], prompt_len: int = 1, pad_to: int | None = None):
    """Logits ``(B, T, V)`` and labels ``(B, T)`` where answer token ``j`` of row ``b`` has probability
    ``rows[b][j]``. The gold token is always id 0; ``prompt_len`` leading labels and right padding are -100."""
    T = max(prompt_len + len(r) for r in rows)
    T = max(T, pad_to or 0)
    logits = torch.zeros(len(rows), T, V)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, probs in enumerate(rows):
        for j, p in enumerate(probs):
            pos = prompt_len + j  # label position; the logits predicting it sit at pos - 1
            labels[b, pos] = 0
            rest = math.log((1 - p) / (V - 1))
            logits[b, pos - 1] = torch.tensor([math.log(p)] + [rest] * (V - 1))
    return logits, labels


S_E, S_F = 0.2, 0.6
# L = -g*(s_e) + f*(g*(s_f)), each written out by hand from the table in docs/losses.md (f-GAN Table 2).
HAND_LOSS = {
    "kl": -S_E + math.exp(S_F - 1),
    "reverse_kl": math.exp(-S_E) + (S_F - 1),
    "jeffrey": -S_E + S_F + S_F**2 / 4 + S_F**3 / 16,
    "squared_hellinger": -(1 - math.exp(-S_E)) + math.exp(S_F) - 1,
    "pearson": -S_E + S_F**2 / 4 + S_F,
    "neyman": -(1 - math.exp(-S_E)) + 2 - 2 * math.exp(-S_F / 2),
    "jensen_shannon": -(math.log(2) - math.log(1 + math.exp(-S_E))) + S_F + math.log(1 + math.exp(-S_F)) - math.log(2),
    "total_variation": -0.5 * math.tanh(S_E) + 0.5 * math.tanh(S_F),  # = 0.169837
}
# (g*'(s_e), (f* o g*)'(s_f)): the implicit weights, i.e. -dL/ds_e and dL/ds_f from the spec's table.
HAND_WEIGHTS = {
    "kl": (1.0, math.exp(S_F - 1)),
    "reverse_kl": (math.exp(-S_E), 1.0),
    "jeffrey": (1.0, 1 + S_F / 2 + 3 * S_F**2 / 16),
    "squared_hellinger": (math.exp(-S_E), math.exp(S_F)),
    "pearson": (1.0, S_F / 2 + 1),
    "neyman": (math.exp(-S_E), math.exp(-S_F / 2)),
    "jensen_shannon": (1 / (1 + math.exp(S_E)), 1 / (1 + math.exp(-S_F))),
    "total_variation": (0.5 * (1 - math.tanh(S_E) ** 2), 0.5 * (1 - math.tanh(S_F) ** 2)),
}


def test_registry_has_exactly_the_eight_canonical_keys():
    assert set(DIVERGENCES.keys()) == set(HAND_LOSS)
    assert {k for k, d in DIVERGENCES.items() if d.in_paper} == {"kl", "pearson", "jensen_shannon", "total_variation"}


@pytest.mark.parametrize("key", sorted(HAND_LOSS))
def test_hand_derived_value_and_weights(key):
    te, tl = seq_with_probs([[S_E]])
    fe, fl = seq_with_probs([[S_F]])
    out = flat_loss(te, tl, fe, fl, divergence=key)
    assert_close(out.loss, torch.tensor(HAND_LOSS[key]), atol=1e-6, rtol=1e-6)
    m = out.metrics
    assert m["score_template"] == pytest.approx(S_E, abs=1e-6)
    assert m["score_forget"] == pytest.approx(S_F, abs=1e-6)
    assert m["weight_template"] == pytest.approx(HAND_WEIGHTS[key][0], rel=1e-5)
    assert m["weight_forget"] == pytest.approx(HAND_WEIGHTS[key][1], rel=1e-5)
    assert m["loss"] == pytest.approx(HAND_LOSS[key], abs=1e-6)
    assert m["divergence_estimate"] == pytest.approx(-HAND_LOSS[key], abs=1e-6)
    assert all(isinstance(v, float) for v in m.values())


def test_paper_mode_is_per_sample_mean_then_mean_over_samples():
    # sample 1: answer probs (0.1, 0.5) -> s = 0.3; sample 2: one token 0.7 -> s = 0.7
    te, tl = seq_with_probs([[0.1, 0.5], [0.7]])
    fe, fl = seq_with_probs([[0.4], [0.2, 0.2, 0.8]])  # s_f = 0.4 and 0.4
    out = flat_loss(te, tl, fe, fl, divergence="kl")
    expected = (-(0.3) - 0.7) / 2 + math.exp(0.4 - 1)
    assert_close(out.loss, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    assert out.metrics["score_template"] == pytest.approx(0.5, abs=1e-6)


def released_code_score(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The released FLAT code's score, written out: softmax, gather gold, zero masked, mean over B*(T-1)."""
    shifted_labels = labels[:, 1:]
    probs = torch.softmax(logits[:, :-1].float(), dim=-1)
    gathered = probs.gather(-1, shifted_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    gathered = gathered * (shifted_labels != -100)
    return gathered.mean()


@pytest.mark.parametrize("key", sorted(HAND_LOSS))
def test_repo_normalisation_matches_released_formula_on_padded_batch(key):
    torch.manual_seed(0)
    te, tl = seq_with_probs([[0.3, 0.2], [0.9]], prompt_len=2, pad_to=7)
    fe, fl = seq_with_probs([[0.6], [0.5, 0.1, 0.4]], prompt_len=3, pad_to=9)
    te = te + 0.1 * torch.randn_like(te)  # logits at masked positions must not matter either
    div = DIVERGENCES[key]
    s_e, s_f = released_code_score(te, tl), released_code_score(fe, fl)
    # padded lengths enter the denominator: the template batch divides by 2 * 6, the forget batch by 2 * 8
    expected = -div.activation(s_e) + div.conjugate(s_f)
    out = flat_loss(te, tl, fe, fl, divergence=key, normalize="repo")
    assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    paper = flat_loss(te, tl, fe, fl, divergence=key, normalize="paper")
    assert abs(paper.metrics["score_forget"] - out.metrics["score_forget"]) > 1e-3


def test_repo_score_depends_on_padding_but_paper_does_not():
    a = seq_with_probs([[0.5, 0.5]], pad_to=4)
    b = seq_with_probs([[0.5, 0.5]], pad_to=12)
    f = seq_with_probs([[0.1]])
    for norm, should_differ in (("paper", False), ("repo", True)):
        la = flat_loss(*a, *f, normalize=norm).metrics["score_template"]
        lb = flat_loss(*b, *f, normalize=norm).metrics["score_template"]
        assert (abs(la - lb) > 1e-4) == should_differ, norm


GRID = torch.linspace(0.01, 0.99, 25)


@pytest.mark.parametrize("key", sorted(HAND_LOSS))
def test_direction_on_score_grid(key):
    """dL/ds_e < 0 and dL/ds_f > 0 everywhere on a grid of scores in (0, 1)."""
    div = DIVERGENCES[key]
    s_e, s_f = torch.meshgrid(GRID, GRID, indexing="ij")
    s_e, s_f = s_e.clone().requires_grad_(True), s_f.clone().requires_grad_(True)
    (-div.activation(s_e) + div.conjugate(s_f)).sum().backward()
    assert (s_e.grad < 0).all(), f"{key}: lowering the loss must raise the template score"
    assert (s_f.grad > 0).all(), f"{key}: lowering the loss must lower the forget score"


@pytest.mark.parametrize("normalize", NORMALIZATIONS.keys())
@pytest.mark.parametrize("key", sorted(HAND_LOSS))
def test_gradient_step_on_logits_raises_template_and_lowers_forget(key, normalize):
    torch.manual_seed(1)
    te, tl = seq_with_probs([[0.2, 0.4], [0.3]], pad_to=5)
    fe, fl = seq_with_probs([[0.6, 0.7, 0.5], [0.8]], pad_to=6)
    te = (te + 0.3 * torch.randn_like(te)).requires_grad_(True)
    fe = (fe + 0.3 * torch.randn_like(fe)).requires_grad_(True)
    before = flat_loss(te, tl, fe, fl, divergence=key, normalize=normalize)
    before.loss.backward()
    with torch.no_grad():
        after = flat_loss(te - 0.5 * te.grad, tl, fe - 0.5 * fe.grad, fl, divergence=key, normalize=normalize)
    assert after.metrics["score_template"] > before.metrics["score_template"]
    assert after.metrics["score_forget"] < before.metrics["score_forget"]
    assert after.metrics["loss"] < before.metrics["loss"]


def test_masked_positions_do_not_matter():
    torch.manual_seed(2)
    te, tl = seq_with_probs([[0.2, 0.4], [0.3]], prompt_len=2, pad_to=6)
    fe, fl = seq_with_probs([[0.6], [0.5, 0.5]], prompt_len=2, pad_to=6)
    base = flat_loss(te, tl, fe, fl, divergence="js")
    # logits at t predict label t+1: positions whose next label is -100, plus the last position, are unused
    unused = torch.cat([tl[:, 1:] == -100, torch.ones(tl.shape[0], 1, dtype=torch.bool)], dim=1)
    noisy = te.clone()
    noisy[unused] = 100 * torch.randn_like(noisy[unused])
    changed = flat_loss(noisy, tl, fe, fl, divergence="js")
    assert_close(changed.loss, base.loss)
    # and a used position does matter
    used = (~unused).nonzero()[0]
    noisy[used[0], used[1], 0] += 5.0
    assert not torch.allclose(flat_loss(noisy, tl, fe, fl, divergence="js").loss, base.loss)


def test_labels_at_position_zero_are_never_scored():
    """The next-token shift happens inside: label 0 has no logits predicting it."""
    logits = torch.zeros(1, 3, V)
    labels = torch.tensor([[0, -100, 0]])
    logp, mask = token_logprobs(logits, labels)
    assert mask.tolist() == [[False, True]]
    assert_close(logp, torch.tensor([[0.0, -math.log(V)]]))


def test_token_logprobs_match_log_softmax_reference():
    torch.manual_seed(3)
    logits = torch.randn(3, 7, 11) * 4
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100
    logp, mask = token_logprobs(logits, labels)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert_close(logp[mask], ref[mask])
    assert (logp[~mask] == 0).all()
    probs, _ = token_probs(logits, labels)
    assert_close(probs[mask], ref[mask].exp())


def _plain_token_logprobs(logits, labels):
    """The textbook formula: an fp32 copy of all logits, log-softmax, gather (what autograd would keep)."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    lab = labels[:, 1:]
    gold = lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return gold.masked_fill(lab == -100, 0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_chunked_logprobs_equal_the_plain_formula_in_value_and_gradient(dtype, monkeypatch):
    import flat_ray.losses.sequence as sequence

    monkeypatch.setattr(sequence, "CHUNK_ELEMENTS", 23)  # 2 rows of 11 per chunk: many chunks and a ragged last one
    torch.manual_seed(5)
    x = (torch.randn(3, 9, 11) * 3).to(dtype)
    labels = torch.randint(0, 11, (3, 9))
    labels[:, :2] = -100
    labels[1, 6:] = -100
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got, _ = token_logprobs(a, labels)
    want = _plain_token_logprobs(b, labels)
    w = torch.randn_like(want)
    (got * w).sum().backward()
    (want * w).sum().backward()
    assert got.dtype == torch.float32
    tol = {"atol": 1e-2, "rtol": 0} if dtype == torch.bfloat16 else {"atol": 1e-6, "rtol": 1e-6}
    assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert a.grad.dtype == dtype
    assert_close(a.grad.float(), b.grad.float(), **tol)
    assert (a.grad[0, 0] == 0).all() and (a.grad[:, -1] == 0).all()  # masked and last positions get no gradient


def test_backward_keeps_no_fp32_copy_of_the_logits():
    """The memory the step saves: autograd keeps the bf16 logits and (N,) fp32 values, never (N, V) fp32."""
    logits = torch.randn(4, 16, 1000, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (4, 16))
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = token_logprobs(logits, labels)
    plain_bytes = logits.numel() * 4
    big = [t for t in saved if t.numel() >= logits.numel() // 2]
    assert big and all(t.dtype == torch.bfloat16 for t in big)
    assert sum(t.numel() * t.element_size() for t in saved) < 0.6 * plain_bytes
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        _plain_token_logprobs(logits, labels)
    assert any(t.dtype == torch.float32 and t.numel() >= logits.numel() // 2 for t in saved)  # the test can fail


def test_bf16_logits_give_fp32_loss_close_to_fp32_and_gradients():
    torch.manual_seed(4)
    te, tl = seq_with_probs([[0.2, 0.4], [0.3]])
    fe, fl = seq_with_probs([[0.6], [0.5, 0.5]])
    ref = flat_loss(te, tl, fe, fl)
    te16 = te.to(torch.bfloat16).requires_grad_(True)
    out = flat_loss(te16, tl, fe.to(torch.bfloat16), fl)
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, ref.loss, atol=5e-3, rtol=0)
    out.loss.backward()
    assert te16.grad is not None and te16.grad.dtype == torch.bfloat16 and torch.isfinite(te16.grad.float()).all()


ALIASES = {
    "Total-Variation": "total_variation", "tv": "total_variation", "TV": "total_variation",
    "Jenson-Shannon": "jensen_shannon", "Jensen-Shannon": "jensen_shannon", "js": "jensen_shannon",
    "KL": "kl", "Reverse-KL": "reverse_kl", "Pearson": "pearson", "Neyman": "neyman",
    "Squared-Hellinger": "squared_hellinger", "Jeffrey": "jeffrey", "reverse-kl": "reverse_kl",
}


@pytest.mark.parametrize(("alias", "canonical"), sorted(ALIASES.items()))
def test_alias_resolution(alias, canonical):
    assert DIVERGENCES.canonical(alias) == canonical
    te, tl = seq_with_probs([[S_E]])
    fe, fl = seq_with_probs([[S_F]])
    assert_close(flat_loss(te, tl, fe, fl, divergence=alias).loss, flat_loss(te, tl, fe, fl, divergence=canonical).loss)


def test_unknown_divergence_and_normalisation_name_the_choices():
    te, tl = seq_with_probs([[S_E]])
    with pytest.raises(FlatRayError, match=r"unknown divergence 'tvv'.*Did you mean 'total_variation'.*Valid choices: kl, reverse_kl"):
        flat_loss(te, tl, te, tl, divergence="tvv")
    with pytest.raises(FlatRayError, match=r"unknown normalization 'papr'.*paper, repo"):
        flat_loss(te, tl, te, tl, normalize="papr")


def test_losses_import_without_ray_deepspeed_mlflow_click():
    code = (
        "import sys\n"
        "for m in ('ray', 'deepspeed', 'mlflow', 'click'): sys.modules[m] = None\n"
        "from flat_ray.losses import flat_loss, DIVERGENCES, METHODS\n"
        "assert len(DIVERGENCES) == 8 and 'flat' in METHODS\n"
        "bad = [m for m in ('transformers', 'datasets') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
