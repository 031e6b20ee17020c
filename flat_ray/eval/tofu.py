"""TOFU metrics from per-question values (docs/eval.md), and TOFU-format eval logs in and out.

Per question the evaluation needs ``avg_gt_loss`` (mean NLL per answer token), ``avg_paraphrased_loss`` (the
paraphrased answer, or the answer itself for real authors / world facts), ``average_perturb_loss`` (one value
per perturbed answer) and ``rougeL_recall`` of a greedy generation. Everything else is computed from those four,
exactly as TOFU's ``aggregate_stat_eval.py`` does, so published logs and flat-ray's own results compare directly.

Truth ratio, two variants (the registry of :mod:`flat_ray.ratios`):

- ``arithmetic`` (default): R = mean_j P(perturbed_j) / P(ã), with P = exp(-L). With it, model utility of TOFU's
  published Llama-2-7b-chat logs is 0.585886 (full) and 0.575240 (retain90), the numbers TOFU reports; that is why
  it is the default.
- ``geometric``: R = exp(L(ã) - mean_j L(perturbed_j)), the geometric-mean form of TOFU's aggregation script.

Forget quality is always the KS-test p-value between the geometric truth ratios of the unlearned model and of a
reference (retain) model on the forget split, as TOFU's aggregation computes it. The per-question ratio comes in
two orientations, and both samples of the KS test must have the same one (the test is unchanged only when *both*
are inverted):

- correct/wrong, exp(mean_j L(perturbed_j) - L(ã)) (:func:`forget_truth_ratios`): what TOFU's aggregation script
  and flat_ray compare;
- wrong/correct, exp(L(ã) - mean_j L(perturbed_j)) (:func:`log_truth_ratios`): what TOFU's eval logs store under
  ``truth_ratio`` and open-unlearning under ``forget_truth_ratio`` (so :func:`read_reference` inverts those).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import hmean, ks_2samp

from flat_ray.errors import FlatRayError
from flat_ray.metrics import add_derived
from flat_ray.ratios import DEFAULT_TRUTH_RATIO, TRUTH_RATIOS

# TOFU's eval-log file for each evaluation split
LOG_FILES = {
    "forget": "eval_log_forget.json",
    "retain": "eval_log.json",
    "real_authors": "eval_real_author_wo_options.json",
    "world_facts": "eval_real_world_wo_options.json",
}
OPEN_UNLEARNING_EVAL = "TOFU_EVAL.json"  # open-unlearning's per-model result file (flat_ray.eval.open_unlearning)
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
NORMALISED_PROB_SPLITS = ("real_authors", "world_facts")  # probability normalised over the perturbed options




@dataclass
class SplitValues:
    """Per-question values of one split (index i is the same question in every array)."""

    avg_gt_loss: np.ndarray
    avg_paraphrased_loss: np.ndarray
    average_perturb_loss: np.ndarray  # (N, K)
    rougeL_recall: np.ndarray
    generated_text: list[list[str]] = field(default_factory=list)  # [prompt, generation, ground truth] per question
    # forget split with membership inference (flat_ray.eval.mia): per-question statistics of its questions and of
    # the held-out questions they are compared with; empty when not computed
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    holdout_stats: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.avg_gt_loss)
        if not (len(self.avg_paraphrased_loss) == len(self.average_perturb_loss) == len(self.rougeL_recall) == n):
            raise ValueError("per-question arrays of a split must have the same length")


def split_metrics(name: str, v: SplitValues, truth_ratio: str = DEFAULT_TRUTH_RATIO) -> dict[str, float]:
    """``{"prob", "rougeL_recall", "truth_ratio"}`` of one split, as TOFU aggregates them."""
    p_gt = np.exp(-v.avg_gt_loss)
    if name in NORMALISED_PROB_SPLITS:
        prob = np.mean(p_gt / (p_gt + np.nansum(np.exp(-v.average_perturb_loss), -1)))
    else:
        prob = np.mean(p_gt)
    r = TRUTH_RATIOS[truth_ratio](v.avg_paraphrased_loss, v.average_perturb_loss)
    stat = np.mean(np.minimum(r, 1 / r)) if name == "forget" else np.mean(np.maximum(0.0, 1 - r))
    return {"prob": float(prob), "rougeL_recall": float(np.mean(v.rougeL_recall)), "truth_ratio": float(stat)}


def forget_truth_ratios(v: SplitValues) -> np.ndarray:
    """The per-question truth ratios forget quality compares: correct/wrong, exp(mean L(pert) - L(para)), the
    orientation of TOFU's aggregation script."""
    return np.exp(np.nanmean(v.average_perturb_loss, -1) - v.avg_paraphrased_loss)


