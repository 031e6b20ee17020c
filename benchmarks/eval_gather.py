"""Per-epoch evaluation under ZeRO-3: from a copy gathered once vs gathering at every forward (issue 18, item 2).

    python benchmarks/eval_gather.py [--hidden 256 --layers 4] [--questions 20] [--max-new-tokens 24]

Two `flat-ray train` runs of one epoch on the demo's forget10 with 2 Ray Train workers and ZeRO-3, identical but
for ``eval.gathered``. Each evaluates before and after its epoch and logs the time of every evaluation
(``eval_s``, rank 0, the gathering of the copy included). Their evaluation numbers must agree (asserted: the
same weights give the same scores either way) before the times are compared. Prints one line per run and the
ratio.
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
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    start_ray()
    with tempfile.TemporaryDirectory() as tmp:
        spec, model_dir = sized_model(args.hidden, args.layers, Path(tmp) / "model")
        runs = {}
        for gathered in (True, False):
            cfg = load_config(None, [
                f"model.name_or_path={model_dir}", "data.split=forget10", "data.max_length=96", "optim.epochs=1",
                "deepspeed.stage=3", f"eval.gathered={str(gathered).lower()}", f"eval.max_examples={args.questions}",
                f"eval.max_new_tokens={args.max_new_tokens}", "eval.batch_size=10", "tracking.log_model_max_mb=0",
                f"tracking.run_name=eval-{'gathered' if gathered else 'shards'}-{time.strftime('%H%M%S')}",
                f"paths.workdir={tmp}/work"])
            res = run_training(cfg)
            seconds = [v for _, v in tracking.metric_history(res.mlflow_uri, res.run_id, "eval_s")]
            runs[gathered] = (res, sum(seconds) / len(seconds))
    (fast, t_fast), (slow, t_slow) = runs[True], runs[False]
    for key, value in slow.after.items():  # the same weights give the same evaluation either way
        assert abs(fast.after[key] - value) <= 1e-4, (key, fast.after[key], value)
    print(f"model: Llama-style, hidden {spec.hidden_size}, {spec.num_layers} layers; 2 workers, ZeRO-3; "
          f"{args.questions} questions per split, {args.max_new_tokens} new tokens")
    print(f"gathered once per evaluation:   {t_fast:6.2f} s per evaluation")
    print(f"gathered at every forward:      {t_slow:6.2f} s per evaluation")
    print(f"ratio (every forward / once):   {t_slow / t_fast:6.2f}x; the {len(slow.after)} evaluation numbers agree "
          "within 1e-4")


if __name__ == "__main__":
    main()
