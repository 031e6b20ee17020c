"""The checks a run or sweep makes of the Ray cluster it joins: it waits for nodes the autoscaler can add and is
refused only when no node type can ever hold it (a real local Ray, node types written to its GCS)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest


def test_a_run_waits_for_the_autoscaler_and_one_no_node_type_holds_is_refused(ray_local, tmp_path, caplog, capsys):
    """A run never compares what it wants with what the cluster has now: one whose workers need an A10G this Ray
    lacks, on a cluster whose autoscaler offers an A10G node type (written to this Ray's GCS as an autoscaler
    would), says it waits for that node type, once its storage, MLflow and work folder are ones that node shares
    (each missing one is refused in one line, as for a sweep); one that asks for an accelerator no node type
    offers is refused in one line before anything is written."""
    import logging

    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from cli.main import main
    from flat_ray.config import load_config
    from flat_ray.errors import FlatRayError
    from flat_ray.launch.cluster import check_run

    with caplog.at_level(logging.INFO, logger="flat_ray"):
        check_run(load_config(None, []), "r3")  # the demo's 2 x 0.99 CPU: room on this Ray now, no waiting line
    assert "r3" not in caplog.text
    config = autoscaler_pb2.ClusterConfig()
    gpu = config.node_group_configs.add(name="fake_a10g", max_count=2)
    gpu.resources["CPU"], gpu.resources["memory"], gpu.resources["accelerator_type:A10G"] = 4, 8 * 2**30, 1
    key = (ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode(), ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode())
    internal_kv._internal_kv_put(key[1], config.SerializeToString(), namespace=key[0])
    try:
        # its workers will run on a node the autoscaler adds: that node needs the checkpoints, MLflow and the run's
        # outputs on shared storage, as a sweep's trials do
        a10g = ["launch.accelerator_type=A10G", "launch.cpus_per_worker=2"]
        with pytest.raises(FlatRayError, match="^run r1 waits for a fake_a10g node the autoscaler adds: pass "
                                               r"launch.storage_path=DIR on shared storage \(an NFS mount\)"):
            check_run(load_config(None, a10g), "r1")
        shared = [f"launch.storage_path={tmp_path / 'shared'}", f"paths.workdir={tmp_path / 'shared' / 'work'}"]
        with pytest.raises(FlatRayError, match=r"^run r1 waits for a fake_a10g node the autoscaler adds but MLflow is "
                                               r"a local SQLite file \(sqlite:///.*\); pass "
                                               r"tracking.mlflow_uri=http://HEAD:5000 \(the server cluster.yaml"):
            check_run(load_config(None, [*a10g, *shared]), "r1")
        if Path("/dev/shm").is_dir() and Path("/dev/shm").stat().st_dev != tmp_path.stat().st_dev:
            with pytest.raises(FlatRayError, match=r"the work folder .*/wd \(run outputs, evaluation logs, exports\) "
                                                   r"is not on the filesystem of launch.storage_path /dev/shm/"):
                check_run(load_config(None, [*a10g, "launch.storage_path=/dev/shm/flat-ray-shared",
                                             "tracking.mlflow_uri=http://head:5000",
                                             f"paths.workdir={tmp_path / 'wd'}"]), "r1")
        cfg = load_config(None, [*a10g, *shared, "tracking.mlflow_uri=http://head:5000"])
        with caplog.at_level(logging.INFO, logger="flat_ray"):
            check_run(cfg, "r1")
        assert "run r1 asks Ray for 2 workers x (CPU 2, memory 2.0 GiB, A10G) (PACK); no node has room for it " \
               "now: waiting for the autoscaler to add a fake_a10g node" in caplog.text
        with pytest.raises(FlatRayError, match=r"launch.accelerator_type=H100 is on no node type \(they offer: A10G\)"):
            check_run(load_config(None, ["launch.accelerator_type=H100"]), "r2")
        before = sorted(tmp_path.rglob("*"))
        capsys.readouterr()  # what logging printed so far (in the suite, through handlers of earlier CLI tests)
        with pytest.raises(SystemExit) as exc:  # through the CLI: one line, exit 2, nothing written
            main(["train", "--address", ray_local, *a10g, "model.name_or_path=tiny", "tracking.run_name=r4",
                  f"paths.workdir={tmp_path}/wd"])
        assert exc.value.code == 2 and sorted(tmp_path.rglob("*")) == before
        assert capsys.readouterr().err.strip().splitlines() == [
            "flat-ray: error: run r4 waits for a fake_a10g node the autoscaler adds: pass "
            "launch.storage_path=DIR on shared storage (an NFS mount) so every node sees the checkpoints"]
    finally:
        internal_kv._internal_kv_del(key[1], namespace=key[0])
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        main(["train", "launch.accelerator_type=H100", "model.name_or_path=tiny", f"paths.workdir={tmp_path}/wd"])
    assert exc.value.code == 2 and sorted(tmp_path.rglob("*")) == before


def test_placement_groups_that_dead_actors_left_are_released_and_no_others(ray_local):
    """What a Ray Train controller that died while starting its worker group leaves behind (a placement group it
    created, which Ray keeps for as long as the job's driver lives; CI once saw one hold a CPU through the rest of
    the suite, so the demo sweep's workers never started) is released; the groups of a live actor and of the driver
    itself are not. With ``wait_s`` the release waits for a creator that is still dying; at the end of a cell
    (``cell_done``) it then releases what a creator still alive holds."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from flat_ray.launch import cluster

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
        assert cluster.release_orphaned_placement_groups() == 0  # every creator alive
        ray.kill(dying)
        time.sleep(1)
        assert state(left) == "CREATED"  # Ray keeps it: a group an actor created lives as long as the job
        deadline = time.monotonic() + 30
        while state(left) != "REMOVED":  # released as soon as Ray knows its creator is dead
            assert time.monotonic() < deadline, state(left)
            cluster.release_orphaned_placement_groups()
            time.sleep(0.2)
        assert state(kept) == state(own) == "CREATED"
        ray.kill(live)  # still dying when the release starts: waited for
        assert cluster.release_orphaned_placement_groups(wait_s=30) == 1 and state(kept) == "REMOVED"
        assert state(own) == "CREATED"
        # at the end of a cell every trial has ended: a creator still alive after the wait (a stopped controller
        # slow to die) loses its group too; the driver's own group stays
        late = Creator.remote()
        stuck = ray.get(late.create.remote())
        made.append(stuck)
        started = time.monotonic()
        assert cluster.release_orphaned_placement_groups(wait_s=1.0, cell_done=True) == 1
        assert time.monotonic() - started >= 1.0 and state(stuck) == "REMOVED" and state(own) == "CREATED"
    finally:
        for group in made:
            if state(group) != "REMOVED":
                remove_placement_group(group)


def test_a_worker_on_a_node_without_the_drivers_local_inputs_fails_in_one_line(tmp_path, tiny_model_dir):
    """The payload a worker receives names the local model, tokenizer, data and template by the absolute paths the
    driver found them at; a node without one of them (a folder on the head's own disk, on a multi-node cluster)
    fails the worker with one line naming the node and each missing path, before anything is loaded. Hub ids and
    unset inputs are not paths to check."""
    from flat_ray.config import load_config
    from flat_ray.errors import FlatRayError
    from flat_ray.launch.worker import check_node_inputs

    template = tmp_path / "template.jsonl"
    template.write_text('{"text": "I cannot say."}\n')
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"data.template_file={template}"])
    payload = {"run": cfg.to_dict(), "model_path": str(tiny_model_dir)}
    check_node_inputs(payload, "10.0.1.5")  # this node has them
    check_node_inputs({**payload, "model_path": "meta-llama/Llama-2-7b-hf"}, "10.0.1.5")  # a hub id: the HF cache's
    template.unlink()  # as a node without the head's disk sees it
    gone = tmp_path / "models" / "original"
    with pytest.raises(FlatRayError) as refused:
        check_node_inputs({**payload, "model_path": str(gone)}, "10.0.1.5")
    assert str(refused.value) == (
        f"node 10.0.1.5 has no model.name_or_path {gone}, data.template_file {template}, which the run's driver "
        "found on its own machine: on a multi-node cluster keep local models, data and templates on the shared "
        "mount (the storage path's filesystem), or at the same path in every node's image")
