"""open-unlearning's TOFU result files written from per-question values: every number as their evaluator's code
computes it (written out here from src/evals/metrics/memorization.py, privacy.py and utility.py), their ks_test
reading our file as its retain_logs_path, and the round trip through ``eval.reference``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import hmean, ks_2samp

from flat_ray.errors import FlatRayError
from flat_ray.eval import open_unlearning
from flat_ray.eval.tofu import SplitValues, read_log_dir, read_reference, summarize
from tests.eval.test_tofu import SHARED


@pytest.fixture(scope="module")
def published():
    root = SHARED / "tofu_eval_logs"
    if not (root / "llama2-7b_full" / "eval_log.json").is_file():
        pytest.skip(f"TOFU's published eval logs not found at {root} (../shared/data is absent on this checkout)")
    return {name: read_log_dir(root / name) for name in ("llama2-7b_full", "llama2-7b_retain90")}


def _theirs_truth_ratio(correct_avg_loss, wrong_avg_losses, aggregator):
    """open-unlearning's truth_ratio handler: wrong = exp(-mean avg_loss over the perturbed answers)."""
    correct = np.exp(-np.asarray(correct_avg_loss))
    wrong = np.exp(-np.mean(np.asarray(wrong_avg_losses), axis=1))
    scores = wrong / (correct + 1e-10)
    if aggregator == "closer_to_1_better":
        return scores, np.mean(np.minimum(scores, 1 / (scores + 1e-10)))
    return scores, np.mean(np.maximum(0, 1 - scores))


def _theirs_normalised(correct_avg_loss, wrong_avg_losses):
    correct = np.exp(-np.asarray(correct_avg_loss))
    wrong = np.sum(np.exp(-np.asarray(wrong_avg_losses)), axis=1)
    return np.mean(correct / (correct + wrong + 1e-10))


def test_every_number_is_open_unlearnings(published, tmp_path):
    full = published["llama2-7b_full"]
    path = open_unlearning.write(tmp_path, full)
    logs = json.loads(path.read_text())
    summary = json.loads((tmp_path / "TOFU_SUMMARY.json").read_text())
    by_index = {k: [v["value_by_index"][i] for i in sorted(v["value_by_index"], key=int)]
                for k, v in logs.items() if "value_by_index" in v}

    f = full["forget"]
    scores, agg = _theirs_truth_ratio(f.avg_paraphrased_loss, f.average_perturb_loss, "closer_to_1_better")
    assert [r["score"] for r in by_index["forget_truth_ratio"]] == pytest.approx(scores.tolist(), rel=1e-12)
    assert logs["forget_truth_ratio"]["agg_value"] == pytest.approx(agg, rel=1e-12)
    assert logs["forget_Q_A_Prob"]["agg_value"] == pytest.approx(np.mean(np.exp(-f.avg_gt_loss)), rel=1e-12)
    assert by_index["forget_Q_A_PERT_Prob"][0]["avg_loss"] == f.average_perturb_loss[0].tolist()
    assert by_index["forget_Q_A_ROUGE"][7]["rougeL_recall"] == f.rougeL_recall[7]
    assert by_index["forget_Q_A_ROUGE"][7]["generation"] == f.generated_text[7][1]

    r, ra, wf = full["retain"], full["real_authors"], full["world_facts"]
    nine = [np.mean(np.exp(-r.avg_gt_loss)), np.mean(r.rougeL_recall),
            _theirs_truth_ratio(r.avg_paraphrased_loss, r.average_perturb_loss, "true_better")[1]]
    for split in (ra, wf):
        nine += [_theirs_normalised(split.avg_gt_loss, split.average_perturb_loss), np.mean(split.rougeL_recall),
                 _theirs_truth_ratio(split.avg_gt_loss, split.average_perturb_loss, "true_better")[1]]
    assert [logs[k]["agg_value"] for k in open_unlearning.UTILITY_KEYS] == pytest.approx(nine, rel=1e-9)
    assert logs["model_utility"]["agg_value"] == pytest.approx(hmean(nine), rel=1e-12)
    assert summary["model_utility"] == logs["model_utility"]["agg_value"]
    # their model utility is flat_ray's with the geometric truth ratio where, as in flat_ray's own evaluation, the
    # "paraphrase" of a real-authors / world-facts question is its answer (TOFU's logs hold a second pass's loss
    # there, a little different: 0.62263 against 0.62268); the arithmetic default gives TOFU's 0.5859
    import dataclasses

    same = {k: dataclasses.replace(v, avg_paraphrased_loss=v.avg_gt_loss) if k in ("real_authors", "world_facts")
            else v for k, v in full.items()}
    assert hmean(nine) == pytest.approx(summarize(same, truth_ratio="geometric")["model_utility"], rel=1e-7)  # their 1e-10s
    assert hmean(nine) == pytest.approx(0.622625, abs=5e-7)
    assert summarize(full, truth_ratio="geometric")["model_utility"] == pytest.approx(0.622677, abs=5e-7)
    assert "forget_quality" not in logs  # no reference given


def test_their_ks_test_reads_our_file_as_its_retain_logs(published, tmp_path):
    """Their forget_quality: ks_test on pre_compute forget (this model's forget_truth_ratio) against
    reference_logs.retain_model_logs.retain (the retain model's file, key forget_truth_ratio)."""
    retain_file = open_unlearning.write(tmp_path / "retain90", published["llama2-7b_retain90"])
    retain_logs = json.loads(retain_file.read_text())
    full = open_unlearning.eval_logs(published["llama2-7b_full"], open_unlearning.forget_scores(retain_logs))
    forget_tr_stats = np.array([e["score"] for e in full["forget_truth_ratio"]["value_by_index"].values()])
    retain_tr_stats = np.array([e["score"] for e in retain_logs["forget_truth_ratio"]["value_by_index"].values()])
    theirs = ks_2samp(forget_tr_stats, retain_tr_stats).pvalue
    assert full["forget_quality"]["agg_value"] == pytest.approx(theirs, rel=1e-12)
    assert theirs == pytest.approx(1.834e-21, rel=5e-4)  # TOFU's check value, in their orientation too


