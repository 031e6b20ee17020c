"""MLflow tracking: the only module that imports mlflow.

The driver creates (or, on resume, reopens) a run and passes its id to the workers; rank 0 logs step and epoch
metrics into it and every other rank gets a :class:`NullTracker`, so the loop has no ``if rank == 0`` around
logging. The client API is used throughout (no global active run), which keeps driver and worker independent.
"""

from __future__ import annotations

import getpass
import itertools
import json
import logging
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from flat_ray.envinfo import environ
from flat_ray.errors import FlatRayError

log = logging.getLogger(__name__)
MAX_PARAM = 6000  # MLflow's limit on a param value's length
SYSTEM_METRICS_S = 5  # sampling interval of the system metrics (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins)
SYSTEM_METRICS_STOP_S = 30  # how long the end of a run waits for the monitor's last flush
MAX_PENDING = 200_000  # metrics rank 0 keeps while the tracking server is away (about 50 MB), then waits for room
CLOSE_S = 600  # how long the end of a run waits for the tracking server to take the metrics kept for it
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on the runs table


def default_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    # "Creating initial MLflow database tables..." on every new store; "Started monitoring system metrics."
    for name in ("mlflow.store.db.utils", "alembic", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def check_scheme(uri: str) -> None:
    """A tracking URI flat-ray can use: a SQLite file or a server."""
    if not uri.startswith(("sqlite:///", "http://", "https://", "databricks")):
        raise FlatRayError(f"tracking.mlflow_uri {uri!r} is not supported; use sqlite:///PATH or http(s)://HOST:PORT")


def check_reachable(uri: str) -> None:
    """Fail fast, before anything is trained or written, when the tracking server cannot be reached."""
    if uri.startswith("sqlite:///"):
        parent = Path(uri.removeprefix("sqlite:///")).parent
        probe = parent
        while not probe.exists():
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            raise FlatRayError(f"MLflow store {uri} is not writable (no write access to {probe}); set tracking.mlflow_uri")
        return
    check_scheme(uri)
    try:
        # one quick try here (no retries, a 5 s timeout); MLflow's own retries and back-off for everything after
        with environ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}):
            _client(uri).search_experiments(max_results=1)
    except Exception as exc:  # MlflowException, requests' ConnectionError, ...
        raise FlatRayError(f"MLflow server {uri} is unreachable ({type(exc).__name__}); start it "
                           "(mlflow server --host 127.0.0.1) or set tracking.mlflow_uri") from None


def git_sha() -> str | None:
    """The commit flat_ray runs from: the checkout's HEAD (``-dirty`` with local changes), else the commit pip
    recorded when it installed from a git URL (``direct_url.json``), else None."""
    here = Path(__file__).resolve().parent
    try:
        top, sha = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=here, capture_output=True,
                                  text=True, timeout=5, check=True).stdout.split()
        if Path(top).resolve() == here.parent:  # flat_ray's own checkout, not a repository a venv happens to sit in
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    try:
        direct = json.loads(metadata.distribution("flat-ray").read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, ValueError):
        return None
    return direct.get("vcs_info", {}).get("commit_id")


def standard_tags(command: str) -> dict[str, str]:
    """MLflow's own tags, which its UI shows: source, user and (when known) the git commit."""
    sha = git_sha()
    return {"mlflow.source.name": command, "mlflow.source.type": "LOCAL", "mlflow.user": getpass.getuser(),
            **({"mlflow.source.git.commit": sha.removesuffix("-dirty")} if sha else {})}


