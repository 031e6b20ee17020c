"""A cell's original evaluated once: the cache key, the values kept and read back, and the claim that makes the
other trials of a cell wait (with their workers) for the one evaluating it."""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from flat_ray.config import load_config
from flat_ray.eval import original
from flat_ray.eval.tofu import SplitValues, summarize


def test_the_key_follows_what_shapes_the_evaluation_and_nothing_else():
    base = load_config(None, [])
    same = ["optim.lr=1e-3", "method.divergence=kl", "eval.truth_ratio=geometric", "eval.interim_examples=null",
            "eval.every_epochs=2", "model.gradient_checkpointing=true", "eval.save_logs=true"]
    for override in same:
        assert original.key(load_config(None, [override])) == original.key(base), override
    for override in ("eval.max_examples=3", "eval.max_new_tokens=5", "data.max_length=64", "data.split=forget05",
                     "deepspeed.precision=bf16", "model.name_or_path=demo", "eval.batch_size=2"):
        assert original.key(load_config(None, [override])) != original.key(base), override


def _values(seed: int) -> dict[str, SplitValues]:
    rng = np.random.default_rng(seed)
    return {s: SplitValues(rng.random(4), rng.random(4), rng.random((4, 3)), rng.random(4), [["q", "g", "t"]] * 4)
            for s in ("forget", "retain", "real_authors", "world_facts")}


def test_values_kept_once_and_read_back_give_the_same_summary(tmp_path):
    folder = tmp_path / "cell" / "k"
    assert original.load(folder) is None
    values = _values(0)
    assert original.save(folder, values, {"run": "a"}) is True
    assert original.save(folder, _values(1), {"run": "b"}) is False  # the first copy stays
    back = original.load(folder)
    reference = np.array([0.5, 1.5, 2.0, 0.7])
    assert summarize(back, reference_tr=reference) == summarize(values, reference_tr=reference)
    assert not list((tmp_path / "cell").glob("*.partial-*"))


def _t(name: str) -> dict[str, str]:
    return {"trial": name, "run": f"run-{name}"}


def test_a_trial_waits_for_the_one_evaluating_and_takes_over_from_one_that_ended(tmp_path):
    folder = tmp_path / "cell" / "k"
    ended: set[str] = set()

    def gone(holder: dict) -> bool:
        return holder["trial"] in ended

    assert original.claim(folder, _t("t0"), gone, poll_s=0.01) is True  # first: it evaluates
    assert original.claim(folder, _t("t0"), gone, poll_s=0.01) is True  # t0 again (a restarted worker group)
    assert original.try_claim(folder, _t("t1"), gone) is None  # t0 holds the claim and has not ended
    got: dict[str, bool] = {}
    waiter = threading.Thread(target=lambda: got.update(t1=original.claim(folder, _t("t1"), gone, 0.01)))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()
    original.save(folder, _values(0), {})
    waiter.join(5)
    assert got == {"t1": False}  # the values are there: t1 reads them
    # a holder that ended without leaving values: the next trial takes over
    other = tmp_path / "cell" / "k2"
    assert original.claim(other, _t("t2"), gone, 0.01) is True
    ended.add("t2")
    assert original.claim(other, _t("t3"), gone, 0.01) is True
    # a run that failed before evaluating hands its claim on at once; one that left its values keeps it
    third = tmp_path / "cell" / "k3"
    assert original.claim(third, _t("t5"), gone, 0.01) is True
    original.release(third, "t6")  # not the holder: nothing happens
    assert original.try_claim(third, _t("t7"), gone) is None
    original.release(third, "t5")
    assert original.claim(third, _t("t7"), gone, 0.01) is True
    original.save(folder, _values(0), {})
    original.release(folder, "t0")
    assert (tmp_path / "cell" / "k.claim").is_file()
    # claims left by an interrupted sweep are void at the cell's start
    original.release_claims(tmp_path / "cell")
    assert not list((tmp_path / "cell").glob("*.claim"))


def test_a_claim_being_written_is_held_and_an_old_plain_text_one_names_its_trial(tmp_path):
    folder = tmp_path / "cell" / "k"
    claim_file = tmp_path / "cell" / "k.claim"
    folder.parent.mkdir(parents=True)
    claim_file.write_text("")  # made, its holder not written yet: nobody may take it, however ended() answers
    assert original.try_claim(folder, _t("t1"), lambda holder: True) is None
    claim_file.write_text("t0")  # the form of older versions: its trial's name only
    seen: list[dict] = []
    assert original.try_claim(folder, _t("t1"), lambda holder: seen.append(holder) or False) is None
    assert seen == [{"trial": "t0", "run": None}]
    original.release(folder, "t0")
    assert not claim_file.exists()
    claim_file.write_text("12")  # a name that happens to read as JSON is still a name
    assert original.try_claim(folder, _t("12"), lambda holder: False) is True
    claim_file.unlink()
    assert original.try_claim(folder, _t("t1"), lambda holder: False) is True
    assert json.loads(claim_file.read_text()) == _t("t1")  # the claim names its run, for ended() to look up


def test_the_ranks_of_a_trial_take_the_answer_of_rank_0(tmp_path):
    """Only rank 0 tries; every rank gets its answer through ``share`` (a broadcast in the run) at each poll."""
    folder = tmp_path / "cell" / "k"
    assert original.claim(folder, _t("t0"), lambda holder: False) is True
    polls: list[bool | None] = []
    answers = iter([None, None, False])  # what rank 0 broadcast: waiting twice, then the values are complete

    def share(answer):
        polls.append(answer)
        return next(answers)

    assert original.claim(folder, _t("t1"), lambda holder: False, poll_s=0.01, share=share, leader=False) is False
    assert polls == [None, None, None]  # a rank other than 0 never tries the claim itself


def test_a_holder_has_ended_once_its_mlflow_run_is_no_longer_running(tmp_path):
    from flat_ray import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tracking.start_run(uri, "cell", "t0", tmp_path / "artifacts", {}).run_id
    ended = original.run_ended(uri)
    assert ended({"trial": "t0", "run": run}) is False  # RUNNING
    assert ended({"trial": "t0", "run": None}) is True  # an old claim without its run
    tracking.set_status(uri, run, "FAILED")
    assert ended({"trial": "t0", "run": run}) is True