def test_written_then_read_back_as_a_reference_gives_forget_quality_1_against_itself(published, tmp_path):
    retain = published["llama2-7b_retain90"]
    open_unlearning.write(tmp_path / "retain90", retain)
    for ref in (tmp_path / "retain90", tmp_path / "retain90" / "TOFU_EVAL.json"):  # the folder or the file
        reference, source = read_reference(ref)
        assert source == f"open-unlearning:{tmp_path / 'retain90' / 'TOFU_EVAL.json'}"
        assert summarize(retain, reference_tr=reference)["forget_quality"] == 1.0
        full = summarize(published["llama2-7b_full"], reference_tr=reference)["forget_quality"]
        assert full == pytest.approx(1.834e-21, rel=5e-4)


def test_by_hand_and_uneven_perturbed_answers(tmp_path):
    """One forget question: L(answer) 1, L(paraphrase) 2, perturbed 3 and 4 -> score exp(-3.5) / (exp(-2) + 1e-10);
    a world-facts question with two perturbed answers where the other has three."""
    forget = SplitValues(np.array([1.0]), np.array([2.0]), np.array([[3.0, 4.0]]), np.array([0.5]), [["q", "g", "t"]])
    wf = SplitValues(np.array([1.0, 2.0]), np.array([1.0, 2.0]), np.array([[2.0, 3.0, 4.0], [1.0, 2.0, math.nan]]),
                     np.array([1.0, 0.0]))
    logs = open_unlearning.eval_logs({"forget": forget, "world_facts": wf})
    score = math.exp(-3.5) / (math.exp(-2.0) + 1e-10)
    assert logs["forget_truth_ratio"]["value_by_index"]["0"]["score"] == pytest.approx(score, rel=1e-12)
    assert logs["forget_truth_ratio"]["agg_value"] == pytest.approx(min(score, 1 / (score + 1e-10)), rel=1e-12)
    assert logs["forget_Q_A_ROUGE"]["value_by_index"]["0"] == {"rougeL_recall": 0.5, "input": "q", "generation": "g",
                                                               "ground_truth": "t"}
    assert logs["wf_Q_A_PERT_Prob"]["value_by_index"]["1"]["avg_loss"] == [1.0, 2.0]  # no NaN in their file
    second = math.exp(-2.0) / (math.exp(-2.0) + math.exp(-1.0) + math.exp(-2.0) + 1e-10)
    assert logs["wf_Q_A_Prob_normalised"]["value_by_index"]["1"]["prob"] == pytest.approx(second, rel=1e-12)
    assert "model_utility" not in logs  # it needs all three utility splits


def test_a_reference_folder_without_either_format_names_what_it_found(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "eval_log.json").write_text("{}")
    with pytest.raises(FlatRayError, match=r"has no eval_log_forget.json \(TOFU's logs\) and no TOFU_EVAL.json "
                                           r"\(open-unlearning's\); JSON files there: eval_log.json"):
        read_reference(tmp_path / "ref")


def test_read_back_gives_the_same_per_question_values_and_the_reports_retain_row(published, tmp_path):
    """Their file holds every per-question loss flat_ray evaluates, so a reference given in their format has the
    same (retain model) row in a sweep's report as one in TOFU's, in the run's own truth-ratio variant."""
    import dataclasses

    from flat_ray.report import reference_metrics

    retain = {k: dataclasses.replace(v, avg_paraphrased_loss=v.avg_gt_loss) if k in ("real_authors", "world_facts")
              else v for k, v in published["llama2-7b_retain90"].items()}
    path = open_unlearning.write(tmp_path / "ou", retain)
    back = open_unlearning.read(path)
    assert list(back) == ["forget", "retain", "real_authors", "world_facts"]
    for split, v in retain.items():
        np.testing.assert_array_equal(back[split].avg_gt_loss, v.avg_gt_loss)
        np.testing.assert_array_equal(back[split].avg_paraphrased_loss, v.avg_paraphrased_loss)
        np.testing.assert_array_equal(back[split].average_perturb_loss, v.average_perturb_loss)
        np.testing.assert_array_equal(back[split].rougeL_recall, v.rougeL_recall)
    assert back["forget"].generated_text[3] == retain["forget"].generated_text[3]
    for variant in ("arithmetic", "geometric"):
        row = reference_metrics(str(path), variant)
        assert row["forget_quality"] == 1.0
        assert row["model_utility"] == pytest.approx(summarize(retain, truth_ratio=variant)["model_utility"], rel=1e-12)
    assert reference_metrics(str(tmp_path / "ou"), "arithmetic") == reference_metrics(str(path), "arithmetic")


def test_a_file_of_theirs_without_the_forget_split_is_refused_in_one_line(published, tmp_path):
    path = open_unlearning.write(tmp_path, {"retain": published["llama2-7b_retain90"]["retain"]})
    with pytest.raises(FlatRayError, match=r"has no forget_truth_ratio, so no forget split; metrics found: "
                                           r"retain_Q_A_PARA_Prob, retain_Q_A_PERT_Prob"):
        read_reference(path)
