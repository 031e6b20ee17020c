"""The MLflow record of a run and of a sweep (flat_ray.launch.records): what a resume finds after the driver died at
any point of opening it."""
from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from flat_ray import tracking
from flat_ray.config import load_config
from flat_ray.launch import records


def test_a_driver_killed_while_opening_its_run_is_resumed_into_that_run(tmp_path, tiny_model_dir, monkeypatch):
    """The state file exists as soon as the MLflow run does: a driver that dies while logging the run's inputs
    (here: after its params, before its dataset) leaves a run that `--resume` reopens and completes (params, dataset,
    config), never a second run."""
    from tests.runs import tiny_overrides

    cfg = load_config(None, [*tiny_overrides(tiny_model_dir, tmp_path), "tracking.run_name=opened"])
    cfg, uri, storage, name, state = records.prepare_run(cfg, None)

    def die(*_args):
        raise KeyboardInterrupt  # the driver's death after the params, before the dataset (CI once hit this window)

    with monkeypatch.context() as m:
        m.setattr(records, "log_split", die)
        with pytest.raises(KeyboardInterrupt):
            records.open_run(cfg, uri, storage, name, state, str(tiny_model_dir), None)
    saved = json.loads((storage / name / records.STATE_FILE).read_text())
    killed = tracking.run_data(uri, saved["run_id"])
    assert killed.data.params and not killed.inputs.dataset_inputs

    cfg2, uri2, _, _, state2 = records.prepare_run(cfg, name)  # `flat-ray train --resume opened`
    tracker, output_dir = records.open_run(cfg2, uri2, storage, name, state2, str(tiny_model_dir), None)
    run = tracking.run_data(uri, tracker.run_id)
    assert tracker.run_id == saved["run_id"] and str(output_dir) == saved["output_dir"]
    assert run.data.tags["resumed"] == "true" and run.info.status == "RUNNING"
    assert run.data.params["optim.lr"] == str(cfg.optim.lr)
    assert "config.yaml" in tracking.list_artifacts(uri, tracker.run_id)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == f"{cfg.data.benchmark}/{cfg.data.split}"
    records.log_inputs(tracker, cfg2, str(tiny_model_dir), output_dir)  # once more: still one dataset input
    assert len(tracking.run_data(uri, tracker.run_id).inputs.dataset_inputs) == 1
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [saved["run_id"]]


def test_a_sweep_killed_while_opening_its_parent_run_is_resumed_into_it(tmp_path, tiny_model_dir, monkeypatch):
    """The same for `flat-ray tune`: the sweep state exists as soon as the parent run does, so a sweep driver that
    dies while logging the parent's inputs (after its params, before its datasets) is resumed into that parent run,
    which the resume completes (params, dataset, space, trial table); the experiment holds no second parent."""
    from flat_ray.launch import tune
    from flat_ray.sweep import load_space
    from flat_ray.sweep_state import SWEEP_FILE, saved_space

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "space.yaml"
    path.write_text(f"base: [demo]\nset: {{model.name_or_path: {tiny_model_dir}, data.split: forget05}}\n"
                    "grid: {method: [flat]}\nparams: {optim.lr: {grid: [1.0e-3]}}\n")

    def die(*_args):
        raise KeyboardInterrupt

    space, sweep_dir, storage, uri = tune.plan_sweep(load_space(str(path)), name="opened", address=None,
                                                     storage_path=None, mlflow_uri=None)
    with monkeypatch.context() as m:
        m.setattr(records, "log_split", die)
        with pytest.raises(KeyboardInterrupt):
            records.open_parent(space, "opened", sweep_dir, storage, uri, "the trial table", None, None, {})
    saved = json.loads((sweep_dir / SWEEP_FILE).read_text())
    killed = tracking.run_data(uri, saved["parent_run_id"])
    assert killed.data.params and not killed.inputs.dataset_inputs

    space2, state = saved_space(str(sweep_dir))  # `flat-ray tune --resume opened`
    space2, sweep_dir2, storage2, uri2 = tune.plan_sweep(space2, name="opened", address=None, storage_path=None,
                                                         mlflow_uri=state["mlflow_uri"])
    parent = records.open_parent(space2, "opened", sweep_dir2, storage2, uri2, "the trial table", None, None, state)
    run = tracking.run_data(uri, parent.run_id)
    assert parent.run_id == saved["parent_run_id"] and run.data.tags["resumed"] == "true"
    assert run.data.params["resolved.git_sha"] and [d.dataset.name for d in run.inputs.dataset_inputs] == ["demo/forget05"]
    assert {"space.yaml", "trials.txt"} <= set(tracking.list_artifacts(uri, parent.run_id))
    client = MlflowClient(uri)
    assert [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("opened").experiment_id])] == [
        parent.run_id]


