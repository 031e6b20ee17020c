"""flat_ray.report: a trial's one result (its best checkpointed epoch), the Pareto front, the HTML page and the
method column read back from MLflow."""

from __future__ import annotations

import json
import math

from flat_ray.report import front_points, html_report


def test_a_trials_result_is_its_best_checkpointed_epoch_the_later_of_equals():
    from flat_ray.metrics import best_epoch
    from flat_ray.report import trial_result

    history = {"unlearn_score": {0: 0.9, 1: 0.3, 2: 0.6, 3: 0.6, 4: 0.2}, "forget_prob": {0: 0.9, 1: 0.5, 2: 0.4,
                                                                                            3: 0.3, 4: 0.1}}
    params = {"optim.epochs": "4", "launch.checkpoint_every_epochs": "1"}
    # epoch 0 (the model before unlearning) is never a result; 2 and 3 tie: the later, as export's `choose`
    assert trial_result(history, params, "unlearn_score") == (3, {"unlearn_score": 0.6, "forget_prob": 0.3})
    assert trial_result(history, params, "forget_prob")[0] == 4  # lower is better
    # checkpoints every 3rd epoch and the last: only 3 and 4 could be exported
    assert trial_result(history, {**params, "launch.checkpoint_every_epochs": "3"}, "forget_prob")[0] == 4
    assert trial_result({"unlearn_score": {1: 0.5, 2: 0.7, 3: 0.9, 4: 0.1}},
                        {**params, "launch.checkpoint_every_epochs": "2"}, "unlearn_score")[0] == 2
    # no value of the metric (evaluation without it): the last evaluation
    assert trial_result({"forget_prob": {0: 0.9, 1: 0.5}}, params, "unlearn_score") == (1, {"forget_prob": 0.5})
    assert best_epoch({1: math.nan, 2: 0.4}, "forget_prob") == 2 and best_epoch({}, "forget_prob") is None


def test_the_model_before_unlearning_is_on_the_front_when_nothing_beats_its_utility():
    # forget_prob: lower is better; retain_prob: higher is better
    trials = [(0.2, 0.7), (0.4, 0.9), (0.5, 0.8)]  # (0.5, 0.8) is dominated by (0.4, 0.9)
    assert front_points(trials, (0.99, 0.99), "forget_prob", "retain_prob") == [(0.2, 0.7), (0.4, 0.9), (0.99, 0.99)]
    assert front_points(trials, (0.99, 0.5), "forget_prob", "retain_prob") == [(0.2, 0.7), (0.4, 0.9)]


def test_html_report_is_one_page_with_every_row_and_the_plots_inline(tmp_path):
    png = tmp_path / "pareto_x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    state = {"name": "s1", "space": "demo", "objective": ["unlearn_score"], "modes": ["max"], "parent_run_id": "abc"}
    rows = [{"model": "demo", "method": "(before unlearning)", "lr": None, "unlearn_score": 0.01},
            {"model": "demo", "method": "flat/kl", "lr": 6e-4, "unlearn_score": 0.75}]
    page = html_report(state, {"demo/forget10": rows}, [], [png])
    assert page.startswith("<!DOCTYPE html>") and "<h2>demo/forget10</h2>" in page
    assert "<td>(before unlearning)</td>" in page and "<td>flat/kl</td><td>0.0006</td><td>0.7500</td>" in page
    assert 'src="data:image/png;base64,iVBORw0KGgpmYWtl"' in page
    assert "<code>abc</code>" in page


def test_a_sweep_reports_lora_trials_as_their_own_method(tmp_path):
    """The report's method column (and every table grouped by it) says +lora for a LoRA trial, read back from the
    trial's MLflow params, so a sweep comparing both never mixes them in one row."""
    from flat_ray import tracking
    from flat_ray.report import collect
    from flat_ray.sweep_state import SWEEP_FILE

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.start_run(uri, "s", "s", tmp_path / "art", {"flat_ray.role": "sweep"})
    for name, rank in (("full", 0), ("adapted", 8)):
        trial = tracking.start_run(uri, "s", name, tmp_path / "art", {
            "mlflow.parentRunId": parent.run_id, "method": "flat", "divergence": "kl", "flat_ray.trial": name})
        trial.log_params({"model.lora_rank": rank, "optim.lr": 1e-4, "optim.epochs": 1})
        trial.log_metrics({"eval/forget_prob": 0.5}, step=1)
        trial.close()
    (tmp_path / SWEEP_FILE).write_text(json.dumps({"mlflow_uri": uri, "parent_run_id": parent.run_id,
                                                   "objective": ["forget_prob"]}))
    _, trials = collect(tmp_path)
    assert {t.name: t.group for t in trials} == {"full": "flat/kl", "adapted": "flat+lora/kl"}


def test_privleak_and_extraction_strength_columns_appear_where_the_trials_have_them():
    """Open-unlearning's table shows PrivLeak and extraction strength beside forget quality and utility: a report
    adds them to a benchmark's table when its trials computed them (TOFU-style with held-out questions), not to a
    benchmark without them (MUSE's own privleak is already in its space's columns)."""
    from flat_ray.report import PRIVACY_COLUMNS, _fmt, _privacy_columns, table_rows

    def trial(name, final, before):
        from flat_ray.report import Trial
        return Trial(name, "r", "finished", "demo", "demo/forget10", "flat", "kl", 5e-4, final, before, epoch=2)

    tofu_like = [trial("a", {"tofu_score": 0.8, "privleak": -40.0, "extraction_strength": 0.3},
                       {"tofu_score": 0.5, "privleak": -95.0, "extraction_strength": 0.9})]
    assert _privacy_columns(tofu_like, ["tofu_score", "forget_quality"]) == list(PRIVACY_COLUMNS)
    rows = table_rows(tofu_like, "tofu_score", ["forget_quality", *_privacy_columns(tofu_like, ["tofu_score"])])
    assert rows[0]["privleak"] == -95.0 and rows[1]["extraction_strength"] == 0.3  # before, then the method
    assert _privacy_columns([trial("b", {"unlearn_score": 0.7}, {"unlearn_score": 0.1})], ["unlearn_score"]) == []
    assert _privacy_columns(tofu_like, ["tofu_score", "privleak"]) == ["extraction_strength"]  # never twice
    assert _fmt("privleak", -40.0) == "-40.0"
