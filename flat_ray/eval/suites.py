"""Evaluation suites: what "evaluate" means for each benchmark, behind one interface.

A benchmark names its suite (``Benchmark.evaluation``). A suite gives the bounded evaluation rows for a config and
runs them on a model (every rank takes part; each returns the same gathered metrics, named as in
:data:`flat_ray.metrics.METRICS`). For ``flat-ray eval`` it also writes its own logs to a folder: TOFU's
per-question eval-log layout for TOFU-style benchmarks, ``summary.json`` for the others. The training loop's
per-epoch evaluation, the preflight checks and ``flat-ray eval`` all go through here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flat_ray.config import RunConfig
from flat_ray.data import BENCHMARKS
from flat_ray.eval import hp, muse, open_unlearning, wmdp
from flat_ray.eval.runner import eval_split_rows, evaluate_tofu
from flat_ray.eval.tofu import SplitValues, summarize, write_log_dir
from flat_ray.metrics import add_derived
from flat_ray.registry import Registry

PER_QUESTION = "per_question"  # a TOFU suite's summary also holds its per-question values (for eval.save_logs)


@dataclass(frozen=True)
class Suite:
    rows: Callable[[RunConfig, int | None], dict[str, list[dict]]]
    # (model, tokenizer, profile, rows, cfg, *, rank, world_size, device, reference_tr, reference_mia, progress)
    # -> summary
    run: Callable[..., dict[str, Any]]
    # (model, tokenizer, profile, rows, cfg, out_dir, meta, *, device, reference_tr, reference_mia) -> summary, logs
    # written to out_dir
    report: Callable[..., dict[str, Any]]
    # prefix of `flat-ray eval`'s MLflow metrics; None: the benchmark's name
    prefix: str | None = None


def _tofu_run(model, tokenizer, profile, rows, cfg: RunConfig, *, rank=0, world_size=1, device="cpu",
              reference_tr=None, reference_mia=None, progress=None) -> dict[str, Any]:
    values = evaluate_tofu(model, tokenizer, profile, rows, max_length=cfg.data.max_length,
                           batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens, rank=rank,
                           world_size=world_size, device=device, progress=progress, gradnorm=cfg.eval.mia_gradnorm)
    return {**summarize(values, truth_ratio=cfg.eval.truth_ratio, reference_tr=reference_tr,
                        reference_mia=reference_mia), PER_QUESTION: values}


def _tofu_report(model, tokenizer, profile, rows, cfg: RunConfig, out_dir: Path, meta: Mapping[str, Any], *,
                 device="cpu", reference_tr=None, reference_mia=None) -> dict[str, Any]:
    """TOFU-format logs (per question, one file per split) and the summary, as TOFU's own evaluation writes, and
    open-unlearning's ``TOFU_EVAL.json`` / ``TOFU_SUMMARY.json`` of the same values."""
    values = evaluate_tofu(model, tokenizer, profile, rows, max_length=cfg.data.max_length,
                           batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                           gradnorm=cfg.eval.mia_gradnorm, device=device)
    return write_tofu_logs(out_dir, values, cfg.eval.truth_ratio, reference_tr, meta, reference_mia)


def write_tofu_logs(out_dir: Path, values: Mapping[str, SplitValues], truth_ratio: str, reference_tr,
                    meta: Mapping[str, Any], reference_mia: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One evaluation's per-question values in both formats (TOFU's eval logs, open-unlearning's files); returns
    its summary."""
    summary = summarize(values, truth_ratio=truth_ratio, reference_tr=reference_tr, reference_mia=reference_mia)
    write_log_dir(out_dir, values, summary, meta)
    open_unlearning.write(out_dir, values, None if reference_tr is None else 1.0 / np.asarray(reference_tr),
                          reference_mia)
    return summary


def _summary_report(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A suite whose logs are its summary: ``summary.json`` beside the run's metadata."""
    def report(model, tokenizer, profile, rows, cfg: RunConfig, out_dir: Path, meta: Mapping[str, Any], *,
               device="cpu", reference_tr=None, reference_mia=None) -> dict[str, Any]:
        summary = run(model, tokenizer, profile, rows, cfg, device=device)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps({**meta, **summary}, indent=2))
        return summary
    return report


