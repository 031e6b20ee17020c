"""Killing a flat-ray process the way a lost machine would: the process and everything it started."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil


def _tree(root: psutil.Process) -> set[psutil.Process]:
    try:
        return {root, *root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def kill_tree(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL ``proc`` (started with ``start_new_session=True``) and every process below it, and return only once all
    of them are gone.

    Ray's GCS, raylet, Train controller and workers are descendants of the driver, but not all of them share its
    process group, and after a bare ``killpg`` they can live on for a moment; Ray Train's controller may still register
    a checkpoint then. So the whole tree is frozen first (a stopped process cannot start another), then killed, then
    awaited: nothing of the old run writes anything after this returns."""
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
