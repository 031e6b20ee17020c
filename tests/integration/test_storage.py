"""Cloud storage for real: the suite's `flat-ray train` run with a lost worker and a killed driver keeps its Ray state
in ``s3://`` on a local S3 server (moto in server mode, fixture ``s3_bucket``; tests/runs.py and
tests/integration/test_reliability.py), and the Optuna/ASHA sweep of tests/integration/test_tune.py runs there too.
Here: what a finished run leaves in the bucket, and `flat-ray export` from it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flat_ray.export import kept_checkpoints
from tests.test_cli import run_main

pytestmark = pytest.mark.slow


def test_export_fetches_a_kept_checkpoint_from_the_bucket(interrupted, tmp_path, capsys):
    """After the run finished, its 2 latest complete checkpoints stay in the bucket (launch.keep_checkpoints=2) and
    the planted, cut-short newer one is gone with the others. `flat-ray export s3://…/interrupted --epoch last`
    fetches the last one, joins the 2 ranks' ZeRO-3 shards and writes the model its workers exported."""
    run = interrupted.run_dir
    assert [k.epoch for k in kept_checkpoints(run)] == [3, 4]
    assert not interrupted.half_written.exists() and len(run.dirs("checkpoint_")) == 2
    code, out, err = run_main(["export", run.uri, "--epoch", "last", "--out", str(tmp_path / "model")], capsys)
    assert code == 0 and "exported epoch 4 of interrupted" in out, err
    ours = load_file(tmp_path / "model" / "model.safetensors")
    theirs = load_file(interrupted.work / "runs" / "interrupted" / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
