"""Peak memory per worker of a FLAT trial vs an NPO trial on the same model (issue: baselines).

    python benchmarks/memory_flat_vs_npo.py [--hidden 768 --layers 8] [--stage 3]

Both trials run one epoch on the demo's forget05 with 2 Ray Train workers and the same DeepSpeed settings; NPO
also holds a frozen reference model (a sharded inference engine under ZeRO-3, a full copy otherwise). NPO runs
in its forget-only form (``method.retain_weight=0``: no retain batch), so the two differ only by that. Each
worker reports its peak host RSS (and peak GPU memory on a GPU machine); the busiest worker's figure is logged to
MLflow as `peak_rss_mb` / `peak_gpu_mem_mb` and compared here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sized import sized_model, start_ray  # noqa: E402
from flat_ray import tracking  # noqa: E402
from flat_ray.config import load_config  # noqa: E402
from flat_ray.launch.driver import run_training  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    args = ap.parse_args()
    start_ray()
    with tempfile.TemporaryDirectory() as tmp:
        spec, model_dir = sized_model(args.hidden, args.layers, Path(tmp) / "model")
        results = {}
        for method in ("flat", "npo"):
            cfg = load_config(None, [
                f"model.name_or_path={model_dir}", "data.split=forget05", "data.max_length=64", "optim.epochs=1",
                "method.retain_weight=0", "optim.micro_batch_size=2", "eval.enabled=false", f"deepspeed.stage={args.stage}",
                f"launch.gpus_per_worker={args.gpus_per_worker}", "tracking.log_model_max_mb=0",
                f"tracking.run_name=mem-{method}-{time.strftime('%H%M%S')}", f"paths.workdir={tmp}/work"])
            res = run_training(cfg)
            results[method] = {k: tracking.metric_history(res.mlflow_uri, res.run_id, k)[-1][1]
                               for k in ("peak_rss_mb", "rss_end_of_training_mb", "peak_gpu_mem_mb")
                               if tracking.metric_history(res.mlflow_uri, res.run_id, k)}
    params = spec.vocab_size * spec.hidden_size * 2 + spec.num_layers * (
        4 * spec.hidden_size**2 + 3 * spec.hidden_size * spec.intermediate_size)
    print(f"model: Llama-style {params / 1e6:.0f} M params (hidden {spec.hidden_size}, {spec.num_layers} layers), "
          f"2 workers, ZeRO-{args.stage}, fp32 on CPU / auto precision on GPU")
    for key in results["flat"]:
        f, n = results["flat"][key], results["npo"][key]
        print(f"{key}: FLAT {f:.0f} MB, NPO {n:.0f} MB, FLAT/NPO = {f / n:.2f}")


if __name__ == "__main__":
    main()
