"""Pure-torch losses. Tensors in, :class:`LossOutput` out; no model, no framework imports.

>>> from flat_ray.losses import flat_loss, DIVERGENCES
"""

from flat_ray.losses.fdiv import DIVERGENCES, Divergence
from flat_ray.losses.flat import NORMALIZATIONS, LossOutput, flat_loss
from flat_ray.losses.methods import METHODS, Method
from flat_ray.losses.sequence import (
    IGNORE_INDEX,
    mean_token_nll,
    sequence_logprob,
    token_logprobs,
    token_probs,
)

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "METHODS",
    "NORMALIZATIONS",
    "Divergence",
    "LossOutput",
    "Method",
    "flat_loss",
    "mean_token_nll",
    "sequence_logprob",
    "token_logprobs",
    "token_probs",
]
