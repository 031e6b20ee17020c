"""Shared by the benchmarks that run `flat-ray train` on a Llama-shaped tiny model of a chosen size."""

from __future__ import annotations

import os
from pathlib import Path

from flat_ray.data import BUILTIN_TEMPLATES
from flat_ray.data.demo import demo_texts
from flat_ray.models import TinySpec, build_tiny_model


def start_ray() -> None:
    import ray

    ray.init(num_cpus=os.cpu_count(), logging_level="WARNING")


def sized_model(hidden: int, layers: int, out_dir: Path) -> tuple[TinySpec, Path]:
    """A random-init Llama-shaped model (SwiGLU width 8/3 of ``hidden``, 64-wide heads) with the demo tokenizer."""
    spec = TinySpec(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64, num_layers=layers,
                    num_heads=max(1, hidden // 64))
    return spec, build_tiny_model(demo_texts() + list(BUILTIN_TEMPLATES), out_dir, spec)
