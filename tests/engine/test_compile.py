"""``deepspeed.compile``: the real per-worker loop (benchmarks/gpu_path.py's, without Ray) trained compiled and eager."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_compiled_training_gives_the_eager_losses_and_evaluates_eager(tmp_path):
    """benchmarks/gpu_path.py on CPU with a tiny model (both variants in one process, one after the other): the compiled
    run has compiled graphs, none of them made by its evaluations (which run eager: compiling generation's ever new
    shapes took 56 s here against 0.4 s eager), and trains to the eager run's losses."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_path.py"), "--device", "cpu", "--tiny",
                           "--out", str(tmp_path), "--variants", "zero0,zero0-compiled"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eager, compiled = (json.loads((tmp_path / f"{v}.json").read_text()) for v in ("zero0", "zero0-compiled"))
    assert not eager["compiled"] and eager["graphs_compiled"] == 0
    assert compiled["compiled"] and compiled["graphs_compiled"] > 0 and compiled["graphs_compiled_by_eval"] == 0
    assert len(compiled["losses"]) == len(eager["losses"]) == 2 * eager["steps_per_epoch"] == 16
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-3, abs=1e-8)
    # all questions before training and at the end, the interim quarter after epoch 1
    assert eager["eval_examples"] == compiled["eval_examples"] == {"0": 4.0, "1": 1.0, "2": 4.0}
    table = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("zero")]
    assert table == ["zero0", "zero0-compiled"]  # one row each
