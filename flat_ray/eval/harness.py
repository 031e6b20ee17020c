"""General utility through lm-evaluation-harness (``lm_eval.simple_evaluate`` over an in-memory model).

The default task list is the FLAT paper's zero-shot set plus wikitext perplexity. Tasks defined as local YAML
(with local data files) are found through ``include_path``; offline, a task whose dataset is not cached fails
with a message naming it and the way to provide it.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flat_ray.distributed import broadcast_object, multi_process, partitioned
from flat_ray.errors import FlatRayError

log = logging.getLogger(__name__)

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_challenge", "arc_easy", "openbookqa", "piqa",
               "truthfulqa_mc1", "truthfulqa_mc2", "wikitext")
PAPER_ACC_TASKS = PAPER_TASKS[:-1]  # the zero-shot tasks FLAT averages
PAPER_AVERAGE = "paper_average"


def parse_tasks(spec: str) -> list[str]:
    """``"default"`` -> the paper's set; otherwise a comma-separated list."""
    if spec.strip() == "default":
        return list(PAPER_TASKS)
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise FlatRayError("--tasks needs 'default' or a comma-separated list of lm-eval task names")
    return tasks


def lm_eval_version() -> str:
    return md.version("lm_eval")


@functools.lru_cache(maxsize=4)
def _task_index(include_path: str | None) -> Any:
    """lm-eval's index of every task it ships (plus ``include_path``'s): seconds of YAML scanning, done once per
    process and folder (a task file edited later in the same process is not seen again)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def task_manager(tasks: Sequence[str], include_path: str | None = None) -> Any:
    """lm-eval's task index, after checking that every name in ``tasks`` is in it (call before loading a model)."""
    manager = _task_index(str(Path(include_path).resolve()) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = " or define it in a YAML file under --tasks-include" if include_path is None else ""
        raise FlatRayError(f"unknown lm-eval task(s): {', '.join(unknown)}; see `lm-eval ls tasks`{hint}")
    return manager


def _lm(model: Any, tokenizer: Any, batch_size: int, device: str) -> Any:
    """lm-eval's wrapper of an already loaded model. In a process group, and where the model holds its full
    weights, each rank gets its share of every task's questions (lm-eval's own data-parallel path: it pads the
    shares to one length and gathers the answers on rank 0) over torch.distributed instead of accelerate; a model
    holding ZeRO-3 partitions runs every question on every rank, so that the ranks' forward passes stay in step."""
    from lm_eval.models.huggingface import HFLM

    if not multi_process() or partitioned(model):
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)

    class ShardedLM(HFLM):
        def all_gather(self, tensor):
            parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor)
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def barrier(self):
            dist.barrier()

    lm = ShardedLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    lm._rank, lm._world_size = dist.get_rank(), dist.get_world_size()
    return lm


def run_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str], *, include_path: str | None = None,
                limit: int | None = None, batch_size: int = 8, device: str = "cpu",
                manager: Any = None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for ``tasks`` on an already loaded model; in a process group every rank
    returns rank 0's numbers."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager(tasks, include_path)
    lm = _lm(model, tokenizer, batch_size, device)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  log_samples=False, bootstrap_iters=0)
    except Exception as exc:  # datasets' offline/ConnectionError/DatasetNotFoundError, arriving wrapped
        text = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise FlatRayError(f"lm-eval could not load the data of task(s) {', '.join(tasks)} ({text}); offline, run "
                           "once online to fill the datasets cache, or define the task in a local YAML with local "
                           "data files and pass its folder as --tasks-include") from None
    results = broadcast_object(results)  # lm-eval returns them on rank 0 only
    return with_paper_average(flatten(results["results"]))


def flatten(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's per-task results as ``{task: {metric: value}}`` (its ``acc,none`` keys cut to ``acc``; stderrs
    and aliases dropped)."""
    return {task: {k.split(",")[0]: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not k.startswith("alias") and "_stderr" not in k}
            for task, metrics in results.items()}


def with_paper_average(out: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Adds ``paper_average: {acc}`` where every zero-shot task of the paper's set ran: the number FLAT's
    evaluate.py reports as average accuracy, the plain mean of each task's ``acc`` (never ``acc_norm``), TruthfulQA's
    mc1 and mc2 counted as two tasks."""
    if all("acc" in out.get(t, {}) for t in PAPER_ACC_TASKS):
        out = {**out, PAPER_AVERAGE: {"acc": sum(out[t]["acc"] for t in PAPER_ACC_TASKS) / len(PAPER_ACC_TASKS)}}
    return out
