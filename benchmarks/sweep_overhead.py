"""Sweep overhead: 4 demo trials through `flat-ray tune` on the local Ray, one at a time.

Prints the sweep's wall time divided by the sum of the trials' own training time (the time each trial's rank-0
worker spends in the training function: engine, data, training, evaluation, export) and the fixed cost per trial,
split into where it goes. Target (issue 5): ratio <= 1.10 with concurrency 1 and <= 10 s fixed cost per trial.

    .venv/bin/python benchmarks/sweep_overhead.py [--trials 4] [--epochs 4]

The demo's original model is built (or found in the cache) before the clock starts.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workdir", default="flat_ray_work", help="reuses the demo's cached original model")
    args = parser.parse_args()

    from flat_ray import tracking
    from flat_ray.assets import ensure_demo_original
    from flat_ray.launch.driver import finetuner
    from flat_ray.launch.tune import run_sweep
    from flat_ray.sweep import load_space

    workdir = str(Path(args.workdir).resolve())
    lrs = ", ".join(f"{6e-4 * (0.9 ** i):.3g}" for i in range(args.trials))
    with tempfile.TemporaryDirectory() as tmp:
        space = Path(tmp) / "overhead.yaml"
        space.write_text(f"name: overhead\nbase: [demo]\nset: {{paths.workdir: {workdir}, optim.epochs: {args.epochs}}}\n"
                         f"params: {{optim.lr: {{grid: [{lrs}]}}}}\nobjective: unlearn_score\n")
        ensure_demo_original(load_space(str(space)).cells[0].config, finetuner())  # not part of the measurement
        started = time.monotonic()
        result = run_sweep(str(space), [], name=f"overhead-{time.strftime('%Y%m%d-%H%M%S')}", echo=print)
        wall = time.monotonic() - started
    children = tracking.child_runs(result.mlflow_uri, result.parent_run_id)
    own = [r.data.metrics["worker_s"] for r in children]
    trial = [r.data.metrics["duration_s"] for r in children]
    n = len(children)
    print(f"\ntrials: {n} (concurrency 1, 2 workers x ZeRO-3, {args.epochs} epochs each)")
    print(f"sweep wall time:                  {wall:8.1f} s")
    print(f"sum of trials' own training time: {sum(own):8.1f} s   (per trial {sum(own) / n:.1f} s)")
    print(f"ratio wall / own:                 {wall / sum(own):8.3f}   (target <= 1.10)")
    fixed = (wall - sum(own)) / n
    print(f"fixed cost per trial:             {fixed:8.1f} s   (target <= 10 s)")
    print(f"trial length at which this fixed cost is 10%: {fixed / 0.10:.0f} s")
    def mean(key: str) -> float:
        return sum(r.data.metrics[key] for r in children) / n

    print("where the fixed cost goes, per trial:")
    print(f"  trial set-up (checks, model path, MLflow run, params):     {mean('setup_s'):6.1f} s")
    print(f"  Ray Train worker group start, worker imports, gloo init:   {mean('fit_s') - sum(own) / n:6.1f} s")
    print(f"  after training (artifacts, summary from MLflow):           {mean('finish_s'):6.1f} s")
    print(f"  Ray/Tune start, trial scheduling, MLflow parent, report:   {(wall - sum(trial)) / n:6.1f} s")


if __name__ == "__main__":
    main()
