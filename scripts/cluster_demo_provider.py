"""The node provider of scripts/cluster_demo.py: Ray's fake multi-node provider, plus what a cloud provider knows.

Ray's ``FakeMultiNodeProvider`` starts each node as raylet processes on this machine and lists it until the
autoscaler terminates it. When those processes die on their own (the demo SIGKILLs them, as a lost machine), it
keeps listing the node, and the autoscaler keeps counting it. On a cloud, the instance would be reported gone,
and the autoscaler would add another node for the work still waiting. Ray's own guard for lost nodes (terminate one
without a heartbeat) never fires there either: a node that no longer reports is treated as never having reported
and marked active again. This subclass only closes that gap: a worker node whose raylet has exited is no longer
listed (and what is left of it is killed), as a cloud provider lists only running instances. Everything else is
Ray's provider. The head loads it as an ``external`` provider (``scripts/`` is on its PYTHONPATH).

It also gives a node the ``memory`` its node type declares. A cloud node type's memory is what the autoscaler plans
with and what the node's raylet reports; Ray's fake provider passes every declared resource but CPU and GPU as a
custom resource, which Ray refuses for ``memory``, so a node type could not declare it at all.
"""

from __future__ import annotations

import contextlib
import functools

import ray._private.parameter
from ray._private import ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class LostNodeAwareProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        resources = dict(resources)
        memory = resources.pop("memory", None)
        with _node_memory(memory):
            super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)

    def non_terminated_nodes(self, tag_filters):
        with self.lock:
            for node_id, entry in list(self._nodes.items()):
                node = entry.get("node")  # the head has none: it is not this provider's to start or lose
                if node is not None and not _raylet_alive(node):
                    self._nodes.pop(node_id)
                    node.kill_all_processes(check_alive=False, allow_graceful=False)
        return super().non_terminated_nodes(tag_filters)


def _raylet_alive(node) -> bool:
    raylets = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])
    return any(info.process.poll() is None for info in raylets)


@contextlib.contextmanager
def _node_memory(memory):
    """While Ray's provider builds a node's parameters, they carry ``memory`` (Ray's own argument for it)."""
    if memory is None:
        yield
        return
    original = ray._private.parameter.RayParams
    ray._private.parameter.RayParams = functools.partial(original, memory=int(memory))
    try:
        yield
    finally:
        ray._private.parameter.RayParams = original