class NullTracker:
    """The tracker off rank 0: accepts every call and does nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def close(self, timeout: float = 0.0) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        return 0

    def tags(self) -> dict[str, str]:
        return {}

    @contextmanager
    def system_metrics(self) -> Iterator[None]:
        yield


class Tracker(NullTracker):
    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 500])

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:MAX_PARAM]) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)

    @contextmanager
    def system_metrics(self) -> Iterator[None]:
        """MLflow's own system metrics (``system/*``: CPU, memory, disk, network, GPU when pynvml sees one),
        sampled in a thread of this process while the block runs."""
        import threading

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_S, tracking_uri=self.uri,
                                           resume_logging=True)
            monitor.start()
        except Exception as exc:  # noqa: BLE001 - monitoring never stops a run
            log.warning("no system metrics for MLflow run %s: %s", self.run_id, str(exc).splitlines()[0][:200])
            monitor = None
        try:
            yield
        finally:
            if monitor is not None:  # a slow tracking server may hold the last flush: wait a bounded time
                stopper = threading.Thread(target=monitor.finish, daemon=True)
                stopper.start()
                stopper.join(timeout=SYSTEM_METRICS_STOP_S)

    def log_dataset(self, name: str, rows: Sequence[Mapping[str, Any]], source: Mapping[str, str],
                    context: str = "train") -> None:
        """Record the rows a run trains on as an MLflow dataset input (the UI's Dataset column and filter);
        ``source`` says where they came from (benchmark, split, data_dir)."""
        import pandas as pd
        from mlflow.data import from_pandas
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        keep = [k for k in ("question", "answer", "text", "prompt") if rows and k in rows[0]]
        frame = pd.DataFrame([{k: str(r.get(k, "")) for k in keep} for r in rows])
        dataset = from_pandas(frame, source=CodeDatasetSource(dict(source)), name=name)
        self.client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                           [InputTag("mlflow.data.context", context)])])

    def log_figure(self, figure: Any, path: str) -> None:
        """A matplotlib figure as an image artifact (shown inline by the UI); the figure is closed after."""
        import matplotlib.pyplot as plt

        try:
            self.client.log_figure(self.run_id, figure, path)
        finally:
            plt.close(figure)


RETRY_MAX_S = 10.0  # BufferedTracker's longest wait between two tries of a send the server did not take


class BufferedTracker(Tracker):
    """Rank 0's tracker: metrics go into a bounded queue that a thread sends to MLflow in batches, so training never
    waits for the tracking server and loses nothing while it is away (a restart, a slow response). A failed send
    is retried with back-off (1 s doubling to 10 s) until it succeeds; when ``max_pending`` metrics are waiting,
    :meth:`log_metrics` waits for room instead of dropping any (memory stays bounded). :meth:`close` sends what is
    left. Each metric keeps the time it was logged at."""

    def __init__(self, uri: str, run_id: str, max_pending: int = MAX_PENDING):
        super().__init__(uri, run_id)
        self._pending: deque = deque()
        self._room = threading.Condition()
        self._max, self._closed, self._failing = max_pending, False, False
        self._sender = threading.Thread(target=self._send, name="flat-ray-mlflow", daemon=True)
        self._sender.start()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        with self._room:
            while len(self._pending) + len(batch) > self._max and self._pending:
                self._room.wait(1.0)  # the server is behind or away: wait for room, never drop
            self._pending.extend(batch)
            self._room.notify_all()

    def _send(self) -> None:
        delay = 1.0
        while True:
            with self._room:
                while not self._pending and not self._closed:
                    self._room.wait()
                if not self._pending:
                    return
                batch = list(itertools.islice(self._pending, 500))
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # noqa: BLE001 - the server is away: keep the metrics, try again
                if not self._failing:
                    log.warning("MLflow %s did not take %d metrics (%s); keeping them and retrying", self.uri,
                                len(batch), type(exc).__name__)
                self._failing = True
                time.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)
                continue
            if self._failing:
                log.warning("MLflow %s is back; sending the metrics kept meanwhile", self.uri)
            self._failing, delay = False, 1.0
            with self._room:
                for _ in batch:
                    self._pending.popleft()
                self._room.notify_all()

    def flush(self, timeout: float) -> int:
        """Wait at most ``timeout`` seconds until every metric logged so far has reached the server; returns how many
        have not (they stay queued and are sent later)."""
        deadline = time.monotonic() + timeout
        with self._room:
            while self._pending and (left := deadline - time.monotonic()) > 0:
                self._room.wait(left)
            return len(self._pending)

    def close(self, timeout: float = CLOSE_S) -> int:
        """Send what is left, waiting at most ``timeout`` seconds; returns how many metrics could not be sent."""
        with self._room:
            self._closed = True
            self._room.notify_all()
        self._sender.join(timeout)
        if self._pending:
            log.warning("MLflow %s: %d metrics of run %s could not be sent within %.0f s", self.uri,
                        len(self._pending), self.run_id, timeout)
        return len(self._pending)


def start_run(uri: str, experiment: str, run_name: str, artifact_root: str | Path, tags: Mapping[str, Any]) -> Tracker:
    """Create the experiment if needed and a new run in it. A local store gets an explicit artifact location under
    ``artifact_root``; a tracking server keeps its own (its ``--artifacts-destination``, reached through the
    server from every node), so artifacts never land on the disk of whichever node logs them."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None if uri.startswith(("http://", "https://")) else Path(artifact_root).resolve().as_uri()
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_KIND)
        except Exception:  # another process (a concurrent trial) created it first
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
    if exp is not None:
        exp_id = exp.experiment_id
        if exp.tags.get("mlflow.experimentKind") is None:
            client.set_experiment_tag(exp_id, *next(iter(EXPERIMENT_KIND.items())))
    run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    return Tracker(uri, run.info.run_id)


