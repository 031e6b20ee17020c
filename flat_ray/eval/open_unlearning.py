"""open-unlearning's TOFU result files, written from flat_ray's per-question values (docs/eval.md).

open-unlearning's evaluator keeps one JSON object per model, ``TOFU_EVAL.json``: every metric it computed, the
inputs of other metrics included, as ``{"agg_value": x, "value_by_index": {"<question index>": {...}}}``, and
``TOFU_SUMMARY.json`` with the ``agg_value`` of each. Writing the same objects lets a flat_ray evaluation drop
into their tooling (their ``retain_logs_path`` takes our file) and be another run's ``eval.reference``.

Per split (their prefixes: forget, retain, ra = real authors, wf = world facts), from the four per-question
values TOFU's logs hold:

- ``<p>_Q_A_Prob``: per question ``prob`` = exp(-L(answer)) and ``avg_loss`` = L(answer) (mean NLL per answer
  token); aggregate: the mean ``prob``.
- ``<p>_Q_A_PARA_Prob`` (forget and retain): the same for the paraphrased answer.
- ``<p>_Q_A_PERT_Prob``: lists of ``prob`` and ``avg_loss``, one per perturbed answer; aggregate: the mean over
  questions and answers.
- ``<p>_Q_A_ROUGE``: ``rougeL_recall`` of the greedy answer (and its text); aggregate: the mean.
- ``<p>_Q_A_Prob_normalised`` (ra, wf): P(answer) / (P(answer) + sum of P(perturbed) + 1e-10); the mean.
- truth ratio (``forget_truth_ratio``, ``retain_Truth_Ratio``, ``ra_Truth_Ratio``, ``wf_Truth_Ratio``): per
  question ``score`` = wrong / (correct + 1e-10), wrong = exp(-mean L(perturbed)), correct = exp(-L(paraphrased))
  for forget and retain and exp(-L(answer)) for ra and wf. Aggregate: forget, mean of min(s, 1 / (s + 1e-10))
  (closer to 1 is better); the others, mean of max(0, 1 - s) (the true answer is better).
- ``model_utility``: harmonic mean of the nine numbers retain_Q_A_Prob, retain_Q_A_ROUGE, retain_Truth_Ratio and
  ra/wf's Q_A_Prob_normalised, Q_A_ROUGE and Truth_Ratio.
- ``forget_quality``: the KS-test p-value of the forget scores against the reference's (with a reference).

Their truth ratio is the geometric form, so their ``model_utility`` is flat_ray's with ``eval.truth_ratio=geometric``
(and differs from the arithmetic default, which reproduces TOFU's published numbers). Their default TOFU
evaluation also has ``privleak`` and ``extraction_strength``, which flat_ray does not compute: those keys are absent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import hmean, ks_2samp

from flat_ray.eval.tofu import LOG_FILES, OPEN_UNLEARNING_EVAL, SplitValues, read_log_dir
from flat_ray.fileio import atomic_write_text

SUMMARY_FILE = "TOFU_SUMMARY.json"
PREFIX = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}
TRUTH_RATIO_KEY = {"forget": "forget_truth_ratio", "retain": "retain_Truth_Ratio", "real_authors": "ra_Truth_Ratio",
                   "world_facts": "wf_Truth_Ratio"}
UTILITY_KEYS = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE",
                "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")
EPS = 1e-10  # open-unlearning's guard in every ratio


def _per_question(values: list[Any]) -> dict[str, Any]:
    return {str(i): v for i, v in enumerate(values)}


def _probability(losses: np.ndarray) -> dict[str, Any]:
    """One ``probability`` metric: per question its prob and avg_loss (lists for several answers)."""
    probs = np.exp(-losses)

    def kept(x: np.ndarray) -> Any:  # a question with fewer perturbed answers has NaN in the missing places
        return x[~np.isnan(x)].tolist() if x.ndim else float(x)

    rows = [{"prob": kept(p), "avg_loss": kept(loss)} for p, loss in zip(probs, losses, strict=True)]
    return {"agg_value": float(np.nanmean(probs)), "value_by_index": _per_question(rows)}


def _truth_ratio(split: str, correct_loss: np.ndarray, perturbed_loss: np.ndarray) -> dict[str, Any]:
    wrong, correct = np.exp(-np.nanmean(perturbed_loss, -1)), np.exp(-correct_loss)
    scores = wrong / (correct + EPS)
    agg = np.mean(np.minimum(scores, 1 / (scores + EPS))) if split == "forget" else np.mean(np.maximum(0, 1 - scores))
    return {"agg_value": float(agg), "value_by_index": _per_question([{"score": float(s)} for s in scores])}


def _rouge(v: SplitValues) -> dict[str, Any]:
    rows = []
    for i, recall in enumerate(v.rougeL_recall.tolist()):
        row: dict[str, Any] = {"rougeL_recall": recall}
        if i < len(v.generated_text) and len(v.generated_text[i]) == 3:
            prompt, generation, truth = v.generated_text[i]
            row.update(input=prompt, generation=generation, ground_truth=truth)
        rows.append(row)
    return {"agg_value": float(np.mean(v.rougeL_recall)), "value_by_index": _per_question(rows)}


def _split_logs(split: str, v: SplitValues) -> dict[str, dict[str, Any]]:
    p = PREFIX[split]
    logs = {f"{p}_Q_A_Prob": _probability(v.avg_gt_loss), f"{p}_Q_A_PERT_Prob": _probability(v.average_perturb_loss),
            f"{p}_Q_A_ROUGE": _rouge(v)}
    if split in ("forget", "retain"):
        logs[f"{p}_Q_A_PARA_Prob"] = _probability(v.avg_paraphrased_loss)
        logs[TRUTH_RATIO_KEY[split]] = _truth_ratio(split, v.avg_paraphrased_loss, v.average_perturb_loss)
    else:
        correct = np.exp(-v.avg_gt_loss)
        normalised = correct / (correct + np.nansum(np.exp(-v.average_perturb_loss), -1) + EPS)
        logs[f"{p}_Q_A_Prob_normalised"] = {"agg_value": float(np.mean(normalised)), "value_by_index": _per_question(
            [{"prob": float(x)} for x in normalised])}
        logs[TRUTH_RATIO_KEY[split]] = _truth_ratio(split, v.avg_gt_loss, v.average_perturb_loss)
    return logs


def eval_logs(splits: Mapping[str, SplitValues], reference_scores: np.ndarray | None = None) -> dict[str, Any]:
    """``TOFU_EVAL.json``'s object for these splits; ``reference_scores`` are the reference (retain) model's
    forget ``score`` values (wrong/correct, as in its own file) for ``forget_quality``."""
    logs: dict[str, Any] = {}
    for split, values in splits.items():
        if split in PREFIX:
            logs.update(_split_logs(split, values))
    if all(k in logs for k in UTILITY_KEYS):
        logs["model_utility"] = {"agg_value": float(hmean([logs[k]["agg_value"] for k in UTILITY_KEYS]))}
    if reference_scores is not None and "forget_truth_ratio" in logs:
        logs["forget_quality"] = {"agg_value": float(ks_2samp(forget_scores(logs), reference_scores).pvalue)}
    return dict(sorted(logs.items()))


def forget_scores(logs: Mapping[str, Any]) -> np.ndarray:
    """The per-question forget truth-ratio scores (wrong/correct) of a ``TOFU_EVAL.json`` object, in index order."""
    by_index = logs["forget_truth_ratio"]["value_by_index"]
    return np.asarray([by_index[k]["score"] for k in sorted(by_index, key=int)], dtype=float)


def write(directory: str | Path, splits: Mapping[str, SplitValues],
          reference_scores: np.ndarray | None = None) -> Path:
    """``TOFU_EVAL.json`` and ``TOFU_SUMMARY.json`` in ``directory``; returns the first."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    logs = eval_logs(splits, reference_scores)
    atomic_write_text(d / OPEN_UNLEARNING_EVAL, json.dumps(logs, indent=1))
    summary = {k: v["agg_value"] for k, v in logs.items() if v.get("agg_value") is not None}
    atomic_write_text(d / SUMMARY_FILE, json.dumps(summary, indent=4))
    return d / OPEN_UNLEARNING_EVAL


