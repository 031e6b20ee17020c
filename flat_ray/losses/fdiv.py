"""The eight f-divergences of FLAT in their variational (f-GAN) form, as a registry.

Each entry gives the output activation ``g*`` and the composition ``f* ∘ g*`` from Nowozin et al. (2016),
Table 2. FLAT minimises ``-g*(s_e) + f*(g*(s_f))`` where ``s_e`` is the template-answer score and ``s_f`` the
forget-answer score (docs/losses.md). Every entry is written so that lowering the loss raises ``s_e`` and
lowers ``s_f``; three entries deliberately differ from the released FLAT code (UCSC-REAL/FLAT@bf2ef07), whose
``Reverse-KL``, ``Squared-Hellinger`` and ``Neyman`` push the wrong way (see docs/losses.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flat_ray.registry import Registry

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Divergence:
    """One f-divergence: ``activation`` is g*(v), ``conjugate`` is f*(g*(v)); both elementwise."""

    name: str
    activation: Fn
    conjugate: Fn
    in_paper: bool
    description: str


DIVERGENCES: Registry[Divergence] = Registry("divergence")

_LOG2 = math.log(2.0)


def _add(key: str, activation: Fn, conjugate: Fn, *, in_paper: bool, description: str, aliases: tuple[str, ...]):
    DIVERGENCES.register(key, Divergence(key, activation, conjugate, in_paper, description), aliases=aliases)


_add("kl", lambda v: v, lambda v: torch.exp(v - 1.0), in_paper=True,
     description="Kullback-Leibler: g*(v)=v, f*(g*(v))=exp(v-1)", aliases=("KL", "kld"))
_add("reverse_kl", lambda v: -torch.exp(-v), lambda v: v - 1.0, in_paper=False,
     description="reverse KL: g*(v)=-exp(-v), f*(g*(v))=v-1", aliases=("Reverse-KL", "rkl"))
_add("jeffrey", lambda v: v, lambda v: v + v.pow(2) / 4.0 + v.pow(3) / 16.0, in_paper=False,
     description="Jeffrey: g*(v)=v, f*(g*(v))=v+v^2/4+v^3/16 (the released code's polynomial conjugate)",
     aliases=("Jeffrey",))
_add("squared_hellinger", lambda v: 1.0 - torch.exp(-v), lambda v: torch.exp(v) - 1.0, in_paper=False,
     description="squared Hellinger: g*(v)=1-exp(-v), f*(g*(v))=exp(v)-1",
     aliases=("Squared-Hellinger", "hellinger"))
_add("pearson", lambda v: v, lambda v: v.pow(2) / 4.0 + v, in_paper=True,
     description="Pearson chi^2: g*(v)=v, f*(g*(v))=v^2/4+v", aliases=("Pearson", "chi2"))
_add("neyman", lambda v: 1.0 - torch.exp(-v), lambda v: 2.0 - 2.0 * torch.exp(-v / 2.0), in_paper=False,
     description="Neyman chi^2: g*(v)=1-exp(-v), f*(g*(v))=2-2exp(-v/2)", aliases=("Neyman",))
_add("jensen_shannon", lambda v: _LOG2 - F.softplus(-v), lambda v: v + F.softplus(-v) - _LOG2, in_paper=True,
     description="Jensen-Shannon: g*(v)=log2-log(1+exp(-v)), f*(g*(v))=v+log(1+exp(-v))-log2",
     aliases=("js", "Jensen-Shannon", "Jenson-Shannon", "JS"))
_add("total_variation", lambda v: 0.5 * torch.tanh(v), lambda v: 0.5 * torch.tanh(v), in_paper=True,
     description="total variation: g*(v)=tanh(v)/2, f*(g*(v))=tanh(v)/2",
     aliases=("tv", "Total-Variation", "TV"))
