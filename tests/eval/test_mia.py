"""Membership inference and memorization (flat_ray.eval.mia) against open-unlearning's code, transcribed below from
src/evals/metrics/mia/ and memorization.py there (their per-row slicing, their loops, scikit-learn's AUC), on
identical random logits; then hand values of an AUC and PrivLeak on a known split, the holdout splits, and the
whole evaluation on the tiny model."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from flat_ray.eval import mia

V = 50


def batch(seed: int, rows: int = 4, length: int = 12, prompt: int = 3):
    """Logits, input ids and labels: a prompt at -100, then answers of different lengths, right padding at -100."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, V, generator=g) * 3
    ids = torch.randint(1, V, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    for r in range(rows):
        labels[r, length - 2 * r:] = -100
    return logits, ids, labels


# --------------------------------------------------------------------- open-unlearning's code, per row, as written
def ou_avg_loss(logits, labels):  # evaluate_probability
    shifted, lg = labels[..., 1:], logits[..., :-1, :]
    losses = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(lg.transpose(-1, -2), shifted).sum(-1)
    return (losses / (labels != -100).sum(-1)).tolist()


def ou_tokenwise(logits, ids, labels):  # tokenwise_logprobs and tokenwise_vocab_logprobs
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)[:, :-1, :]
    target = torch.gather(log_probs, dim=2, index=ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    out = []
    for i in range(len(labels)):
        idx = (labels[i] != -100).nonzero(as_tuple=True)[0][:-1]
        start, end = idx[0].item(), idx[-1].item()
        out.append((target[i, start - 1:end], log_probs[i, start - 1:end], labels[i][idx]))
    return out


def ou_min_k(lp, k=0.4):
    lp = lp.float().numpy()
    num_k = max(1, int(len(lp) * k))
    return -np.mean(np.sort(lp)[:num_k])


def ou_min_k_pp(lp, vocab, k=0.4):
    mu = (torch.exp(vocab) * vocab).sum(-1)
    sigma = (torch.exp(vocab) * torch.square(vocab)).sum(-1) - torch.square(mu)
    sigma = torch.clamp(sigma, min=1e-6)
    scores = (lp.float().numpy() - mu.float().numpy()) / torch.sqrt(sigma).numpy()
    num_k = max(1, int(len(scores) * k))
    return -np.mean(sorted(scores)[:num_k])


def ou_em(vocab, labels):
    return ((torch.argmax(vocab, dim=-1) == labels).sum() / len(labels)).item()


def ou_es(vocab, labels):
    preds = torch.argmax(vocab, dim=-1)
    valid_len = len(labels)
    for k in range(valid_len):
        if torch.equal(preds[k:], labels[k:]):
            break
    return 1 - (k / valid_len)


def texts_of(labels):
    return [" ".join(str(t) for t in row[row != -100].tolist()) for row in labels]


def test_each_statistic_is_open_unlearnings_on_the_same_logits():
    logits, ids, labels = batch(0)
    ours = mia.answer_stats(logits, labels, texts_of(labels))
    loss = ou_avg_loss(logits, labels)
    np.testing.assert_allclose(ours["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(ours["zlib"], [lo / len(zlib.compress(t.encode("utf-8")))
                                              for lo, t in zip(loss, texts_of(labels), strict=True)], rtol=1e-5)
    rows = ou_tokenwise(logits, ids, labels)
    np.testing.assert_allclose(ours["min_k"], [ou_min_k(lp) for lp, _, _ in rows], rtol=1e-5)
    np.testing.assert_allclose(ours["min_k_plus_plus"], [ou_min_k_pp(lp, v) for lp, v, _ in rows], rtol=1e-4)
    np.testing.assert_allclose(ours["em"], [ou_em(v, y) for _, v, y in rows])
    np.testing.assert_allclose(ours["es"], [ou_es(v, y) for _, v, y in rows])


def test_memorization_of_a_model_that_knows_the_answer_and_one_that_does_not():
    """Logits whose argmax is the answer everywhere: EM = ES = 1. Argmax right only on the last two of the m
    answer tokens before the EOS: ES = 2/m. Never right: open-unlearning's loop stops at k = m - 1, so ES = 1/m."""
    _, ids, labels = batch(1, rows=1, length=10, prompt=2)  # answer tokens at positions 2..9: m = 7 before the EOS
    hot = torch.nn.functional.one_hot(ids, V).float() * 20
    logits = torch.zeros(1, 10, V)
    logits[0, :-1] = hot[0, 1:]  # position t predicts token t + 1
    right = mia.answer_stats(logits, labels, ["x"])
    assert right["em"] == [1.0] and right["es"] == [1.0]
    wrong = logits.clone()
    wrong[0, 1:6] = torch.roll(wrong[0, 1:6], 1, dims=-1)  # positions 1..5 predict tokens 2..6 wrongly
    assert mia.answer_stats(wrong, labels, ["x"])["es"] == [pytest.approx(2 / 7)]
    never = logits.roll(1, dims=-1)
    out = mia.answer_stats(never, labels, ["x"])
    assert out["em"] == [0.0] and out["es"] == [pytest.approx(1 / 7)]


def test_auc_is_scikit_learns_and_privleak_on_a_known_split():
    rng = np.random.default_rng(0)
    forget, holdout = rng.normal(0, 1, 30), rng.normal(0.7, 1, 25)
    forget[:5] = holdout[:5]  # ties
    expected = roc_auc_score([0] * 30 + [1] * 25, np.concatenate([forget, holdout]))
    assert mia.auc(forget, holdout) == pytest.approx(expected, abs=1e-12)
    # forget losses all below the held-out ones: AUC 1, PrivLeak -100 against an indistinguishable reference (0.5)
    stats = {s: np.array([1.0, 2.0]) for s in mia.STATS}
    held = {s: np.array([3.0, 4.0]) for s in mia.STATS}
    out = mia.metrics(stats, held)
    assert out["mia_loss"] == out["mia_min_k"] == 1.0 and out["privleak"] == pytest.approx(-100.0)
    # against a retain model whose own AUC is 0.4: ((1 - 0.75) - (1 - 0.4)) / (1 - 0.4) * 100
    held["min_k"] = np.array([1.5, 3.0])  # ranks: forget 1, 2 vs held 1.5, 3 -> AUC 0.75
    assert mia.metrics(stats, held, {"auc": 0.4})["privleak"] == pytest.approx((0.25 - 0.6) / 0.6 * 100)


def test_the_reference_attack_is_open_unlearnings_score_from_the_references_logged_losses():
    """open-unlearning's ReferenceAttack scores target_loss - ref_loss per question (both avg_loss of
    evaluate_probability) and takes scikit-learn's AUC; flat_ray reads the reference's losses from its logs."""
    rng = np.random.default_rng(1)
    target_f, target_h, ref_f, ref_h = rng.random(12), rng.random(9) + 0.3, rng.random(12), rng.random(9)
    stats = {s: target_f for s in mia.STATS}
    held = {s: target_h for s in mia.STATS}
    expected = roc_auc_score([0] * 12 + [1] * 9, np.concatenate([target_f - ref_f, target_h - ref_h]))
    out = mia.metrics(stats, held, {"auc": 0.5, "forget_loss": ref_f, "holdout_loss": ref_h})
    assert out["mia_reference"] == pytest.approx(expected)
    # a reference evaluated on other questions (another count) gives no Reference attack rather than a wrong one
    assert "mia_reference" not in mia.metrics(stats, held, {"auc": 0.5, "forget_loss": ref_f[:5],
                                                             "holdout_loss": ref_h})


def test_the_demos_holdout_authors_are_in_no_training_split():
    from flat_ray.data import BENCHMARKS, load_split

    trained = {r["question"] for split in ("full_with_background", "retain90_with_background")
               for r in load_split("demo", split)}
    for forget, holdout in BENCHMARKS["demo"].holdout_of.items():
        rows = load_split("demo", holdout)
        assert len(rows) == len(load_split("demo", forget)) and not {r["question"] for r in rows} & trained
    assert BENCHMARKS["tofu"].holdout_of == {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}


def test_the_demo_evaluation_reports_them_and_the_open_unlearning_file_holds_them(tiny, tmp_path):
    """The TOFU suite on the tiny model with the demo's holdout: the summary has every MIA and memorization metric,
    TOFU_EVAL.json holds them as open-unlearning writes them, and read back they give the same summary (the
    report's retain row is computed that way); PrivLeak follows the reference's AUC."""
    from flat_ray.config import load_config
    from flat_ray.eval import open_unlearning
    from flat_ray.eval.runner import eval_split_rows
    from flat_ray.eval.suites import write_tofu_logs
    from flat_ray.eval.tofu import read_reference_mia, summarize
    from flat_ray.models import PROFILES

    model, tok = tiny
    cfg = load_config(None, ["eval.max_examples=6"], presets=["demo"])
    rows = eval_split_rows("demo", "forget10", None, 6, cfg.eval.mia)
    assert len(rows["holdout"]) == 6
    from flat_ray.eval.runner import evaluate_tofu

    values = evaluate_tofu(model, tok, PROFILES["generic"], rows, max_length=96, batch_size=4, max_new_tokens=4,
                           gradnorm=True)
    assert "holdout" not in values and len(values["forget"].holdout_stats["loss"]) == 6
    summary = write_tofu_logs(tmp_path, values, "arithmetic", None, {})
    names = [*mia.ATTACKS, "privleak", "extraction_strength", "exact_memorization"]
    assert all(0 <= summary[k] <= 1 for k in mia.ATTACKS) and set(names) <= set(summary)
    assert summary["privleak"] == pytest.approx(mia.privleak(summary["mia_min_k"], None))
    logs = open_unlearning.read_logs(tmp_path)
    ref = read_reference_mia(tmp_path)
    again = summarize(logs, reference_mia=ref)
    assert ref["auc"] == pytest.approx(summary["mia_min_k"]) and "mia_reference" not in summary
    np.testing.assert_allclose(ref["forget_loss"], values["forget"].stats["loss"])
    np.testing.assert_allclose(ref["holdout_loss"], values["forget"].holdout_stats["loss"])
    assert all(again[k] == pytest.approx(summary[k]) for k in names if k != "privleak")
    assert again["privleak"] == pytest.approx(0.0, abs=1e-6)  # against its own AUC
    assert again["mia_reference"] == 0.5  # its own losses subtracted: every score 0, a tie
    no_mia = eval_split_rows("demo", "forget10", None, 6, False)
    assert "holdout" not in no_mia
    # a sweep cell's cached original keeps them, so every trial's epoch 0 reports them
    from flat_ray.eval import original

    assert original.save(tmp_path / "cell", values, {})
    cached = summarize(original.load(tmp_path / "cell"))
    assert all(cached[k] == pytest.approx(summary[k]) for k in names)


def ou_gradnorm(model, batch, p=2):
    """open-unlearning's GradNormAttack.compute_batch_values as written, on a batch of one (its config's batch_size)."""
    model.train()
    ids, labels = batch["input_ids"], batch["labels"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)[:, :-1, :]
    target = torch.gather(log_probs, dim=2, index=ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    idx = (labels[0] != -100).nonzero(as_tuple=True)[0][:-1]
    lps = target[0, idx[0].item() - 1:idx[-1].item()]
    loss = -torch.mean(lps)
    model.zero_grad()
    loss.backward()
    norms = [param.grad.detach().norm(p=p) for param in model.parameters() if param.grad is not None]
    model.eval()
    return float(torch.stack(norms).mean())


def test_gradnorm_is_open_unlearnings_and_leaves_the_models_gradients_alone(tiny):
    """GradNorm per question equals open-unlearning's attack on the same rows of a real model; no parameter's .grad
    is written and every requires_grad flag is as it was; the AUC ranks it like the other attacks; a model holding
    ZeRO-3 partitions (a parameter with DeepSpeed's ds_id) gets no GradNorm instead of a wrong one."""
    import copy

    from flat_ray.data import Collator, encode_qa, load_split
    from flat_ray.eval.runner import question_stats
    from flat_ray.models import PROFILES

    model, tok = tiny
    forget, holdout = load_split("demo", "forget10")[:4], load_split("demo", "holdout10")[:4]
    frozen = model.model.embed_tokens.weight
    frozen.requires_grad_(False)  # one frozen tensor: its flag comes back as it was
    try:
        stats = {side: question_stats(model, tok, PROFILES["generic"], rows, max_length=96, batch_size=3,
                                      gradnorm=True) for side, rows in (("forget", forget), ("holdout", holdout))}
    finally:
        flags = [q.requires_grad for q in model.parameters()]
        frozen.requires_grad_(True)
    assert flags.count(False) == 1 and all(q.grad is None for q in model.parameters())
    theirs = copy.deepcopy(model)
    collate = Collator(tok.pad_token_id)
    for side, rows in (("forget", forget), ("holdout", holdout)):
        expected = [ou_gradnorm(theirs, collate([encode_qa(tok, PROFILES["generic"], r["question"], r["answer"], 96)]))
                    for r in rows]
        np.testing.assert_allclose(stats[side]["gradnorm"], expected, rtol=1e-4)
        assert len(stats[side]["loss"]) == 4  # the other statistics as before
    scores = [*stats["forget"]["gradnorm"], *stats["holdout"]["gradnorm"]]
    result = mia.metrics(stats["forget"], stats["holdout"])
    assert result["mia_gradnorm"] == pytest.approx(roc_auc_score([0] * 4 + [1] * 4, scores))
    model.lm_head.weight.ds_id = 0
    try:
        sharded = question_stats(model, tok, PROFILES["generic"], forget, max_length=96, batch_size=3, gradnorm=True)
    finally:
        del model.lm_head.weight.ds_id
    assert "gradnorm" not in sharded and "mia_gradnorm" not in mia.metrics(sharded, sharded)
