"""How forget quality and model utility move with the learning rate: the demo's FLAT run replayed in one process
(flat_ray.engine.replica, equal to the two-rank DeepSpeed run) over a grid of learning rates, for FLAT's
divergences and the baselines.

    python benchmarks/lr_scan.py      # the demo's original and retain model, built by `flat-ray train eval.reference=auto`
    python benchmarks/lr_scan.py --model PATH --lrs 4e-4,6e-4 --rows flat/kl,npo optim.epochs=2

Each cell prints forget_quality/model_utility after training against the cached retain model's eval logs (or
``eval.reference=...`` given as an override), then forget_prob/retain_prob; a star marks the cells that meet the
demo's targets: forget quality at least 100x the original's, model utility at least 0.85x, forget probability at
most half and retain probability at least 0.8x the original's.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="original model directory (default: the cached demo original)")
    parser.add_argument("--lrs", default="1e-4,2e-4,3e-4,4e-4,5e-4,6e-4,7e-4,8e-4,1e-3")
    parser.add_argument("--rows", default="flat/total_variation,flat/kl,flat/jensen_shannon,flat/pearson",
                        help="methods, FLAT's as flat/<divergence>")
    parser.add_argument("overrides", nargs="*", help="config overrides on top of the demo preset")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    import transformers

    from flat_ray.assets import demo_original_path
    from flat_ray.config import load_config
    from flat_ray.engine.replica import replay
    from flat_ray.eval.run import auto_reference_logs

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    lrs = [float(x) for x in args.lrs.split(",")]
    base = load_config(None, args.overrides, presets=["demo"])
    reference = base.eval.reference or auto_reference_logs(base)
    if not Path(reference).exists():
        raise SystemExit("no retain model eval logs: run `flat-ray train eval.reference=auto` first, or pass "
                         "eval.reference=PATH")
    print(f"reference: {reference}")
    print(f"{'method':<22}" + "".join(f"{lr:>27.2e}" for lr in lrs))
    start: dict = {}
    for row in args.rows.split(","):
        name, _, div = row.partition("/")
        knobs = [f"method.name={name}"] + ([f"method.divergence={div}"] if div else [])
        cells = []
        for lr in lrs:
            cfg = load_config(None, [*args.overrides, *knobs, f"optim.lr={lr}", f"eval.reference={reference}"],
                              presets=["demo"])
            r = replay(cfg, args.model or str(demo_original_path(cfg)), evaluate_before=not start)
            start, a = start or r["before"], r["after"]
            star = "*" if (a["forget_quality"] >= 100 * start["forget_quality"]
                           and a["model_utility"] >= 0.85 * start["model_utility"]
                           and a["forget_prob"] <= 0.5 * start["forget_prob"]
                           and a["retain_prob"] >= 0.8 * start["retain_prob"]) else " "
            cells.append(f"{a['forget_quality']:.2g}/{a['model_utility']:.3f} {a['forget_prob']:.3f}/"
                         f"{a['retain_prob']:.3f}{star}")
        print(f"{row:<22}" + "".join(f"{c:>27}" for c in cells), flush=True)
    print("original: " + ", ".join(f"{k} {start[k]:.4g}" for k in ("forget_quality", "model_utility", "forget_prob",
                                                                   "retain_prob")))


if __name__ == "__main__":
    main()
