"""The truth-ratio variants (numpy only): how one question's paraphrased and perturbed answer losses become a
ratio. The registry is the one list of variant names (config, CLI and the TOFU metrics read it).

- ``arithmetic`` (default): R = mean_j P(perturbed_j) / P(paraphrased), with P = exp(-L), the form that
  reproduces TOFU's published model-utility numbers.
- ``geometric``: R = exp(L(paraphrased) - mean_j L(perturbed_j)), the geometric-mean form.

Rows may have different numbers of perturbed answers: missing ones are NaN and ignored.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from flat_ray.registry import Registry


def _arithmetic(para: np.ndarray, pert: np.ndarray) -> np.ndarray:
    return np.nanmean(np.exp(-pert), -1) / np.exp(-para)


def _geometric(para: np.ndarray, pert: np.ndarray) -> np.ndarray:
    return np.exp(para - np.nanmean(pert, -1))


TRUTH_RATIOS: Registry[Callable[[np.ndarray, np.ndarray], np.ndarray]] = Registry("truth-ratio variant")
TRUTH_RATIOS.register("arithmetic", _arithmetic)
TRUTH_RATIOS.register("geometric", _geometric)
DEFAULT_TRUTH_RATIO = "arithmetic"