def log_truth_ratios(v: SplitValues) -> np.ndarray:
    """Per-question wrong/correct ratios, exp(L(para) - mean L(pert)): the ``truth_ratio`` values of TOFU's own
    eval logs (and open-unlearning's ``forget_truth_ratio`` scores); the reciprocal of
    :func:`forget_truth_ratios`."""
    return np.exp(v.avg_paraphrased_loss - np.nanmean(v.average_perturb_loss, -1))


def forget_quality(unlearned: np.ndarray, reference: np.ndarray) -> float:
    return float(ks_2samp(unlearned, reference).pvalue)


def summarize(splits: Mapping[str, SplitValues], *, truth_ratio: str = DEFAULT_TRUTH_RATIO,
              reference_tr: np.ndarray | None = None, reference_mia: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
    """Per-split metrics, model utility (harmonic mean of the nine utility numbers, when all three utility
    splits are present), forget quality (when a reference distribution is given), the membership-inference and
    memorization metrics (when the forget split has them; PrivLeak and the Reference attack from ``reference_mia``,
    :func:`read_reference_mia`) and the derived scores of :mod:`flat_ray.metrics`."""
    out: dict[str, Any] = {"truth_ratio_variant": truth_ratio}
    utility = []
    for name, values in splits.items():
        m = split_metrics(name, values, truth_ratio)
        out.update({f"{name}_{k}": v for k, v in m.items()})
        if name in UTILITY_SPLITS:
            utility += list(m.values())
    if all(s in splits for s in UTILITY_SPLITS):
        out["model_utility"] = float(hmean(utility))
    if reference_tr is not None and "forget" in splits:
        out["forget_quality"] = forget_quality(forget_truth_ratios(splits["forget"]), reference_tr)
    forget = splits.get("forget")
    if forget is not None and forget.stats and forget.holdout_stats:
        from flat_ray.eval import mia

        out.update(mia.metrics(forget.stats, forget.holdout_stats, reference_mia))
    return add_derived(out)


# ----------------------------------------------------------------------------------------------------- logs
def _values(d: Mapping[str, Any], key: str, path: Path) -> list:
    if key not in d:
        raise FlatRayError(f"{path} lacks {key!r}; a TOFU eval log needs avg_gt_loss, avg_paraphrased_loss, "
                           "average_perturb_loss and rougeL_recall")
    block = d[key]
    return [block[k] for k in sorted(block, key=int)] if isinstance(block, Mapping) else list(block)


def read_log(path: str | Path) -> SplitValues:
    """One TOFU-format eval log (values keyed by question index)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FlatRayError(f"cannot read TOFU eval log {p}: {exc}") from None
    return SplitValues(
        np.asarray(_values(d, "avg_gt_loss", p), dtype=float),
        np.asarray(_values(d, "avg_paraphrased_loss", p), dtype=float),
        np.asarray(_values(d, "average_perturb_loss", p), dtype=float),
        np.asarray(_values(d, "rougeL_recall", p), dtype=float),
        [list(x) for x in _values(d, "generated_text", p)] if "generated_text" in d else [],
    )


def read_log_dir(directory: str | Path) -> dict[str, SplitValues]:
    """The eval logs present in ``directory`` (TOFU's four file names), keyed by split."""
    d = Path(directory)
    if not d.is_dir():
        raise FlatRayError(f"eval-log directory {str(d)!r} does not exist")
    found = {name: read_log(d / f) for name, f in LOG_FILES.items() if (d / f).is_file()}
    if not found:
        raise FlatRayError(f"no TOFU eval logs in {d}; expected some of: {', '.join(LOG_FILES.values())} or "
                           f"open-unlearning's {OPEN_UNLEARNING_EVAL}")
    return found


def write_log_dir(directory: str | Path, splits: Mapping[str, SplitValues], summary: Mapping[str, Any],
                  meta: Mapping[str, Any]) -> Path:
    """Write per-question results in TOFU's layout (one file per split, values keyed by question index) plus
    ``summary.json`` (metrics and how they were computed). ``--from-logs`` and ``--reference`` read it back."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, v in splits.items():
        def keyed(values):
            return {str(i): x for i, x in enumerate(values)}
        log = {
            "avg_gt_loss": keyed(v.avg_gt_loss.tolist()),
            "avg_paraphrased_loss": keyed(v.avg_paraphrased_loss.tolist()),
            "average_perturb_loss": keyed(v.average_perturb_loss.tolist()),
            "rougeL_recall": keyed(v.rougeL_recall.tolist()),
            "generated_text": keyed(v.generated_text),
            "truth_ratio": keyed(log_truth_ratios(v).tolist()),  # TOFU's orientation for TOFU's key
        }
        (d / LOG_FILES[name]).write_text(json.dumps(log))
    (d / "summary.json").write_text(json.dumps({**meta, **summary}, indent=2))
    return d


def read_reference(ref: str | Path) -> tuple[np.ndarray, str]:
    """Reference truth ratios for forget quality, and a description of where they came from.

    Accepts a directory or file in TOFU's format (``eval_log_forget.json``; flat-ray writes the same), or an
    open-unlearning result JSON (``forget_truth_ratio.value_by_index``). The result is always in
    :func:`forget_truth_ratios`' correct/wrong orientation: open-unlearning's wrong/correct scores are inverted."""
    p = Path(ref)
    if p.is_dir():
        found = sorted(f.name for f in p.iterdir() if f.suffix == ".json")
        p = next((p / f for f in (LOG_FILES["forget"], OPEN_UNLEARNING_EVAL) if (p / f).is_file()), p / LOG_FILES["forget"])
        if not p.is_file():
            raise FlatRayError(f"forget-quality reference {str(ref)!r} has no {LOG_FILES['forget']} (TOFU's logs) and "
                               f"no {OPEN_UNLEARNING_EVAL} (open-unlearning's); JSON files there: "
                               f"{', '.join(found) or 'none'}")
    if not p.is_file():
        raise FlatRayError(f"forget-quality reference {str(ref)!r} not found; give a directory with "
                           f"{LOG_FILES['forget']} or {OPEN_UNLEARNING_EVAL}, or one of those files")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FlatRayError(f"forget-quality reference {p} is not valid JSON ({exc.msg})") from None
    if isinstance(d, Mapping) and "forget_truth_ratio" not in d and any(k.endswith("_Q_A_Prob") for k in d):
        raise FlatRayError(f"forget-quality reference {p} (open-unlearning's format) has no forget_truth_ratio, so no "
                           f"forget split; metrics found: {', '.join(sorted(d))}")
    if isinstance(d, Mapping) and "forget_truth_ratio" in d:
        by_index = d["forget_truth_ratio"].get("value_by_index", {})
        wrong_over_correct = np.asarray([by_index[k]["score"] for k in sorted(by_index, key=int)], dtype=float)
        return 1.0 / wrong_over_correct, f"open-unlearning:{p}"
    return forget_truth_ratios(read_log(p)), f"tofu-log:{p}"


def reference_values(ref: str | Path) -> dict[str, Any]:
    """What a run's evaluations need of a forget-quality reference: ``truth_ratios`` (:func:`read_reference`) and
    ``mia`` (:func:`read_reference_mia`). The driver reads them and sends them to the workers with the run."""
    return {"truth_ratios": read_reference(ref)[0], "mia": read_reference_mia(ref)}


def read_reference_mia(ref: str | Path) -> dict[str, Any] | None:
    """What the reference (retain) model's logs give the membership-inference metrics, from the open-unlearning file
    in or beside ``ref`` (flat-ray eval writes one with its TOFU logs): ``auc``, its Min-K% AUC (PrivLeak), and
    ``forget_loss`` / ``holdout_loss``, its per-question losses (the Reference attack); None without such a file
    (TOFU's published logs)."""
    p = Path(ref)
    found = p / OPEN_UNLEARNING_EVAL if p.is_dir() else (p if p.name == OPEN_UNLEARNING_EVAL
                                                          else p.parent / OPEN_UNLEARNING_EVAL)
    if not found.is_file():
        return None
    try:
        logs = json.loads(found.read_text(encoding="utf-8"))
        auc, losses = logs["mia_min_k"]["agg_value"], logs["mia_loss"]
        sides = {side: losses[side]["value_by_index"] for side in ("forget", "holdout")}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return {"auc": float(auc), **{f"{side}_loss": np.asarray([v[k]["score"] for k in sorted(v, key=int)], dtype=float)
                                  for side, v in sides.items()}}
