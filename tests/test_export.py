"""flat_ray.export: which kept checkpoint an export takes, which ones stay, and the ZeRO-0 consolidation.
(ZeRO-3 over 2 ranks against the workers' own export: tests/integration/test_train.py; ZeRO-2: the sweep tests.)"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flat_ray.engine.checkpoint import EPOCH_FILE, write_manifest
from flat_ray.errors import FlatRayError
from flat_ray.export import choose, drop_checkpoints, kept_checkpoints
from flat_ray.storage import Place


def _checkpoint(run_dir: Path, name: str, epoch: int, metrics: dict, complete: bool = True) -> Path:
    path = run_dir / name
    (path / "ds").mkdir(parents=True)
    (path / "ds" / "shard.pt").write_bytes(b"x" * 100)
    (path / EPOCH_FILE).write_text(json.dumps({"epoch": epoch - 1, "global_step": 3 * epoch, "metrics": metrics,
                                               "dtype": "float32"}))
    write_manifest(path, 0, 1, {"epoch": epoch - 1, "global_step": 3 * epoch})
    if not complete:  # cut short after its manifest was written
        (path / "ds" / "shard.pt").write_bytes(b"x" * 50)
    return path


@pytest.fixture
def run_dir(tmp_path):
    # forget_prob (lower is better) per epoch: epoch 2 and 4 tie for the best, epoch 3 was not evaluated
    for i, (epoch, metrics) in enumerate([(1, {"forget_prob": 0.5}), (2, {"forget_prob": 0.2}), (3, {}),
                                          (4, {"forget_prob": 0.2}), (5, {"forget_prob": 0.4})]):
        _checkpoint(tmp_path, f"checkpoint_2026-01-0{i + 1}", epoch, metrics)
    _checkpoint(tmp_path, "checkpoint_2026-01-09", 6, {"forget_prob": 0.0}, complete=False)
    return tmp_path


def test_choose_takes_the_best_the_last_or_an_epoch_among_complete_checkpoints(run_dir):
    kept = kept_checkpoints(Place.of(run_dir))
    assert [k.epoch for k in kept] == [1, 2, 3, 4, 5]  # the cut-short epoch 6 is not a candidate
    assert choose(kept, "best", "forget_prob").epoch == 4  # a tie goes to the later epoch
    assert choose(kept, "last", None).epoch == 5 and choose(kept, "3", None).epoch == 3
    with pytest.raises(FlatRayError, match=r"^--epoch 7: choose best, last or a kept epoch \(1, 2, 3, 4, 5\)$"):
        choose(kept, "7", None)
    with pytest.raises(FlatRayError, match="needs the run's launch.checkpoint_metric"):
        choose(kept, "best", None)
    with pytest.raises(FlatRayError, match="kept no complete checkpoint"):
        choose([], "last", None)


def test_dropping_keeps_the_best_by_the_metric_else_the_latest(run_dir):
    place = Place.of(run_dir)
    left = drop_checkpoints(place, 2, "forget_prob")
    assert [k.epoch for k in kept_checkpoints(place)] == [2, 4]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_2026-01-02", "checkpoint_2026-01-04"]
    assert left == pytest.approx(sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) / 2**20)
    assert drop_checkpoints(place, 1, None) > 0 and [k.epoch for k in kept_checkpoints(place)] == [4]
    assert drop_checkpoints(place, 0, None) == 0 and not list(run_dir.iterdir())


def test_without_a_metric_the_latest_complete_checkpoints_stay_and_a_cut_short_one_goes(run_dir):
    """The cut-short folder is the newest by name (Ray names folders by time), yet it is the first to go."""
    place = Place.of(run_dir)
    drop_checkpoints(place, 2, None)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_2026-01-04", "checkpoint_2026-01-05"]


def test_a_zero0_checkpoint_consolidates_to_the_engines_weights(tiny_model_dir, tmp_path):
    """A DeepSpeed ZeRO-0 engine (one rank, gloo) takes a step and saves a checkpoint; the weights joined from it
    without an engine are the engine's module's, tensor for tensor (stage 0 has no optimizer partitions: its one
    model file holds them, read with weights_only)."""
    script = textwrap.dedent(f"""
        import os, torch
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        from flat_ray.config import load_config
        from flat_ray.engine import ds
        cfg = load_config(None, ["deepspeed.stage=0", "launch.num_workers=1", "optim.micro_batch_size=1"])
        ds.init_distributed(0, 1, 0)
        engine = ds.build_engine(ds.load_model({str(tiny_model_dir)!r}, ds.build_config(cfg, 1)),
                                 ds.build_config(cfg, 1), lambda step: 1.0)
        loss = engine(input_ids=torch.tensor([[1, 5, 9, 4]]), labels=torch.tensor([[1, 5, 9, 4]])).loss
        engine.backward(loss)
        engine.step()
        ds.save_checkpoint(engine, {str(tmp_path / "ckpt")!r}, {{"epoch": 0}})
        joined = ds.consolidated_state_dict({str(tmp_path / "ckpt")!r})
        own = engine.module.state_dict()
        assert joined.keys() == own.keys(), (joined.keys() ^ own.keys())
        assert all(torch.equal(joined[k], own[k]) for k in own)
        print("same", len(own))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-2] == "same", proc.stderr[-3000:]