def read(path: str | Path) -> dict[str, SplitValues]:
    """The per-question values of the splits a ``TOFU_EVAL.json`` holds (a split needs its Q_A_Prob, PERT_Prob and
    ROUGE entries; forget and retain their PARA_Prob too), so flat_ray computes its own metrics from it, in any
    truth-ratio variant. A real-authors / world-facts "paraphrase" is the answer, as in flat_ray's evaluation."""
    p = Path(path)
    logs = json.loads(p.read_text(encoding="utf-8"))
    found = {}
    for split, prefix in PREFIX.items():
        keys = [f"{prefix}_Q_A_Prob", f"{prefix}_Q_A_PERT_Prob", f"{prefix}_Q_A_ROUGE"]
        if split in ("forget", "retain"):
            keys.append(f"{prefix}_Q_A_PARA_Prob")
        if not all(isinstance(logs.get(k), Mapping) and "value_by_index" in logs[k] for k in keys):
            continue
        rows = {k: logs[k]["value_by_index"] for k in keys}
        order = sorted(rows[keys[0]], key=int)
        gt = np.asarray([rows[keys[0]][i]["avg_loss"] for i in order], dtype=float)
        pert_rows = [list(rows[keys[1]][i]["avg_loss"]) for i in order]
        width = max((len(r) for r in pert_rows), default=0)
        pert = np.asarray([r + [math.nan] * (width - len(r)) for r in pert_rows], dtype=float).reshape(len(order), width)
        para = np.asarray([rows[keys[3]][i]["avg_loss"] for i in order], dtype=float) if len(keys) == 4 else gt.copy()
        rouge = rows[keys[2]]
        texts = [[rouge[i].get("input", ""), rouge[i].get("generation", ""), rouge[i].get("ground_truth", "")]
                 for i in order]
        found[split] = SplitValues(gt, para, pert, np.asarray([rouge[i]["rougeL_recall"] for i in order], dtype=float),
                                   texts)
    return found


def read_logs(directory: str | Path) -> dict[str, SplitValues]:
    """A folder's per-question values: TOFU's eval logs where it has them, else open-unlearning's file."""
    d = Path(directory)
    if not any((d / f).is_file() for f in LOG_FILES.values()) and (d / OPEN_UNLEARNING_EVAL).is_file():
        return read(d / OPEN_UNLEARNING_EVAL)
    return read_log_dir(d)
