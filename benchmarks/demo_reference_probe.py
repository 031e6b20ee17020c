"""What makes the demo's forget quality and model utility informative (#14 item 2): a probe, in one process.

    python benchmarks/demo_reference_probe.py --background-authors 0 --perturbed answer --flat-lrs 4e-4

It builds a demo original (on ``full_with_background``) and its retain model (on ``retain90_with_background``) with
the demo's fine-tuning recipe (``demo_finetune``), replayed by ``flat_ray.engine.replica`` on the demo's two ranks,
with what it is given changed:

- ``--background-authors K``: the generated authors in the background split (the demo's: 40; 0 leaves only the
  real-authors and world-facts questions). The background stands in for the pre-training that TOFU's originals
  had before they met the fictitious authors;
- ``--perturbed answer|paraphrase``: the template the perturbed (wrong) answers are written in. The demo uses the
  paraphrase's, so a paraphrase and its perturbed versions differ only in the fact; ``answer`` (the demo before
  #14) makes the truth ratio compare two phrasings;
- ``--epochs``, ``--micro-batch``, ``--lr``, ``--workers``: the fine-tuning recipe.

It prints both models' TOFU metrics and the original's forget quality against the retain model. For each
``--flat-lrs`` learning rate it then runs the demo's FLAT recipe with each of ``--divergences`` from the original
and prints forget quality, model utility and forget/retain probability. Nothing here is used by flat-ray itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flat_ray.data.demo import BACKGROUND_AUTHORS  # noqa: E402


def fine_tune(split: str, args: argparse.Namespace, out: Path):
    """The tiny model trained on ``split`` with the demo's fine-tuning recipe and this probe's overrides."""
    from flat_ray.assets import demo_finetune_config, tiny_model_path
    from flat_ray.config import load_config
    from flat_ray.data import Collator, load_split
    from flat_ray.engine.replica import train
    from flat_ray.models import load_model_and_tokenizer
    from flat_ray.pipeline import build_dataset, profile_for

    ft = demo_finetune_config(load_config(None, [f"paths.workdir={out.parent}"], presets=["demo"]))
    optim = {k: v for k, v in (("epochs", args.epochs), ("micro_batch_size", args.micro_batch), ("lr", args.lr))
             if v is not None}
    ft = dataclasses.replace(ft, optim=dataclasses.replace(ft.optim, **optim),
                             launch=dataclasses.replace(ft.launch, num_workers=args.workers))
    rows = load_split("demo", split)
    if not (out / "config.json").is_file():
        model, tok = load_model_and_tokenizer(str(tiny_model_path(ft)))
        train(ft, model, build_dataset(ft, tok, profile_for(ft, "demo", tok), rows), Collator(tok.pad_token_id),
              args.workers)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return (*load_model_and_tokenizer(str(out)), len(rows), ft.optim)


def evaluate(model, tok):
    import torch

    from flat_ray.config import load_config
    from flat_ray.eval.runner import evaluate_tofu
    from flat_ray.eval.suites import suite_for
    from flat_ray.models import PROFILES

    cfg = load_config(None, [], presets=["demo"])
    model.eval()
    with torch.no_grad():
        values = evaluate_tofu(model, tok, PROFILES["generic"], suite_for(cfg).rows(cfg, cfg.eval.max_examples),
                               max_length=cfg.data.max_length, batch_size=10, max_new_tokens=cfg.eval.max_new_tokens)
    model.train()
    return values


def unlearn(path: Path, divergence: str, lr: float):
    from flat_ray.config import load_config
    from flat_ray.data import Collator
    from flat_ray.engine.replica import train
    from flat_ray.models import load_model_and_tokenizer
    from flat_ray.pipeline import build_dataset, profile_for

    cfg = load_config(None, [f"method.divergence={divergence}", f"optim.lr={lr}"], presets=["demo"])
    model, tok = load_model_and_tokenizer(str(path))
    train(cfg, model, build_dataset(cfg, tok, profile_for(cfg, "demo", tok)), Collator(tok.pad_token_id),
          cfg.launch.num_workers)
    return model, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--background-authors", type=int, default=None,
                    help=f"generated authors in the background split (the demo's: {BACKGROUND_AUTHORS})")
    ap.add_argument("--perturbed", choices=("answer", "paraphrase"), default="paraphrase",
                    help="the template of the perturbed answers (the demo's: paraphrase)")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the demo_finetune preset's)")
    ap.add_argument("--micro-batch", type=int, default=None, help="fine-tuning micro-batch per rank (default: the preset's)")
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: the preset's)")
    ap.add_argument("--workers", type=int, default=2, help="ranks the fine-tuning replays (the demo's: 2)")
    ap.add_argument("--flat-lrs", default="", help="comma-separated FLAT learning rates to try on the original")
    ap.add_argument("--divergences", default="total_variation,kl")
    ap.add_argument("--cache", default="/tmp/flat_ray_reference_probe")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    import flat_ray.data.demo as demo
    from flat_ray.eval.tofu import forget_quality, forget_truth_ratios, summarize

    transformers.logging.set_verbosity_error()
    if args.background_authors is not None:
        demo.BACKGROUND_AUTHORS = args.background_authors
    demo.PERTURBED_TEMPLATE = args.perturbed  # before anything is generated (the generator caches)
    # cached models are named by the recipe they were built with (the preset's values where none is given), so a
    # change of the demo_finetune preset builds new ones
    from flat_ray.assets import demo_finetune_config
    from flat_ray.config import load_config

    preset = demo_finetune_config(load_config(None, [], presets=["demo"])).optim
    recipe = {"k": demo.BACKGROUND_AUTHORS, "e": args.epochs or preset.epochs,
              "mb": args.micro_batch or preset.micro_batch_size, "lr": args.lr or preset.lr, "w": args.workers}
    root = Path(args.cache) / "-".join([*(f"{k}{v}" for k, v in recipe.items()), args.perturbed])
    keys = ("forget_prob", "forget_truth_ratio", "retain_prob", "retain_truth_ratio", "real_authors_rougeL_recall",
            "world_facts_rougeL_recall", "model_utility")
    truth, utility = {}, {}
    for name, split in (("original", "full_with_background"), ("retain", "retain90_with_background")):
        start = time.time()
        model, tok, n, optim = fine_tune(split, args, root / name)
        values = evaluate(model, tok)
        truth[name] = forget_truth_ratios(values["forget"])
        s = summarize(values)
        utility[name] = s["model_utility"]
        print(f"{name:<9} ({n} rows, {optim.epochs} epochs, micro-batch {optim.micro_batch_size} x {args.workers} "
              f"ranks, lr {optim.lr:g}; {time.time() - start:.0f} s): "
              + ", ".join(f"{k} {s[k]:.4f}" for k in keys), flush=True)
    fq0 = forget_quality(truth["original"], truth["retain"])
    print(f"background authors {demo.BACKGROUND_AUTHORS}, perturbed answers in the {args.perturbed}'s template: forget quality of the original against the retain model "
          f"{fq0:.3g}", flush=True)
    for lr in [float(x) for x in args.flat_lrs.split(",") if x]:
        for div in args.divergences.split(","):
            model, tok = unlearn(root / "original", div, lr)
            s = summarize(evaluate(model, tok), reference_tr=truth["retain"])
            print(f"FLAT {div:<16} lr {lr:.1e}: forget_quality {s['forget_quality']:.3g} "
                  f"({s['forget_quality'] / fq0:.3g}x the original's), model_utility {s['model_utility']:.4f} "
                  f"({s['model_utility'] / utility['original'] if utility['original'] else float('nan'):.3f}x), "
                  f"forget_prob {s['forget_prob']:.4f}, "
                  f"retain_prob {s['retain_prob']:.4f}", flush=True)


if __name__ == "__main__":
    main()