def experiment_id(uri: str, run_id: str) -> str:
    return _client(uri).get_run(run_id).info.experiment_id


def reopen_run(uri: str, run_id: str) -> Tracker:
    """Continue a run after a resume: same run id, status back to RUNNING."""
    client = _client(uri)
    client.update_run(run_id, status="RUNNING")
    return Tracker(uri, run_id)


def open_run(uri: str | None, run_id: str | None, rank: int) -> NullTracker:
    """The worker-side tracker: a :class:`BufferedTracker` on rank 0, a :class:`NullTracker` elsewhere."""
    if rank != 0 or not uri or not run_id:
        return NullTracker()
    return BufferedTracker(uri, run_id)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one metric, in step order, a step logged again (a resumed run) after its first
    (tests and reports)."""
    history = sorted(_client(uri).get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [(m.step, m.value) for m in history]


def run_data(uri: str, run_id: str):
    return _client(uri).get_run(run_id)


def list_artifacts(uri: str, run_id: str, path: str | None = None) -> list[str]:
    return [a.path for a in _client(uri).list_artifacts(run_id, path)]


def download_artifacts(uri: str, run_id: str, path: str, dst: str | Path) -> Path:
    """Copy a run's artifact folder to ``dst`` (e.g. a reference run's TOFU eval logs)."""
    try:
        return Path(_client(uri).download_artifacts(run_id, path, str(dst)))
    except Exception as exc:  # MlflowException: unknown run, missing artifact
        raise FlatRayError(f"cannot fetch artifacts {path!r} of MLflow run {run_id} from {uri}: "
                           f"{str(exc).splitlines()[0][:200]}") from None


def run_data_or_error(uri: str, run_id: str):
    missing_store = uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()
    try:
        if missing_store:  # do not create an empty store just to find nothing in it
            raise FileNotFoundError(uri)
        return _client(uri).get_run(run_id)
    except Exception:  # MlflowException for an unknown id
        raise FlatRayError(f"no MLflow run {run_id!r} in {uri}; give the id printed by `flat-ray train`") from None


def child_runs(uri: str, parent_run_id: str) -> list:
    """The runs nested under ``parent_run_id`` (a sweep's trials), oldest first."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=50000)
    return sorted(runs, key=lambda r: r.info.start_time)


def set_status(uri: str, run_id: str, status: str, tags: Mapping[str, Any] | None = None) -> None:
    """End a run with ``status`` (e.g. KILLED for a trial a scheduler stopped early)."""
    tracker = Tracker(uri, run_id)
    if tags:
        tracker.set_tags(tags)
    tracker.finish(status)
