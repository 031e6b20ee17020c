"""cluster.yaml passes Ray's own autoscaler validation and keeps the project's defaults: private MLflow, pinned
installs, GPU node types that scale to zero."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_autoscaler_validation(cluster):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_a10g_x4"]["max_wrkers"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_gpu_node_types_scale_from_zero_and_the_head_does_not_train(cluster):
    types = cluster["available_node_types"]
    gpu = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) > 0}
    assert len(gpu) >= 2 and all(v["min_workers"] == 0 and v["max_workers"] >= 1 for v in gpu.values())
    assert types[cluster["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert cluster["idle_timeout_minutes"] > 0


def test_services_bind_privately_and_installs_are_pinned(cluster):
    import ray

    head = " ".join(cluster["head_start_ray_commands"])
    assert "mlflow server" in head and "0.0.0.0" not in yaml.safe_dump(cluster)
    assert "hostname -I" in head and "--dashboard-host=127.0.0.1" in head
    assert "sqlite:////shared/mlflow.db" in head  # a SQL backend on the shared disk
    assert cluster["provider"]["use_internal_ips"] is True
    setup = " ".join(cluster["setup_commands"])
    assert "-c ~/flat-ray/constraints/cluster.txt" in setup
    pins = dict(line.split("==") for line in (ROOT / "constraints" / "cluster.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["ray"] == ray.__version__  # the cluster runs the Ray the tests run
    assert {"torch", "deepspeed", "transformers", "mlflow"} <= set(pins)
