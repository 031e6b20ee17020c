"""benchmarks/selectivity.py's bookkeeping: the splits it trains and evaluates on, and how it reads its grids."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("selectivity", ROOT / "benchmarks" / "selectivity.py")
selectivity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(selectivity)


def test_evaluated_retain_questions_are_never_trained_on_by_the_methods(tofu_mini, tmp_path):
    splits = selectivity.write_splits(tofu_mini, tmp_path)
    key = lambda rows: {r["question"] for r in rows}  # noqa: E731
    assert len(splits["forget"]) == 40 and len(splits["retain_eval"]) == 40 and len(splits["retain_train"]) == 160
    assert not key(splits["retain_eval"]) & key(splits["retain_train"])  # the methods' retain batches
    assert key(splits["full"]) == key(splits["forget"]) | key(splits["retain_eval"]) | key(splits["retain_train"])
    written = [json.loads(line) for line in (tmp_path / "retain_eval.jsonl").read_text().splitlines()]
    assert [r["question"] for r in written] == [r["question"] for r in splits["retain_eval"]]


def test_a_star_is_half_the_forget_and_four_fifths_of_the_retain_probability(capsys):
    res = {"size": "64x2", "params": 344384, "forget_prob": 0.8, "retain_prob": 0.9, "lrs": [1e-4, 2e-4, 3e-4],
           "rows": {"flat/kl": [[0.41, 0.9], [0.40, 0.721], [0.1, 0.719]], "npo": [[0.5, 0.9], [None, None], [0.7, 0.9]]}}
    assert selectivity.cell([0.40, 0.721], 0.8, 0.9).endswith("*")  # half, and just over 0.8x
    assert not selectivity.cell([0.41, 0.9], 0.8, 0.9).endswith("*")
    assert not selectivity.cell([0.1, 0.719], 0.8, 0.9).endswith("*")
    assert selectivity.cell([None, None], 0.8, 0.9) == "nan"
    lines = selectivity.summary(res)  # the best retain ratio among the cells that halve forget probability
    assert lines[0].split() == ["flat/kl", "keeps", "0.80", "of", "retain", "at", "lr", "2.0e-04", "(forget", "0.400,",
                                "retain", "0.721)"]
    assert lines[1].endswith("never halves forget probability on this grid")
    selectivity.show({"coarse": [res]})
    out = capsys.readouterr().out
    assert "| flat/kl | 0.410/0.900 | 0.400/0.721* | 0.100/0.719 |" in out and "| npo | 0.500/0.900 | nan |" in out


def test_the_replica_trains_on_the_device_it_is_given():
    from flat_ray.engine.step import to_device

    batch = {"forget": {"input_ids": torch.ones(2, 3, dtype=torch.long)}, "n": 2}
    moved = to_device(batch, "meta")
    assert moved["forget"]["input_ids"].device.type == "meta" and moved["n"] == 2
