"""The drivers' bookkeeping around a run and a sweep: what a resume finds after the driver died at any point of
opening it, and the placement groups a dead Ray Train controller leaves behind."""
from __future__ import annotations

import json
import time

import pytest
from mlflow.tracking import MlflowClient

from flat_ray import tracking
from flat_ray.config import load_config
from flat_ray.launch import driver


def test_a_driver_killed_while_opening_its_run_is_resumed_into_that_run(tmp_path, tiny_model_dir, monkeypatch):
    """The state file exists as soon as the MLflow run does: a driver that dies while logging the run's inputs
    (here: after its params, before its dataset) leaves a run that `--resume` reopens and completes (params, dataset,
    config), never a second run."""
    from tests.runs import tiny_overrides

    cfg = load_config(None, [*tiny_overrides(tiny_model_dir, tmp_path), "tracking.run_name=opened"])
    cfg, uri, storage, name, state = driver._prepare(cfg, None)

    def die(*_args):
        raise KeyboardInterrupt  # the driver's death after the params, before the dataset (CI once hit this window)

    with monkeypatch.context() as m:
        m.setattr(driver, "log_split", die)
        with pytest.raises(KeyboardInterrupt):
            driver._open_run(cfg, uri, storage, name, state, str(tiny_model_dir), None)
    saved = json.loads((storage / name / driver.STATE_FILE).read_text())
    killed = tracking.run_data(uri, saved["run_id"])
    assert killed.data.params and not killed.inputs.dataset_inputs

    cfg2, uri2, _, _, state2 = driver._prepare(cfg, name)  # `flat-ray train --resume opened`
    tracker, output_dir = driver._open_run(cfg2, uri2, storage, name, state2, str(tiny_model_dir), None)
    run = tracking.run_data(uri, tracker.run_id)
    assert tracker.run_id == saved["run_id"] and str(output_dir) == saved["output_dir"]
    assert run.data.tags["resumed"] == "true" and run.info.status == "RUNNING"
    assert run.data.params["optim.lr"] == str(cfg.optim.lr)
    assert "config.yaml" in tracking.list_artifacts(uri, tracker.run_id)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == f"{cfg.data.benchmark}/{cfg.data.split}"
    driver._log_inputs(tracker, cfg2, str(tiny_model_dir), output_dir)  # once more: still one dataset input
    assert len(tracking.run_data(uri, tracker.run_id).inputs.dataset_inputs) == 1
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [saved["run_id"]]


def test_a_sweep_killed_while_opening_its_parent_run_is_resumed_into_it(tmp_path, tiny_model_dir, monkeypatch):
    """The same for `flat-ray tune`: the sweep state exists as soon as the parent run does, so a sweep driver that
    dies while logging the parent's inputs (after its params, before its datasets) is resumed into that parent run,
    which the resume completes (params, dataset, space, trial table); the experiment holds no second parent."""
    from flat_ray.launch import tune
    from flat_ray.report import SWEEP_FILE, saved_space
    from flat_ray.sweep import load_space

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "space.yaml"
    path.write_text(f"base: [demo]\nset: {{model.name_or_path: {tiny_model_dir}, data.split: forget05}}\n"
                    "grid: {method: [flat]}\nparams: {optim.lr: {grid: [1.0e-3]}}\n")

    def die(*_args):
        raise KeyboardInterrupt

    space, sweep_dir, storage, uri = tune.plan_sweep(load_space(str(path)), name="opened", address=None,
                                                     storage_path=None, mlflow_uri=None)
    with monkeypatch.context() as m:
        m.setattr(tune, "log_split", die)
        with pytest.raises(KeyboardInterrupt):
            tune._open_parent(space, "opened", sweep_dir, storage, uri, "the trial table", None, None, {})
    saved = json.loads((sweep_dir / SWEEP_FILE).read_text())
    killed = tracking.run_data(uri, saved["parent_run_id"])
    assert killed.data.params and not killed.inputs.dataset_inputs

    space2, state = saved_space(str(sweep_dir))  # `flat-ray tune --resume opened`
    space2, sweep_dir2, storage2, uri2 = tune.plan_sweep(space2, name="opened", address=None, storage_path=None,
                                                         mlflow_uri=state["mlflow_uri"])
    parent = tune._open_parent(space2, "opened", sweep_dir2, storage2, uri2, "the trial table", None, None, state)
    run = tracking.run_data(uri, parent.run_id)
    assert parent.run_id == saved["parent_run_id"] and run.data.tags["resumed"] == "true"
    assert run.data.params["resolved.git_sha"] and [d.dataset.name for d in run.inputs.dataset_inputs] == ["demo/forget05"]
    assert {"space.yaml", "trials.txt"} <= set(tracking.list_artifacts(uri, parent.run_id))
    client = MlflowClient(uri)
    assert [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("opened").experiment_id])] == [
        parent.run_id]


def test_placement_groups_that_dead_actors_left_are_released_and_no_others(ray_local):
    """What a Ray Train controller that died while starting its worker group leaves behind (a placement group it
    created, which Ray keeps for as long as the job's driver lives; CI once saw one hold a CPU through the rest of
    the suite, so the demo sweep's workers never started) is released; the groups of a live actor and of the driver
    itself are not. With ``wait_s`` the release waits for a creator that is still dying; at the end of a cell
    (``cell_done``) it then releases what a creator still alive holds."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    @ray.remote(num_cpus=0)
    class Creator:
        def create(self):
            group = placement_group([{"CPU": 0.05}])
            ray.get(group.ready())
            return group

    def state(group) -> str:
        return placement_group_table(group)["state"]

    own = placement_group([{"CPU": 0.05}])  # the driver's own, like the ones Tune makes for its trials
    ray.get(own.ready())
    live, dying = Creator.remote(), Creator.remote()
    kept, left = ray.get(live.create.remote()), ray.get(dying.create.remote())
    made = [own, kept, left]
    try:
        assert driver.release_orphaned_placement_groups() == 0  # every creator alive
        ray.kill(dying)
        time.sleep(1)
        assert state(left) == "CREATED"  # Ray keeps it: a group an actor created lives as long as the job
        deadline = time.monotonic() + 30
        while state(left) != "REMOVED":  # released as soon as Ray knows its creator is dead
            assert time.monotonic() < deadline, state(left)
            driver.release_orphaned_placement_groups()
            time.sleep(0.2)
        assert state(kept) == state(own) == "CREATED"
        ray.kill(live)  # still dying when the release starts: waited for
        assert driver.release_orphaned_placement_groups(wait_s=30) == 1 and state(kept) == "REMOVED"
        assert state(own) == "CREATED"
        # at the end of a cell every trial has ended: a creator still alive after the wait (a stopped controller
        # slow to die) loses its group too; the driver's own group stays
        late = Creator.remote()
        stuck = ray.get(late.create.remote())
        made.append(stuck)
        started = time.monotonic()
        assert driver.release_orphaned_placement_groups(wait_s=1.0, cell_done=True) == 1
        assert time.monotonic() - started >= 1.0 and state(stuck) == "REMOVED" and state(own) == "CREATED"
    finally:
        for group in made:
            if state(group) != "REMOVED":
                remove_placement_group(group)
