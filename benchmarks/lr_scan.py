"""How forget and retain probability move with the learning rate: the demo's FLAT run replayed in one process
(flat_ray.engine.replica, equal to the two-rank DeepSpeed run) over a grid of learning rates, for FLAT's
divergences and the baselines.

    python benchmarks/lr_scan.py                       # the demo's original, built by `flat-ray train` first
    python benchmarks/lr_scan.py --model PATH --lrs 4e-4,6e-4 --rows flat/kl,npo optim.epochs=2

Each cell prints forget_prob/retain_prob after training; a star marks the cells that keep the demo's old promise
(forget probability at most half the original's, retain probability at least 0.8 of it).
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="original model directory (default: the cached demo original)")
    parser.add_argument("--lrs", default="3e-4,4e-4,4.8e-4,5e-4,5.5e-4,6e-4,6.5e-4,7e-4,7.2e-4,8e-4,1e-3")
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

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    lrs = [float(x) for x in args.lrs.split(",")]
    print(f"{'method':<22}" + "".join(f"{lr:>15.2e}" for lr in lrs))
    for row in args.rows.split(","):
        name, _, div = row.partition("/")
        knobs = [f"method.name={name}"] + ([f"method.divergence={div}"] if div else [])
        cells = []
        for lr in lrs:
            cfg = load_config(None, [*args.overrides, *knobs, f"optim.lr={lr}"], presets=["demo"])
            model = args.model or str(demo_original_path(cfg))
            r = replay(cfg, model)
            f0, f1 = r["before"]["forget_prob"], r["after"]["forget_prob"]
            r0, r1 = r["before"]["retain_prob"], r["after"]["retain_prob"]
            star = "*" if f1 <= 0.5 * f0 and r1 >= 0.8 * r0 else " "
            cells.append(f"{f1:.3f}/{r1:.3f}{star}")
        print(f"{row:<22}" + "".join(f"{c:>15}" for c in cells), flush=True)
    print(f"original: forget_prob {f0:.4f}, retain_prob {r0:.4f}")


if __name__ == "__main__":
    main()
