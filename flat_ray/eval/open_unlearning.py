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
(and differs from the arithmetic default, which reproduces TOFU's published numbers). With membership inference on
(``eval.mia``) the file also holds ``mia_loss``, ``mia_zlib``, ``mia_min_k``, ``mia_min_k_plus_plus`` (and
``mia_gradnorm`` with ``eval.mia_gradnorm``; the AUC with
each side's per-question scores), ``privleak``, ``extraction_strength`` and ``exact_memorization``, as theirs does
(:mod:`flat_ray.eval.mia`); a retain model's file gives its ``mia_min_k`` AUC to PrivLeak.
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


def eval_logs(splits: Mapping[str, SplitValues], reference_scores: np.ndarray | None = None,
              reference_mia: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``TOFU_EVAL.json``'s object for these splits; ``reference_scores`` are the reference (retain) model's
    forget ``score`` values (wrong/correct, as in its own file) for ``forget_quality``, ``reference_mia`` its
    Min-K% AUC and per-question losses (``privleak``, ``mia_reference``)."""
    logs: dict[str, Any] = {}
    for split, values in splits.items():
        if split in PREFIX:
            logs.update(_split_logs(split, values))
    if all(k in logs for k in UTILITY_KEYS):
        logs["model_utility"] = {"agg_value": float(hmean([logs[k]["agg_value"] for k in UTILITY_KEYS]))}
    if reference_scores is not None and "forget_truth_ratio" in logs:
        logs["forget_quality"] = {"agg_value": float(ks_2samp(forget_scores(logs), reference_scores).pvalue)}
    forget = splits.get("forget")
    if forget is not None and forget.stats and forget.holdout_stats:
        logs.update(_mia_logs(forget, reference_mia))
    return dict(sorted(logs.items()))


def _mia_logs(forget: SplitValues, reference_mia: Mapping[str, Any] | None) -> dict[str, Any]:
    """open-unlearning's membership-inference and memorization entries: per attack the AUC with each side's
    per-question scores, ``privleak`` and the two memorization metrics with their per-question scores."""
    from flat_ray.eval import mia

    summary = mia.metrics(forget.stats, forget.holdout_stats, reference_mia)

    def side(scores: np.ndarray) -> dict[str, Any]:
        return {"agg_value": float(np.mean(scores)),
                "value_by_index": {str(i): {"score": float(v)} for i, v in enumerate(scores)}}

    logs: dict[str, Any] = {name: {"agg_value": summary[name], "auc": summary[name],
                                   "forget": side(forget.stats[stat]), "holdout": side(forget.holdout_stats[stat])}
                            for name, stat in mia.ATTACKS.items() if name in summary}
    logs["privleak"] = {"agg_value": summary["privleak"]}
    if "mia_reference" in summary:
        logs["mia_reference"] = {"agg_value": summary["mia_reference"], "auc": summary["mia_reference"]}
    for name, stat in (("extraction_strength", "es"), ("exact_memorization", "em")):
        logs[name] = {"agg_value": summary[name],
                      "value_by_index": {str(i): {"score": None if np.isnan(v) else float(v)}
                                         for i, v in enumerate(forget.stats[stat])}}
    return logs


def forget_scores(logs: Mapping[str, Any]) -> np.ndarray:
    """The per-question forget truth-ratio scores (wrong/correct) of a ``TOFU_EVAL.json`` object, in index order."""
    by_index = logs["forget_truth_ratio"]["value_by_index"]
    return np.asarray([by_index[k]["score"] for k in sorted(by_index, key=int)], dtype=float)


def write(directory: str | Path, splits: Mapping[str, SplitValues],
          reference_scores: np.ndarray | None = None, reference_mia: Mapping[str, Any] | None = None) -> Path:
    """``TOFU_EVAL.json`` and ``TOFU_SUMMARY.json`` in ``directory``; returns the first."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    logs = eval_logs(splits, reference_scores, reference_mia)
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
    """A folder's per-question values: TOFU's eval logs where it has them, else open-unlearning's file; the forget
    split's membership statistics from open-unlearning's file when it has them."""
    d = Path(directory)
    if not any((d / f).is_file() for f in LOG_FILES.values()) and (d / OPEN_UNLEARNING_EVAL).is_file():
        found = read(d / OPEN_UNLEARNING_EVAL)
    else:
        found = read_log_dir(d)
    if "forget" in found and (d / OPEN_UNLEARNING_EVAL).is_file():
        stats = read_mia(d / OPEN_UNLEARNING_EVAL)
        if stats is not None:
            found["forget"].stats, found["forget"].holdout_stats = stats
    return found


def read_mia(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """The forget and held-out questions' statistics (:mod:`flat_ray.eval.mia`) that a ``TOFU_EVAL.json`` holds
    per question, or None when it lacks any of them."""
    from flat_ray.eval import mia

    logs = json.loads(Path(path).read_text(encoding="utf-8"))

    def scores(entry: Any) -> np.ndarray:
        by_index = entry["value_by_index"]
        return np.asarray([math.nan if by_index[k]["score"] is None else by_index[k]["score"]
                           for k in sorted(by_index, key=int)], dtype=float)

    attacks = {name: stat for name, stat in mia.ATTACKS.items() if stat != mia.GRADNORM or name in logs}
    try:
        forget = {stat: scores(logs[name]["forget"]) for name, stat in attacks.items()}
        holdout = {stat: scores(logs[name]["holdout"]) for name, stat in attacks.items()}
        forget["es"], forget["em"] = scores(logs["extraction_strength"]), scores(logs["exact_memorization"])
    except (KeyError, TypeError):
        return None
    return forget, holdout
