"""The MLflow layer's own promises: the reachability probe's short timeout stays the probe's."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from flat_ray import tracking
from flat_ray.errors import FlatRayError


def test_the_reachability_probe_does_not_change_the_processs_mlflow_settings(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")  # a user's own setting
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FlatRayError, match="is unreachable"):
        tracking.check_reachable(f"http://127.0.0.1:{port}")
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # MLflow's retries and back-off stay on afterwards
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with its own artifact store (--artifacts-destination)."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    root = tmp_path_factory.mktemp("server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", str(root / "served-artifacts")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield uri, root / "served-artifacts"
    finally:  # the server and its workers at once (a graceful stop takes seconds)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def test_runs_on_a_tracking_server_store_artifacts_through_the_server(mlflow_server, tmp_path):
    """With an http tracking URI the experiment keeps the server's artifact location: a file logged from any node
    goes through the server to its --artifacts-destination, never to the logging node's own disk."""
    uri, served = mlflow_server
    local = tmp_path / "node-local-mlartifacts"
    tracker = tracking.start_run(uri, "served", "r1", local, {"kind": "test"})
    (tmp_path / "note.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "note.txt")
    run = tracking.run_data(uri, tracker.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [p.read_text() for p in served.rglob("note.txt")] == ["hello"]
    assert not local.exists()
    # a local store still gets the explicit folder it is given
    sqlite = f"sqlite:///{tmp_path / 'local.db'}"
    local_run = tracking.run_data(sqlite, tracking.start_run(sqlite, "here", "r2", local, {}).run_id)
    assert local_run.info.artifact_uri.startswith(local.resolve().as_uri())
