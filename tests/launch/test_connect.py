"""Which Ray a command uses where another Ray already runs on the machine (a `ray start` cluster: a shared GPU box, the
head node of a cluster): a run without an address starts a Ray of its own, and that Ray's processes ask their own
cluster, not the other one, about their actors (what Ray Train's placement-group cleaner does for every run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, ray
from flat_ray.launch.cluster import connect_ray

connect_ray(None)  # what `flat-ray train` and `flat-ray tune` do without --address

@ray.remote(num_cpus=0)
class Probe:
    def ask(self, actor_id):  # Ray Train's placement-group cleaner asks this of its run's controller
        import os
        from ray.util.state import get_actor

        state = get_actor(actor_id, timeout=30)
        return os.environ.get("RAY_ADDRESS"), state.state if state else None

probe = Probe.remote()
seen, state = ray.get(probe.ask.remote(probe._actor_id.hex()))
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "seen": seen, "state": state}))
"""


@pytest.mark.slow
def test_a_run_beside_another_ray_starts_its_own_whose_processes_ask_their_own_cluster(tmp_path):
    from ray._private.utils import get_ray_address_file

    from flat_ray.launch.cluster import free_port

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from cluster_demo import (
        stop_cluster,  # only that cluster's processes: `ray stop` would end the suite's Ray too
    )

    record = Path(get_ray_address_file(None))  # Ray's record of the machine's newest `ray start` cluster
    saved = record.read_text() if record.exists() else None
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run([str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}", "--num-cpus=1",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
                    "--disable-usage-stats"], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120)
    try:
        other = record.read_text().strip()
        assert other.endswith(f":{port}")
        res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        found = json.loads(res.stdout.splitlines()[-1])
    finally:
        stop_cluster(f"127.0.0.1:{port}", tmp_path)
        if saved is None:
            record.unlink(missing_ok=True)
        else:
            record.write_text(saved)
    assert found["gcs"] != other  # a Ray of its own, not the `ray start` cluster (ray.init's default)
    # its processes know their cluster: the state API finds the probe alive there (asked through the other
    # cluster, it would not exist, and Ray Train's cleaner would take a run's controller for dead)
    assert found["seen"] == found["gcs"] and found["state"] == "ALIVE", found
    assert f"a Ray cluster runs on this machine ({other}); this command starts a Ray of its own" in res.stderr
