"""Schedule math (pure): batch sizes, step counts and the learning-rate multiplier per optimizer step."""

from __future__ import annotations

import math


def optimizer_steps(micro_batches_per_epoch: int, epochs: int, grad_accum_steps: int) -> int:
    """Optimizer steps of a whole run. DeepSpeed counts micro-batches across epochs and steps at every
    ``grad_accum_steps``-th one: a partial window at the end of an epoch carries into the next, and one left at
    the end of the run never steps."""
    return (micro_batches_per_epoch * epochs) // grad_accum_steps


def micro_batches_per_epoch(num_examples: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches each rank runs per epoch (the sampler pads every rank to the same count)."""
    return math.ceil(num_examples / (micro_batch_size * world_size))


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return int(round(total_steps * warmup_ratio))


def lr_multiplier(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up ``step / warmup`` over
    ``warmup`` steps, then ``linear`` decay to 0, ``cosine`` decay to 0, or ``constant``. These are the Hugging Face
    schedules TOFU's, FLAT's and MUSE's Trainer runs use (``get_linear_schedule_with_warmup`` and its kin): the
    first optimizer step of a warm-up runs at lr 0 (AdamW's moments still take its gradient)."""
    if warmup > 0 and step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return DECAYS[schedule](progress)


# multiplier after warm-up as a function of progress in [0, 1]; config.SCHEDULES lists these keys
DECAYS = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "constant": lambda p: 1.0,
}
