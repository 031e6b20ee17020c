"""The per-worker function Ray Train runs: context from Ray, everything else from its config argument."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray.train
from ray.train import Checkpoint


def quiet_worker_logs() -> None:
    """flat_ray's progress lines at INFO; Ray Train's per-report chatter, torch's deprecation warnings and
    transformers' progress bars off."""
    import warnings

    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("flat_ray").setLevel(logging.INFO)
    names = ["ray.train", "ray.tune"]
    try:  # Ray Train V2 logs every report at INFO under a logger named by its file path
        from ray.train.v2._internal.execution import context as _ctx

        names.append(_ctx.__file__)
    except ImportError:
        pass
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_warning()


def use_reserved_cpus(cpus_per_worker: float) -> int:
    """torch's and OpenMP's threads follow the CPUs Ray reserved for this worker (``launch.cpus_per_worker``, at
    least 1). Ray's command runner starts nodes with OMP_NUM_THREADS=1, which every worker inherits: DeepSpeed's CPU
    Adam would run on one thread while the other reserved CPUs sit idle. Returns the thread count."""
    import torch

    threads = max(1, int(cpus_per_worker))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for OpenMP code loaded from here on (DeepSpeed's CPU ops)
    torch.set_num_threads(threads)
    return threads


def check_node_inputs(payload: Mapping[str, Any], node: str) -> None:
    """Fail with one line where this worker's node lacks a local file or folder the run opens here (the model, its
    tokenizer, the data, the template file). The driver found each of them and sent its absolute path, so a
    missing one is on the driver's machine only: on a multi-node cluster, a folder on the head's own disk."""
    from flat_ray.preflight import WORKER_INPUTS

    paths = {f"{section}.{key}": payload["run"][section].get(key) for section, key in WORKER_INPUTS}
    paths["model.name_or_path"] = payload["model_path"]  # the folder the driver resolved (the demo's built model)
    lacking = [f"{key} {path}" for key, path in paths.items()
               if path and Path(path).is_absolute() and not Path(path).exists()]
    if lacking:
        from flat_ray.errors import FlatRayError

        raise FlatRayError(f"node {node} has no {', '.join(lacking)}, which the run's driver found on its own "
                           "machine: on a multi-node cluster keep local models, data and templates on the shared "
                           "mount (the storage path's filesystem), or at the same path in every node's image")


def train_fn_per_worker(config: dict[str, Any]) -> None:
    from flat_ray.engine.loop import WorkerContext, train_worker
    from flat_ray.launch.relay import emitter

    quiet_worker_logs()
    use_reserved_cpus(config["run"]["launch"]["cpus_per_worker"])
    check_node_inputs(config, ray.util.get_node_ip_address())
    ctx = ray.train.get_context()
    wctx = WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(),
                         node=ray.get_runtime_context().get_node_id())
    emit = emitter(config.get("console"), wctx.rank)

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    # the run's own latest checkpoint (resume, restart after a failure) wins over a starting checkpoint
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        train_worker(config, wctx, report, restore_dir=config.get("restore_from"), emit=emit)
        return
    with checkpoint.as_directory() as restore_dir:
        train_worker(config, wctx, report, restore_dir=restore_dir, emit=emit)
