"""Carries rank 0's progress events to the driver's console.

Worker output (Ray, DeepSpeed, transformers, absl) stays in Ray's log files unless ``flat-ray --verbose``; what a
person should see travels here instead: rank 0 pushes small dicts to a zero-CPU actor (fire and forget, in
order), and a thread on the driver drains it into a :class:`flat_ray.console.RunConsole`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import ray

POLL_S = 0.25
DRAIN_TIMEOUT_S = 5.0


@ray.remote(num_cpus=0)
class _Sink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def push(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out


class Relay:
    """``with Relay(console) as handle:`` put ``handle`` in the workers' payload; events reach ``console``."""

    def __init__(self, console: Any):
        self.console = console
        self.sink = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="flat-ray-console", daemon=True)

    def __enter__(self):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.sink = _Sink.options(scheduling_strategy=here).remote()  # on the driver's node: lives as long as it
        self._thread.start()
        return self.sink

    def _drain(self) -> bool:
        """Show what arrived; False once the sink or the console fails (the console never takes a run down)."""
        try:
            for event in ray.get(self.sink.drain.remote(), timeout=DRAIN_TIMEOUT_S):
                self.console.handle(event)
        except Exception:  # noqa: BLE001 - a lost sink (its node died), a console error: progress stops, the run not
            return False
        return True

    def _pump(self) -> None:
        while not self._stop.wait(POLL_S) and self._drain():
            pass

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * DRAIN_TIMEOUT_S)
        try:
            self._drain()
        finally:
            ray.kill(self.sink)
            self.console.close()


def emitter(handle: Any, rank: int) -> Callable[[dict[str, Any]], None] | None:
    """The worker side: rank 0 sends events to the driver's sink; other ranks (and runs without a console, such
    as sweep trials) send nothing."""
    if handle is None or rank != 0:
        return None
    return lambda event: handle.push.remote(event)
