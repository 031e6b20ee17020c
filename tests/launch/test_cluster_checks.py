"""The checks a run or sweep makes of the Ray cluster it joins: it waits for nodes the autoscaler can add and is
refused only when no node type can ever hold it (a real local Ray, node types written to its GCS)."""

from __future__ import annotations

import pytest


def test_a_run_waits_for_the_autoscaler_and_one_no_node_type_holds_is_refused(ray_local, tmp_path, caplog):
    """A run never compares what it wants with what the cluster has now: one whose workers need an A10G this Ray
    lacks, on a cluster whose autoscaler offers an A10G node type (written to this Ray's GCS as an autoscaler
    would), says it waits for that node type; one that asks for an accelerator no node type offers is refused in
    one line before anything is written."""
    import logging

    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from cli.main import main
    from flat_ray.config import load_config
    from flat_ray.errors import FlatRayError
    from flat_ray.launch.cluster import check_run

    config = autoscaler_pb2.ClusterConfig()
    gpu = config.node_group_configs.add(name="fake_a10g", max_count=2)
    gpu.resources["CPU"], gpu.resources["memory"], gpu.resources["accelerator_type:A10G"] = 4, 8 * 2**30, 1
    key = (ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode(), ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode())
    internal_kv._internal_kv_put(key[1], config.SerializeToString(), namespace=key[0])
    try:
        cfg = load_config(None, ["launch.accelerator_type=A10G", "launch.cpus_per_worker=2"])
        with caplog.at_level(logging.INFO, logger="flat_ray"):
            check_run(cfg, "r1")
        assert "run r1 asks Ray for 2 workers x (CPU 2, memory 2.0 GiB, A10G) (PACK); no node has room for it " \
               "now: waiting for the autoscaler to add a fake_a10g node" in caplog.text
        with pytest.raises(FlatRayError, match=r"launch.accelerator_type=H100 is on no node type \(they offer: A10G\)"):
            check_run(load_config(None, ["launch.accelerator_type=H100"]), "r2")
    finally:
        internal_kv._internal_kv_del(key[1], namespace=key[0])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flat_ray"):
        check_run(load_config(None, []), "r3")  # the demo's 2 x 0.99 CPU: room on this Ray now, no waiting line
    assert "r3" not in caplog.text
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        main(["train", "launch.accelerator_type=H100", "model.name_or_path=tiny", f"paths.workdir={tmp_path}/wd"])
    assert exc.value.code == 2 and sorted(tmp_path.rglob("*")) == before
