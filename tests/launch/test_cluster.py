"""cluster.yaml passes Ray's own autoscaler validation and keeps the project's defaults: private MLflow, pinned
installs, GPU node types that scale to zero."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


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

    head = " ".join(cluster["head_start_ray_commands"])
    assert "mlflow server" in head and "0.0.0.0" not in yaml.safe_dump(cluster)
    assert "hostname -I" in head and "--dashboard-host=127.0.0.1" in head
    # SQLite on the head's own disk (its locks are not safe on NFS), artifacts on the shared one
    assert "--backend-store-uri sqlite:////home/ubuntu/mlflow/mlflow.db" in head and "/shared/mlartifacts" in head
    assert "socat TCP-LISTEN:5000,bind=127.0.0.1" in head  # where `ray attach -p 5000` forwards to
    assert "pgrep" in head  # `ray up --no-restart` re-runs these without a second server
    assert cluster["provider"]["use_internal_ips"] is True
    # every node installs through scripts/node_setup.sh (CI runs it: scripts/test.sh), then mounts EFS
    setup = cluster["setup_commands"]
    assert setup[0] == "bash ~/flat-ray/scripts/node_setup.sh ~/venv" and "mount -t nfs4" in setup[1]
    script = (ROOT / "scripts" / "node_setup.sh").read_text()
    assert script.index("sudo apt-get update") < script.index("apt-get install -y -q nfs-common socat")
    # Python >= 3.11 (pyproject) where the image has only Ubuntu 22.04's 3.10: a uv-managed 3.11
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11" and "sys.version_info < (3, 11)" in script and "uv python install 3.11" in script
    assert '-c "$repo/constraints/cluster.txt" "$repo[cluster]"' in script
    assert "TCP 2049" in (ROOT / "cluster.yaml").read_text()  # the EFS security-group rule is stated


def test_the_cluster_lock_pins_every_distribution_of_the_stack():
    """constraints/cluster.txt (scripts/lock_cluster.py) pins the whole dependency tree, not only the top level,
    so nodes launched later install the same versions."""
    import ray

    lines = [line for line in (ROOT / "constraints" / "cluster.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][^\s]*", line) for line in lines), lines
    pins = dict(line.split("==") for line in lines)
    assert pins["ray"] == ray.__version__  # the cluster runs the Ray the tests run
    top = {"torch", "deepspeed", "transformers", "datasets", "mlflow", "lm-eval", "click", "nvidia-ml-py"}
    deep = {"numpy", "pyarrow", "protobuf", "pydantic", "grpcio", "safetensors", "huggingface-hub", "aiohttp"}
    assert top | deep <= set(pins) and len(pins) > 100
