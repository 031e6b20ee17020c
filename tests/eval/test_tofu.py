"""TOFU metric math: the published check values from TOFU's own eval logs, variants, I/O round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from flat_ray.errors import FlatRayError
from flat_ray.eval.tofu import (
    LOG_FILES,
    SplitValues,
    forget_truth_ratios,
    read_log_dir,
    read_reference,
    split_metrics,
    summarize,
    write_log_dir,
)

SHARED = Path(os.environ.get("FLAT_RAY_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


@pytest.fixture(scope="module")
def logs():
    root = SHARED / "tofu_eval_logs"
    if not (root / "llama2-7b_full" / "eval_log.json").is_file():
        pytest.skip(f"TOFU's published eval logs not found at {root} (../shared/data is absent on this checkout)")
    return root


def test_model_utility_matches_tofu_check_values(logs):
    full = summarize(read_log_dir(logs / "llama2-7b_full"))
    retain = summarize(read_log_dir(logs / "llama2-7b_retain90"))
    assert full["model_utility"] == pytest.approx(0.585886, abs=5e-7)
    assert retain["model_utility"] == pytest.approx(0.575240, abs=5e-7)
    assert full["truth_ratio_variant"] == "arithmetic"


def test_forget_quality_matches_tofu_check_values(logs):
    reference, source = read_reference(logs / "llama2-7b_retain90")
    assert source.startswith("tofu-log:") and len(reference) == 300
    full = summarize(read_log_dir(logs / "llama2-7b_full"), reference_tr=reference)
    assert full["forget_quality"] == pytest.approx(1.834e-21, rel=5e-4)
    itself = summarize(read_log_dir(logs / "llama2-7b_retain90"), reference_tr=reference)
    assert itself["forget_quality"] == pytest.approx(1.0)


def _open_unlearning_json(log_dir: Path, path: Path) -> Path:
    """An open-unlearning result JSON built from a TOFU forget log with open-unlearning's truth_ratio handler:
    score = P(wrong) / (P(correct) + 1e-10), P(correct) = exp(-L(paraphrased)), P(wrong) = exp(-mean_j L(pert_j))."""
    log = json.loads((log_dir / "eval_log_forget.json").read_text())
    scores = {}
    for k, para in log["avg_paraphrased_loss"].items():
        wrong, correct = np.exp(-np.mean(log["average_perturb_loss"][k])), np.exp(-para)
        scores[k] = {"score": float(wrong / (correct + 1e-10))}
    path.write_text(json.dumps({"forget_truth_ratio": {"agg_value": 0.0, "value_by_index": scores},
                                "forget_quality": {"agg_value": None}}))
    return path


def test_forget_quality_against_an_open_unlearning_reference(logs, tmp_path):
    """open-unlearning stores wrong/correct ratios; compared un-inverted with flat_ray's correct/wrong ones the
    published pair gave 3.3e-64 (full vs retain90) and 1.1e-19 (retain90 vs itself)."""
    reference, source = read_reference(_open_unlearning_json(logs / "llama2-7b_retain90", tmp_path / "ou.json"))
    assert source.startswith("open-unlearning:") and len(reference) == 300
    full = summarize(read_log_dir(logs / "llama2-7b_full"), reference_tr=reference)
    assert full["forget_quality"] == pytest.approx(1.834e-21, rel=5e-4)
    itself = summarize(read_log_dir(logs / "llama2-7b_retain90"), reference_tr=reference)
    assert itself["forget_quality"] == pytest.approx(1.0)


def test_written_truth_ratio_has_tofus_orientation(logs, tmp_path):
    """TOFU's logs store exp(L(paraphrased) - mean_j L(perturbed_j)) under truth_ratio (question 0 of the Llama-2
    full forget log: 0.2452; the reciprocal, 4.078, was written before)."""
    write_log_dir(tmp_path, read_log_dir(logs / "llama2-7b_full"), {}, {})
    ours = json.loads((tmp_path / "eval_log_forget.json").read_text())["truth_ratio"]
    tofu = json.loads((logs / "llama2-7b_full" / "eval_log_forget.json").read_text())["truth_ratio"]
    assert ours["0"] == pytest.approx(0.2452337, rel=1e-5)
    assert [ours[k] for k in sorted(tofu, key=int)] == pytest.approx([tofu[k] for k in sorted(tofu, key=int)], rel=1e-5)


def test_truth_ratio_key_by_hand(tmp_path):
    v = SplitValues(np.array([1.0]), np.array([2.0]), np.array([[3.0, 4.0]]), np.array([0.5]), [["p", "g", "t"]])
    write_log_dir(tmp_path, {"forget": v}, {}, {})
    written = json.loads((tmp_path / "eval_log_forget.json").read_text())["truth_ratio"]["0"]
    assert written == pytest.approx(np.exp(2.0 - 3.5))  # wrong/correct, below 1 when the answer is preferred


def test_geometric_variant_differs_and_is_named(logs):
    geo = summarize(read_log_dir(logs / "llama2-7b_full"), truth_ratio="geometric")
    assert geo["truth_ratio_variant"] == "geometric"
    assert abs(geo["model_utility"] - 0.585886) > 0.01


def _toy(n=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return SplitValues(rng.uniform(0.1, 2, n), rng.uniform(0.1, 2, n), rng.uniform(0.1, 3, (n, k)),
                       rng.uniform(0, 1, n), [["p", "g", "t"]] * n)


def test_split_metrics_by_hand():
    v = SplitValues(np.array([1.0]), np.array([0.5]), np.array([[1.0, 2.0]]), np.array([0.25]))
    m = split_metrics("retain", v)
    r = (np.exp(-1.0) + np.exp(-2.0)) / 2 / np.exp(-0.5)
    assert m == pytest.approx({"prob": np.exp(-1.0), "rougeL_recall": 0.25, "truth_ratio": max(0, 1 - r)})
    normalised = split_metrics("world_facts", v)["prob"]
    assert normalised == pytest.approx(np.exp(-1) / (np.exp(-1) + np.exp(-1) + np.exp(-2)))
    assert split_metrics("forget", v)["truth_ratio"] == pytest.approx(min(r, 1 / r))


def test_write_then_read_round_trip_and_use_as_reference(tmp_path):
    splits = {name: _toy(seed=i) for i, name in enumerate(LOG_FILES)}
    summary = summarize(splits)
    write_log_dir(tmp_path, splits, summary, {"model": "toy"})
    back = read_log_dir(tmp_path)
    assert summarize(back) == pytest.approx(summary)
    ref, source = read_reference(tmp_path)
    assert np.allclose(ref, forget_truth_ratios(splits["forget"])) and source.startswith("tofu-log:")
    assert json.loads((tmp_path / "summary.json").read_text())["model"] == "toy"


def test_open_unlearning_reference_format(tmp_path):
    f = tmp_path / "TOFU_EVAL.json"
    f.write_text(json.dumps({"forget_truth_ratio": {"agg_value": 0.6, "value_by_index": {
        "1": {"score": 0.5}, "0": {"score": 0.25}, "10": {"score": 2.0}}}}))
    ref, source = read_reference(f)
    # open-unlearning's scores are wrong/correct: inverted into flat_ray's correct/wrong orientation
    assert ref.tolist() == [4.0, 2.0, 0.5] and source.startswith("open-unlearning:")


def test_reference_and_log_errors(tmp_path):
    with pytest.raises(FlatRayError, match="not found"):
        read_reference(tmp_path / "missing")
    with pytest.raises(FlatRayError, match="no TOFU eval logs"):
        read_log_dir(tmp_path)
    (tmp_path / "eval_log.json").write_text(json.dumps({"avg_gt_loss": {"0": 1.0}}))
    with pytest.raises(FlatRayError, match="lacks 'avg_paraphrased_loss'"):
        read_log_dir(tmp_path)