def _muse_run(model, tokenizer, profile, rows, cfg: RunConfig, *, rank=0, world_size=1, device="cpu",
              reference_tr=None, reference_mia=None, progress=None) -> dict[str, Any]:
    return add_derived(muse.evaluate(model, tokenizer, rows, batch_size=cfg.eval.batch_size,
                                     auc_retrain=cfg.eval.privleak_auc_retrain, rank=rank, world_size=world_size,
                                     device=device))


def _hp_run(model, tokenizer, profile, rows, cfg: RunConfig, *, rank=0, world_size=1, device="cpu",
            reference_tr=None, reference_mia=None, progress=None) -> dict[str, Any]:
    return add_derived(hp.evaluate(model, tokenizer, rows, max_new_tokens=cfg.eval.max_new_tokens,
                                   batch_size=cfg.eval.batch_size, rank=rank, world_size=world_size, device=device))


def _wmdp_run(model, tokenizer, profile, rows, cfg: RunConfig, *, rank=0, world_size=1, device="cpu",
              reference_tr=None, reference_mia=None, progress=None) -> dict[str, Any]:
    return add_derived(wmdp.evaluate(model, tokenizer, rows, include_path=cfg.eval.tasks_include,
                                     limit=cfg.eval.max_examples, batch_size=cfg.eval.batch_size, device=device))


def interim_rows(rows: Mapping[str, list[dict]], n: int) -> dict[str, list[dict]]:
    """The first ``n`` questions of each split; a completion file's rows stay whole, its first ``n`` scored (FLAT pads
    each prompt as among all of them)."""
    return {split: hp.first_rows(part, n) if part and "scored" in part[0] else part[:n]
            for split, part in rows.items()}


def scored(part: list[dict]) -> int:
    """How many of a split's rows an evaluation scores (a completion file's are flagged)."""
    return sum(r["scored"] for r in part) if part and "scored" in part[0] else len(part)


def _whole(name: str, run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A suite whose evaluation is one piece for progress purposes: reported as 0/1, then 1/1."""
    def wrapped(*args, progress=None, **kwargs) -> dict[str, Any]:
        if progress:
            progress(name, 0, 1)
        out = run(*args, **kwargs)
        if progress:
            progress(name, 1, 1)
        return out
    return wrapped


SUITES: Registry[Suite] = Registry("evaluation suite")
SUITES.register("tofu", Suite(
    lambda cfg, limit: eval_split_rows(cfg.data.benchmark, cfg.data.split, cfg.data.data_dir, limit, cfg.eval.mia),
    _tofu_run,
    _tofu_report, prefix="tofu"))
SUITES.register("muse", Suite(lambda cfg, limit: muse.eval_rows(cfg.data.benchmark, cfg.data.data_dir, limit),
                              _whole("muse", _muse_run), _summary_report(_muse_run)))
SUITES.register("hp", Suite(
    lambda cfg, limit: hp.eval_rows(cfg.data.benchmark, cfg.data.data_dir, limit, cfg.eval.prompt_words,
                                    cfg.eval.completion_file),
    _whole("completion", _hp_run), _summary_report(_hp_run)))


def _wmdp_rows(cfg: RunConfig, limit: int | None) -> dict[str, list[str]]:
    """The lm-eval tasks, checked against lm-eval's index (a misspelt task fails in the preflight, not in a worker)."""
    from flat_ray.eval.harness import task_manager

    names = wmdp.tasks(cfg.data.split, cfg.eval.forget_tasks, cfg.eval.utility_tasks)
    task_manager([*names["forget"], *names["utility"]], cfg.eval.tasks_include)
    return names


SUITES.register("wmdp", Suite(_wmdp_rows, _whole("lm-eval", _wmdp_run), _summary_report(_wmdp_run), prefix="wmdp"))


def suite_for(cfg: RunConfig) -> Suite:
    return SUITES[BENCHMARKS[cfg.data.benchmark].evaluation]
