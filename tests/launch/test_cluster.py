"""cluster.yaml passes Ray's own autoscaler validation and keeps the project's defaults: private MLflow, pinned
installs, GPU node types that scale to zero."""

from __future__ import annotations

import copy
import os
import re
import signal
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
    broken["available_node_types"]["gpu_a10g_x8"]["max_wrkers"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_gpu_node_types_scale_from_zero_and_the_head_does_not_train(cluster):
    types = cluster["available_node_types"]
    gpu = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) > 0}
    assert len(gpu) >= 2 and all(v["min_workers"] == 0 and v["max_workers"] >= 1 for v in gpu.values())
    assert types[cluster["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert cluster["idle_timeout_minutes"] > 0


NODE = ROOT / "scripts" / "node"


def code(script: Path) -> str:
    """A shell script without its comments."""
    lines = script.read_text().splitlines()
    return "\n".join(line.split(" # ")[0] for line in lines if not line.lstrip().startswith("#"))


def test_every_node_command_is_a_script_of_scripts_node(cluster):
    """cluster.yaml only calls scripts/node/ (scripts/cluster_rehearsal.py runs them through `ray up` in CI), with the
    shared mount as an argument."""
    assert cluster["setup_commands"] == [
        "bash ~/flat-ray/scripts/node/setup.sh ~/venv",
        "bash ~/flat-ray/scripts/node/mount_shared.sh fs-0123456789abcdef0.efs.us-west-2.amazonaws.com:/ /shared",
    ]
    assert cluster["head_start_ray_commands"] == ["bash ~/flat-ray/scripts/node/head_start.sh /shared ~/venv"]
    assert cluster["worker_start_ray_commands"] == ["bash ~/flat-ray/scripts/node/worker_start.sh /shared ~/venv"]
    assert cluster["file_mounts"] == {"~/flat-ray": "."} and ".venv" in cluster["rsync_exclude"]
    for script in NODE.glob("*.sh"):
        assert script.read_text().startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in code(script), script
        # a service is found by its port, never by a command line (the shell Ray runs a command in names it too);
        # and no node-wide thread count: a worker's threads follow its own CPU request
        assert "pgrep" not in code(script) and "OMP_NUM_THREADS" not in code(script), script


def test_services_bind_privately_and_installs_are_pinned(cluster):
    head = (NODE / "head_start.sh").read_text()
    assert "0.0.0.0" not in yaml.safe_dump(cluster) and not any("0.0.0.0" in code(p) for p in NODE.glob("*.sh"))
    # MLflow on the head's private address; SQLite on the head's own disk (its locks are not safe on NFS), artifacts
    # on the shared one; the same UI on the loopback, where `ray attach -p 5000` forwards to
    assert "addr=$(hostname -I | awk '{print $1}')" in head and '--host "$addr" --port 5000' in head
    assert '--backend-store-uri "sqlite:///$HOME/mlflow/mlflow.db"' in head
    assert '--artifacts-destination "$shared/mlartifacts"' in head
    assert 'socat TCP-LISTEN:5000,bind=127.0.0.1,reuseaddr,fork "TCP:$addr:5000"' in head
    # each started only when its port does not answer (`ray up` runs this again), detached from the SSH session
    assert 'mlflow_up() { http_ok "http://$addr:5000/health"; }' in head
    assert "socat_up() { tcp_ok 127.0.0.1 5000; }" in head
    assert "setsid nohup" in head
    # one model cache on the shared storage for every Ray process; Ray restarted with the dashboard on 127.0.0.1
    for script in ("head_start.sh", "worker_start.sh"):
        text = (NODE / script).read_text()
        assert text.index("export HF_HOME=$shared/huggingface") < text.index('"$venv/bin/ray" stop') < text.index(
            '"$venv/bin/ray" start')
    assert "--dashboard-host=127.0.0.1" in head and cluster["provider"]["use_internal_ips"] is True
    # every node installs through scripts/node/setup.sh: apt only when a package is missing, then the full lock
    setup = (NODE / "setup.sh").read_text()
    assert "! dpkg -s nfs-common socat" in setup and 'FLAT_RAY_SKIP_APT:-0}" != 1' in setup
    assert setup.index("apt-get update") < setup.index("apt-get install -y -q nfs-common socat")
    # Python >= 3.11 (pyproject) where the image has only Ubuntu 22.04's 3.10: a uv-managed 3.11
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11" and "sys.version_info < (3, 11)" in setup and "uv python install 3.11" in setup
    assert '-c "$repo/constraints/cluster.txt" "$repo[cluster]"' in setup
    assert "TCP 2049" in (ROOT / "cluster.yaml").read_text()  # the EFS security-group rule is stated


def test_head_start_commands_start_each_service_once_and_they_outlive_the_shell(cluster, tmp_path):
    """cluster.yaml's head_start_ray_commands, run twice the way Ray's runner runs each command (`bash --login -c -i
    'source ~/.bashrc; ... && (COMMAND)'`: a shell whose own command line holds the command), start MLflow and the
    forward once, and both still answer after the shell is gone. The earlier `pgrep -f "mlflow server" > /dev/null ||
    nohup ... mlflow server ...` lines fail this: pgrep found that shell, so nothing ever started."""
    log, shared = run_head_start_commands(cluster["head_start_ray_commands"], tmp_path)
    mlflow_args = next(log.glob("mlflow.*")).read_text()
    assert f"--backend-store-uri sqlite:///{tmp_path}/mlflow/mlflow.db" in mlflow_args
    assert f"--artifacts-destination {shared}/mlartifacts" in mlflow_args and "--host 127.0.0.2" in mlflow_args
    hf_home = f"HF_HOME={shared}/huggingface"
    assert (log / "ray").read_text() == 2 * f"stop {hf_home}\nstart {hf_home}\n"
    assert (shared / "huggingface").is_dir()


def run_head_start_commands(commands: list[str], home: Path) -> tuple[Path, Path]:
    """Run `commands` twice (`ray up`, then `ray up` again) as Ray's runner does, on a node whose home is `home`,
    whose ~/flat-ray is this checkout and whose ~/venv has stand-ins for mlflow and ray (socat and `hostname -I`,
    which says 127.0.0.2, a loopback address, too); check that each service was started once and answers; return
    the stand-ins' records and the shared folder (/shared in the commands)."""
    import socket
    import subprocess
    import sys
    import textwrap
    import urllib.request

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 5000)) == 0:
            pytest.skip("127.0.0.1:5000 is taken")
    venv, bin_, shared, log = home / "venv", home / "bin", home / "shared", home / "log"
    for folder in (venv / "bin", bin_, log):
        folder.mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (home / "flat-ray").symlink_to(ROOT)

    def fake(path, body):
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
        path.chmod(0o755)

    # mlflow server --host H --port P ...: answers every GET with 200; socat TCP-LISTEN:P,bind=H,...: accepts
    fake(venv / "bin" / "mlflow", f"""\
        import http.server, os, sys
        open(os.path.join({str(log)!r}, f"mlflow.{{os.getpid()}}"), "w").write(" ".join(sys.argv[1:]))
        host, port = sys.argv[sys.argv.index("--host") + 1], int(sys.argv[sys.argv.index("--port") + 1])
        class Ok(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(b"OK")
        http.server.HTTPServer((host, port), Ok).serve_forever()
        """)
    fake(bin_ / "socat", f"""\
        import os, socket, sys
        open(os.path.join({str(log)!r}, f"socat.{{os.getpid()}}"), "w").write(" ".join(sys.argv[1:]))
        spec = dict(kv.split("=") for kv in sys.argv[1].split(",")[1:] if "=" in kv)
        server = socket.create_server((spec["bind"], int(sys.argv[1].split(",")[0].split(":")[1])))
        while True:
            server.accept()[0].close()
        """)
    fake(venv / "bin" / "ray", f"""\
        import os, sys
        with open(os.path.join({str(log)!r}, "ray"), "a") as f:
            f.write(" ".join(sys.argv[1:2]) + " HF_HOME=" + os.environ.get("HF_HOME", "") + "\\n")
        """)
    fake(bin_ / "hostname", 'print("127.0.0.2 ")\n')
    # a login shell resets PATH (/etc/profile); the node's dotfiles put its programs back
    (home / ".profile").write_text(f'export PATH="{bin_}:$PATH"\n')
    (home / ".bashrc").write_text("")
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "TERM": "dumb"}
    try:
        for _ in range(2):
            for command in commands:
                command = command.replace("/shared", str(shared))
                ray_runner = f"source ~/.bashrc; export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && ({command})"
                done = subprocess.run(["bash", "--login", "-c", "-i", ray_runner], env=env, capture_output=True,
                                      text=True, timeout=120, stdin=subprocess.DEVNULL)
                assert done.returncode == 0, done.stderr
        started = sorted(p.name.split(".")[0] for p in log.glob("*.*"))
        assert started == ["mlflow", "socat"], started
        urllib.request.urlopen("http://127.0.0.2:5000/health", timeout=5).close()
        socket.create_connection(("127.0.0.1", 5000), timeout=5).close()
    finally:
        for pidfile in log.glob("*.*"):
            try:
                os.kill(int(pidfile.name.split(".")[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass
    return log, shared


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
