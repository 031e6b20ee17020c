"""The MLflow layer's own promises: the reachability probe's short timeout stays the probe's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flat_ray import tracking
from flat_ray.errors import FlatRayError
from tests.procs import start_server


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


class Server:
    """A real `mlflow server` on 127.0.0.1 (SQLite store, its own --artifacts-destination) that can be stopped and
    started again on the same port and store."""

    def __init__(self, root: Path):
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
               str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "served-artifacts")]
        self.proc = start_server(cmd, f"{self.uri}/health", "mlflow server")

    def stop(self) -> None:
        """The server and its workers at once (a graceful stop takes seconds)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server"))
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.stop()


@pytest.fixture(scope="module")
def mlflow_server(server):
    return server.uri, server.root / "served-artifacts"


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


def test_metrics_logged_while_the_server_is_away_arrive_once_it_is_back(server, tmp_path, monkeypatch):
    """Rank 0's tracker with the server stopped: logging never waits for it until the bounded queue is full, then
    waits for room instead of dropping; the server started again (same port and store) gets every metric, each
    once, at its step and the time it was logged. (A trial through a 20 s outage: scripts/cluster_demo.py.)"""
    run_id = tracking.start_run(server.uri, "outage", "r", tmp_path, {}).run_id
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the tracker's own retries only (a faster test)
    monkeypatch.setattr(tracking, "RETRY_MAX_S", 1.0)  # and at most 1 s apart (10 s in a run)
    tracker = tracking.BufferedTracker(server.uri, run_id, max_pending=40)
    tracker.log_metrics({"loss": 0.0, "lr": 0.0}, step=0)
    assert tracker.close(0.0) >= 0 and _until(lambda: tracker.pending == 0)
    tracker = tracking.BufferedTracker(server.uri, run_id, max_pending=40)
    server.stop()
    started = time.monotonic()
    for step in range(1, 11):  # 20 metrics: room for all of them
        tracker.log_metrics({"loss": float(step), "lr": step / 10}, step=step)
    assert time.monotonic() - started < 1.0 and tracker.pending == 20
    started = time.monotonic()  # a checkpoint's flush waits a bounded time, then goes on with them still queued
    assert tracker.flush(0.3) == 20 and 0.3 <= time.monotonic() - started < 2.0
    more = threading.Thread(target=lambda: [tracker.log_metrics({"loss": float(s), "lr": s / 10}, step=s)
                                            for s in range(11, 31)])
    more.start()
    assert _until(lambda: tracker.pending == 40) and more.is_alive()  # full: the caller waits, nothing dropped
    time.sleep(0.5)
    assert more.is_alive() and tracker.pending == 40
    back = time.time()
    server.start()
    more.join(60)
    assert not more.is_alive() and tracker.flush(60) == 0  # all 60 on the server when it returns: read them now
    assert len(tracking.metric_history(server.uri, run_id, "loss")) == 31 and tracker.close(0) == 0
    for key, scale in (("loss", 1.0), ("lr", 0.1)):  # lr was logged as step / 10
        assert tracking.metric_history(server.uri, run_id, key) == [(s, s / (1 / scale)) for s in range(31)]
    times = {m.step: m.timestamp for m in tracking._client(server.uri).get_metric_history(run_id, "loss")}
    assert all(times[s] / 1000 < back for s in range(1, 21))  # the time they were logged, not when they were sent


def _until(check, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_sweep_trial_that_starts_while_the_server_is_away_waits_for_it(server, ray_local, tiny_model_dir, tmp_path):
    """`flat-ray train` fails at once when its MLflow server does not answer (the probe above); a sweep's trial does
    not probe (its sweep did): one that starts during an outage (CI saw a trial start while cluster_demo's server was
    away and fail in its first second) opens its run through MLflow's retries once the server is back, and trains."""
    from flat_ray.config import load_config
    from flat_ray.launch import driver
    from tests.runs import tiny_overrides

    cfg = load_config(None, [*tiny_overrides(tiny_model_dir, tmp_path), "optim.epochs=1", "eval.enabled=false",
                             "launch.num_workers=1", f"tracking.mlflow_uri={server.uri}", "tracking.run_name=late"])
    server.stop()
    back = threading.Timer(3.0, server.start)
    try:
        with pytest.raises(FlatRayError, match="is unreachable"):
            driver.preflight(cfg, server.uri)  # what `flat-ray train` checks first
        back.start()
        started = time.monotonic()
        result = driver.run_training(cfg, placed_by_sweep=True)
    finally:
        back.cancel()  # a timer that has not fired yet never will: the server is started once, here
        if back.ident is not None:
            back.join()
        if server.proc.poll() is not None:
            server.start()
    assert time.monotonic() - started > 3.0
    run = tracking.run_data(server.uri, result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "late"
    steps = [s for s, _ in tracking.metric_history(server.uri, result.run_id, "train/loss")]
    assert steps and steps == list(range(1, len(steps) + 1))
