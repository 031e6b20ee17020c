"""A sweep cell's model before unlearning, evaluated once (docs/sweeps.md, "The original, evaluated once").

Every trial of a cell starts from the same original and evaluates it before training with the same settings. The
first trial to get there evaluates it and keeps the per-question values (TOFU's eval-log layout) in
``<sweep>/originals/<cell>/<key>``, where the key is a hash of everything that shapes that evaluation (the model,
tokenizer and prompt, the data, the evaluation settings, the precision). Every other trial of the cell, and a
trial restarted from scratch, reads them and logs the same numbers as its epoch-0 evaluation: its metrics come
from the values with its own truth-ratio variant and reference, so they are what it would have computed. Only
per-question suites (TOFU-style benchmarks) are kept; the others evaluate every time.

The trials of a cell start together and ask Ray for their workers at once (on an autoscaling cluster, their nodes
start side by side); at the epoch-0 evaluation the first trial's ranks claim the evaluation (``claim``) and the
others' ranks wait for its values, so a cell whose trials start together still evaluates its original once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flat_ray import tracking
from flat_ray.config import RunConfig
from flat_ray.eval import open_unlearning
from flat_ray.eval.tofu import LOG_FILES, SplitValues, write_log_dir

DONE = "complete.json"  # written last: the values are all there
# settings that do not change what evaluating the original gives
_IGNORED = {"eval": ("reference", "truth_ratio", "every_epochs", "interim_examples", "save_logs", "enabled"),
            "model": ("gradient_checkpointing",)}


def key(cfg: RunConfig) -> str:
    """A hash of what shapes the evaluation of the original."""
    parts: dict[str, Any] = {"deepspeed.precision": cfg.deepspeed.precision}
    for section in ("model", "data", "eval"):
        values = dataclasses.asdict(getattr(cfg, section))
        parts[section] = {k: v for k, v in values.items() if k not in _IGNORED.get(section, ())}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_dir(cell_dir: str | Path, cfg: RunConfig) -> Path:
    return Path(cell_dir) / key(cfg)


def load(folder: str | Path) -> dict[str, SplitValues] | None:
    """The cached per-question values, or None while they are not complete."""
    folder = Path(folder)
    if not (folder / DONE).is_file():
        return None
    return open_unlearning.read_logs(folder)  # TOFU's logs, with the forget split's membership statistics


def save(folder: str | Path, values: Mapping[str, SplitValues], meta: Mapping[str, Any]) -> bool:
    """Keep the values (written aside, then moved into place); False when another trial's are there already."""
    folder = Path(folder)
    if (folder / DONE).is_file():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    write_log_dir(partial, values, {}, meta)
    open_unlearning.write(partial, values)  # also holds the membership statistics (eval.mia)
    (partial / DONE).write_text(json.dumps({**meta, "splits": [s for s in values if s in LOG_FILES]}))
    try:
        partial.rename(folder)
    except OSError:  # another trial's copy got there first
        shutil.rmtree(partial, ignore_errors=True)
        return False
    return True


Holder = dict[str, Any]  # a claim's holder: {"trial": its name, "run": its MLflow run id}


def _holder(claim_file: Path) -> Holder | None:
    """Who holds the claim: None when nobody does (it was just released), {} while its maker is still writing it.
    A claim in the older plain-text form names its trial only."""
    try:
        text = claim_file.read_text().strip()
    except FileNotFoundError:
        return None
    if not text:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else {"trial": text, "run": None}


def try_claim(folder: str | Path, holder: Holder, ended: Callable[[Holder], bool]) -> bool | None:
    """One try at the claim on evaluating the original: True when ``holder`` is to evaluate it (no complete values
    yet; its claim is made or was already its own), False once the values are complete, None while another trial
    holds the claim and has not ended (``ended(other)``: its run finished, failed or was stopped) without leaving
    them. A claim whose holder ended that way passes to ``holder``."""
    folder = Path(folder)
    claim_file = folder.with_name(f"{folder.name}.claim")
    folder.parent.mkdir(parents=True, exist_ok=True)
    while not (folder / DONE).is_file():
        try:
            fd = os.open(claim_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            other = _holder(claim_file)
            if other is None:  # released meanwhile: try again
                continue
            if not other:  # being written: its maker holds it
                return None
            if other.get("trial") == holder["trial"]:
                return True
            if ended(other) and not (folder / DONE).is_file():
                claim_file.unlink(missing_ok=True)  # it ended without the values: the next trial takes over
                continue
            return None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(holder))
        return True
    return False


def run_ended(uri: str) -> Callable[[Holder], bool]:
    """``ended`` for :func:`try_claim` in a run: whether the holder's MLflow run (on tracking server ``uri``, the
    sweep's) is no longer RUNNING."""

    def ended(holder: Holder) -> bool:
        if not holder.get("run"):  # a claim made before claims named their run: left by an older sweep
            return True
        try:
            return tracking.run_data(uri, holder["run"]).info.status != "RUNNING"
        except Exception:  # noqa: BLE001 - MLflow away for a moment: ask again at the next poll
            return False

    return ended


def claim(folder: str | Path, holder: Holder, ended: Callable[[Holder], bool], poll_s: float = 2.0,
          share: Callable[[bool | None], bool | None] = lambda answer: answer, leader: bool = True) -> bool:
    """:func:`try_claim` until it answers: True when ``holder`` evaluates the original, False when its values are
    complete. A trial's ranks call it together: the ``leader`` (rank 0) tries, ``share`` hands its answer to every
    rank (a broadcast), so no rank sits in one collective for longer than one try."""
    while True:
        answer = share(try_claim(folder, holder, ended) if leader else None)
        if answer is not None:
            return answer
        time.sleep(poll_s)


def release(folder: str | Path, trial: str) -> None:
    """After ``trial``'s run, whichever way it ended: its claim, if it still holds one without complete values,
    passes to the next trial at once."""
    folder = Path(folder)
    claim_file = folder.with_name(f"{folder.name}.claim")
    holder = _holder(claim_file)
    if holder is not None and holder.get("trial") == trial and not (folder / DONE).is_file():
        claim_file.unlink(missing_ok=True)


def release_claims(cell_dir: str | Path) -> None:
    """At a cell's start (no trial of it runs yet): claims left by an interrupted sweep are void."""
    for claim_file in Path(cell_dir).glob("*.claim"):
        claim_file.unlink(missing_ok=True)
