"""What a person sees: the per-epoch metric table, progress lines at a bounded rate off a terminal, the sweep's
per-trial lines, and the report's self-contained HTML page and Pareto front."""

from __future__ import annotations

import io

from flat_ray.console import RunConsole, SweepBoard, metrics_table


def test_metrics_table_puts_each_split_on_a_row_and_aligns_the_rest():
    table = metrics_table({"forget_prob": 0.5, "forget_rougeL_recall": 0.25, "forget_truth_ratio": 0.0001234,
                           "retain_prob": 0.98765, "model_utility": 0.4, "unlearn_score": 12.0}, "after epoch 1")
    assert table.splitlines() == [
        "after epoch 1",
        "split     prob  rougeL_recall  truth_ratio",
        "forget  0.5000         0.2500    1.234e-04",
        "retain  0.9877              -            -",
        "model_utility  0.4000",
        "unlearn_score  12.0000",
    ]


def _lines(events) -> list[str]:
    out = io.StringIO()  # not a terminal: plain lines
    console = RunConsole("run-a", stream=out)
    for event in events:
        console.handle(event)
    console.close()
    return out.getvalue().splitlines()


def test_progress_off_a_terminal_is_one_line_per_tenth_of_training_not_per_step():
    steps = [{"kind": "step", "step": s, "epoch": 1 + (s - 1) // 50, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 101)]
    lines = _lines([{"kind": "start", "total_steps": 100, "epochs": 2, "step": 0}, *steps])
    assert len(lines) == 10
    assert lines[0] == "run-a: step 10/100 (epoch 1) loss 0.10000 lr 1.00e-03"
    assert lines[-1].startswith("run-a: step 100/100 (epoch 2)")


def test_evaluation_and_messages_are_labelled_with_the_run():
    lines = _lines([{"kind": "eval", "epoch": 2, "split": "forget", "done": 0, "total": 4},
                    {"kind": "eval", "epoch": 2, "split": "retain", "done": 1, "total": 4},
                    {"kind": "metrics", "epoch": 2, "metrics": {"forget_prob": 0.25}},
                    {"kind": "line", "text": "exported /x/model"}])
    assert lines == ["run-a: evaluating (epoch 2, 4 splits)", "run-a: evaluation after epoch 2",
                     "split     prob  rougeL_recall  truth_ratio", "forget  0.2500              -            -",
                     "run-a: exported /x/model"]


def test_sweep_board_off_a_terminal_prints_one_line_per_finished_or_failed_trial():
    said: list[str] = []
    board = SweepBoard(["forget_prob"], ["min"], said.append, stream=io.StringIO())
    board.started("t1", "lr=0.001")
    board.result("t1", {"epoch": 1, "trained_epochs": 1, "forget_prob": 0.5})
    board.result("t1", {"epoch": 2, "trained_epochs": 3, "forget_prob": 0.25})
    assert board.rows["t1"]["epoch"] == 3  # how far it got; the value is its best epoch's
    board.finished("t1", {"epoch": 2, "trained_epochs": 3, "forget_prob": 0.25}, "lr=0.001")
    board.failed("t2", "/ray/t2")
    board.close()
    assert said == ["trial t1 done: lr=0.001 -> forget_prob=0.25 (best epoch 2)", "trial t2 FAILED: see /ray/t2/error.txt"]
    assert board.best == 0.25 and board.rows["t2"]["state"] == "FAILED (/ray/t2/error.txt)"


def test_train_summary_without_evaluation_prints_no_empty_table_and_links_the_runs_table(capsys, tmp_path):
    from cli.main import _summary
    from flat_ray import tracking
    from flat_ray.launch.driver import TrainResult

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tracking.start_run(uri, "exp", "r1", tmp_path / "art", {})
    _summary(TrainResult("r1", run.run_id, uri, tmp_path / "model", seconds=3.0))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "run r1 finished in 3 s" and not any(line.startswith("split") for line in lines)
    experiment = tracking.experiment_id(uri, run.run_id)
    assert lines[-1].endswith(f"then open http://127.0.0.1:5000/#/experiments/{experiment}/runs")
    assert tracking._client(uri).get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"


def test_git_commit_outside_a_checkout_comes_from_pips_install_record(monkeypatch):
    import subprocess

    from flat_ray import tracking

    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, "git")  # not inside a git checkout

    class Installed:
        @staticmethod
        def read_text(name):
            assert name == "direct_url.json"
            return '{"url": "https://github.com/x/flat_ray", "vcs_info": {"vcs": "git", "commit_id": "0123abc"}}'

    monkeypatch.setattr(tracking.subprocess, "run", no_git)
    monkeypatch.setattr(tracking.metadata, "distribution", lambda name: Installed)
    assert tracking.git_sha() == "0123abc"
    assert tracking.standard_tags("flat-ray train")["mlflow.source.git.commit"] == "0123abc"
    # a venv inside some other repository: that repository's HEAD is not flat_ray's commit
    monkeypatch.setattr(tracking.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "/elsewhere\nfff\n"))
    assert tracking.git_sha() == "0123abc"
    monkeypatch.setattr(tracking.metadata, "distribution", lambda name: type("Plain", (), {"read_text": staticmethod(lambda n: None)}))
    assert tracking.git_sha() is None and "mlflow.source.git.commit" not in tracking.standard_tags("flat-ray train")
