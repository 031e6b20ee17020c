"""Killing a flat-ray process the way a lost machine would: the process and everything it started, its Ray Train
and Tune processes on the suite's Ray included."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil

# Ray names an actor's process after it: a Tune trial function, Ray Train's controller and its workers
JOB_PROCESSES = ("ray::ImplicitFunc", "ray::TrainController", "ray::RayTrainWorker")


def job_processes() -> set[psutil.Process]:
    """The trial functions, Ray Train controllers and workers alive on this machine (in the suite: those of the one
    run or sweep under way)."""
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        if " ".join(proc.info["cmdline"] or []).startswith(JOB_PROCESSES):
            found.add(proc)
    return found


def _tree(root: psutil.Process) -> set[psutil.Process]:
    try:
        own = {root, *root.children(recursive=True)}
    except psutil.NoSuchProcess:
        own = set()
    return own | job_processes()


def kill_tree(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL ``proc`` (started with ``start_new_session=True``) and every process below it, and return only once all
    of them are gone.

    The driver joined the suite's Ray, so its trial functions, Ray Train controller and workers are not its
    descendants: Ray ends them once it sees the driver gone, and meanwhile the controller could still register a
    checkpoint and a trial function could mark its MLflow run failed. So they and the driver's own tree are frozen
    first (a stopped process cannot start another), then killed, then awaited: nothing of the old run writes
    anything after this returns."""
    try:
        root = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        proc.wait(timeout)
        return
    frozen: set[psutil.Process] = set()
    while True:
        found = _tree(root) | {p for p in frozen if p.is_running()}
        new = found - frozen
        if not new:
            break
        for p in new:
            try:
                p.send_signal(signal.SIGSTOP)
            except psutil.NoSuchProcess:
                pass
        frozen |= new
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in frozen:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout)
    _, alive = psutil.wait_procs(list(frozen - {root}), timeout=timeout)
    assert not alive, f"processes of the killed run are still alive: {alive}"


def start_server(cmd: list[str], url: str, what: str, timeout: float = 120) -> subprocess.Popen:
    """Start a local server (its own session, output dropped) and return once ``url`` answers."""
    import time
    import urllib.request

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.2)

