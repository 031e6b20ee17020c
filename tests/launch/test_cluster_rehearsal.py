"""scripts/cluster_rehearsal.py's config and README line (the rehearsal itself runs in scripts/test.sh: it needs root,
port 22 and `ray stop`)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rehearsal():
    spec = importlib.util.spec_from_file_location("cluster_rehearsal", ROOT / "scripts" / "cluster_rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rehearsal_config_is_cluster_yaml_on_the_local_provider(rehearsal, tmp_path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config, site_shared = rehearsal.rehearsal_config(copy.deepcopy(cluster), user="u", key=tmp_path / "key",
                                                     home=tmp_path / "home", shared=tmp_path / "shared")
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own checks, as `ray up` makes them
    assert site_shared == "/shared"
    assert config["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert "available_node_types" not in config and config["auth"] == {"ssh_user": "u",
                                                                       "ssh_private_key": str(tmp_path / "key")}
    for key in ("file_mounts", "rsync_exclude", "file_mounts_sync_continuously"):
        assert config[key] == cluster[key]
    # the commands are cluster.yaml's, with only the site values substituted
    shared = str(tmp_path / "shared")
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for mine, theirs in zip(config[key], cluster[key], strict=True):
            theirs = theirs.replace("/shared", shared)
            if "mount_shared.sh" in theirs:
                theirs = theirs.replace(theirs.split()[2], "none")
            assert mine == theirs
    assert rehearsal.substitute("mount_shared.sh x /shared /shared/ray /shareds", "/shared", "/t") == (
        "mount_shared.sh x /t /t/ray /shareds")


def test_the_readme_sweep_line_carries_what_the_multi_node_guard_wants(rehearsal):
    line = rehearsal.readme_sweep_line((ROOT / "README.md").read_text(), "/shared", "/t")
    # from the shared mount, where the README's clone of locuslab/tofu holds the tofu space's relative references
    assert line.startswith("ray job submit --address http://127.0.0.1:8265 -- bash -lc 'cd /t && flat-ray tune ")
    for part in ("--address auto", "--storage-path /t/ray", "--mlflow-uri http://$(hostname -I | cut -d\" \" -f1):5000",
                 "paths.workdir=/t/work"):
        assert part in line, part
    assert line.endswith(" --dry-run'") and "/shared" not in line
