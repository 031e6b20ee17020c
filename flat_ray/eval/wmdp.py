"""WMDP's evaluation (docs/eval.md, WMDP): lm-eval's multiple-choice accuracy on the hazardous-knowledge questions
of the forget corpus's domain (``wmdp_bio`` or ``wmdp_cyber``: lower is more forgotten, 0.25 is chance) and on
MMLU (utility), as WMDP and open-unlearning report them. ``eval.forget_tasks`` / ``eval.utility_tasks`` replace
the task lists (a local task under ``eval.tasks_include``, for example); ``eval.max_examples`` caps the questions
of each task. In a process group the ranks share each task's questions and every rank gets rank 0's numbers
(where ZeRO-3 evaluates from the shards, every rank runs all of them, so the forward passes stay in step):
:func:`flat_ray.eval.harness.run_lm_eval`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

UTILITY_TASKS = ("mmlu",)


def tasks(split: str, forget: str | None, utility: str | None) -> dict[str, list[str]]:
    """The lm-eval tasks of each side: WMDP's own for ``split`` (``bio``, ``cyber``; a retain split's domain) unless
    the config names others (comma-separated)."""
    def names(spec: str | None, default: Sequence[str]) -> list[str]:
        return [t.strip() for t in spec.split(",") if t.strip()] if spec else list(default)

    domain = split.removesuffix("_retain")
    return {"forget": names(forget, [f"wmdp_{domain}"]), "utility": names(utility, UTILITY_TASKS)}


def accuracy(results: Mapping[str, Mapping[str, float]], task: str) -> float:
    """A task's accuracy: lm-eval's ``acc`` (a group such as mmlu reports the mean of its subtasks)."""
    return float(results[task]["acc"])


def evaluate(model: Any, tokenizer: Any, task_lists: Mapping[str, list[str]], *, include_path: str | None,
             limit: int | None, batch_size: int, device: Any = "cpu") -> dict[str, float]:
    from flat_ray.eval.harness import run_lm_eval

    names = [*task_lists["forget"], *task_lists["utility"]]
    results = run_lm_eval(model, tokenizer, names, include_path=include_path, limit=limit, batch_size=batch_size,
                          device=str(device))
    out = {f"{task}_acc": accuracy(results, task) for task in names}
    out["forget_acc"] = float(np.mean([accuracy(results, t) for t in task_lists["forget"]]))
    out["utility_acc"] = float(np.mean([accuracy(results, t) for t in task_lists["utility"]]))
    return out
