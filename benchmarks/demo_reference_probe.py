"""What would make the demo's forget quality and model utility informative (#14 item 2): a probe, in one process.

    python benchmarks/demo_reference_probe.py --extra-authors 40 --perturbed paraphrase --flat-lrs 3e-4,6e-4,1e-3

It builds a demo original and its retain model the way the demo does (the tiny model, the ``demo_finetune`` recipe
replayed on one rank by ``flat_ray.engine.replica``), with two changes to try:

- ``--extra-authors K``: the fine-tuning data also holds K other generated authors (a different seed) with each
  answer in both phrasings (answer and paraphrase), and the real-authors and world-facts questions. This stands in
  for the pre-training that TOFU's originals had before they met the fictitious authors. The original also sees
  all 20 demo authors, and the retain model sees all but the forget10 authors;
- ``--perturbed answer|paraphrase``: the template of the perturbed (wrong) answers in the evaluation. The demo
  writes them in the answer's template (``answer``). In ``paraphrase``, they share the paraphrase's template and only
  the fact differs, so the truth ratio compares facts rather than phrasings.

It prints both models' TOFU metrics and the original's forget quality against the retain model. For each
``--flat-lrs`` learning rate, it then runs the demo's FLAT recipe (TV, then KL) from the original and prints
forget quality, model utility and forget probability. Nothing here is used by flat-ray itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _perturb_from_paraphrase() -> None:
    """Make the demo generator write perturbed answers in the paraphrase's template (same facts, same order)."""
    import flat_ray.data.demo as demo

    src = inspect.getsource(demo._generate.__wrapped__)
    old = '"perturbed_answer": [answer.format(**alt)'
    assert old in src, "the demo generator changed; update this probe"
    src = src.replace(old, '"perturbed_answer": [para.format(**alt)').replace("@functools.lru_cache(maxsize=4)\n", "")
    namespace = dict(vars(demo))
    exec(src, namespace)  # noqa: S102 - this project's own function, one string replaced
    demo._generate = functools.lru_cache(maxsize=4)(namespace["_generate"])


def training_rows(extra_authors: int) -> tuple[list[dict], list[dict]]:
    """(original's rows, retain model's rows)."""
    from flat_ray.data.demo import _generate, demo_split

    def qa(r, key="answer"):
        return {"question": r["question"], "answer": r[key]}

    demo_names = {r["question"] for r in demo_split("full")}
    extra = [r for r in _generate(extra_authors + 2, 12345)["full"] if r["question"] not in demo_names]
    extra = extra[: extra_authors * 10]
    general = [qa(r) for r in extra] + [qa(r, "paraphrased_answer") for r in extra]
    general += [qa(r) for s in ("real_authors_perturbed", "world_facts_perturbed") for r in demo_split(s)]
    forget = {r["question"] for r in demo_split("forget10")}
    full = [qa(r) for r in demo_split("full")]
    return general + full, general + [r for r in full if r["question"] not in forget]


def fine_tune(rows: list[dict], epochs: int, out: Path):
    from flat_ray.assets import demo_finetune_config, tiny_model_path
    from flat_ray.config import load_config
    from flat_ray.data import Collator
    from flat_ray.engine.replica import train
    from flat_ray.models import load_model_and_tokenizer
    from flat_ray.pipeline import build_dataset, profile_for

    ft = demo_finetune_config(load_config(None, [f"paths.workdir={out.parent}"], presets=["demo"]))
    ft = dataclasses.replace(ft, optim=dataclasses.replace(ft.optim, epochs=epochs),
                             launch=dataclasses.replace(ft.launch, num_workers=1))
    if not (out / "config.json").is_file():
        model, tok = load_model_and_tokenizer(str(tiny_model_path(ft)))
        train(ft, model, build_dataset(ft, tok, profile_for(ft, "demo", tok), rows), Collator(tok.pad_token_id), 1)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return load_model_and_tokenizer(str(out))


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
    ap.add_argument("--extra-authors", type=int, default=40)
    ap.add_argument("--perturbed", choices=("answer", "paraphrase"), default="paraphrase")
    ap.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs (the demo original's: 30)")
    ap.add_argument("--flat-lrs", default="", help="comma-separated FLAT learning rates to try on the original")
    ap.add_argument("--cache", default="/tmp/flat_ray_reference_probe")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    from flat_ray.eval.tofu import forget_quality, forget_truth_ratios, summarize

    transformers.logging.set_verbosity_error()
    if args.perturbed == "paraphrase":
        _perturb_from_paraphrase()
    root = Path(args.cache) / f"k{args.extra_authors}-e{args.epochs}-{args.perturbed}"
    rows = dict(zip(("original", "retain"), training_rows(args.extra_authors), strict=True))
    keys = ("forget_prob", "forget_truth_ratio", "retain_prob", "retain_truth_ratio", "real_authors_rougeL_recall",
            "world_facts_rougeL_recall", "model_utility")
    truth = {}
    for name in ("original", "retain"):
        start = time.time()
        model, tok = fine_tune(rows[name], args.epochs, root / name)
        values = evaluate(model, tok)
        truth[name] = forget_truth_ratios(values["forget"])
        s = summarize(values)
        print(f"{name:<9} ({len(rows[name])} rows, {time.time() - start:.0f} s): "
              + ", ".join(f"{k} {s[k]:.4f}" for k in keys), flush=True)
    fq0 = forget_quality(truth["original"], truth["retain"])
    print(f"extra authors {args.extra_authors}, perturbed answers in the {args.perturbed}'s template: forget quality "
          f"of the original against the retain model {fq0:.3g}", flush=True)
    for lr in [float(x) for x in args.flat_lrs.split(",") if x]:
        for div in ("total_variation", "kl"):
            model, tok = unlearn(root / "original", div, lr)
            values = evaluate(model, tok)
            s = summarize(values, reference_tr=truth["retain"])
            print(f"FLAT {div:<16} lr {lr:.1e}: forget_quality {s['forget_quality']:.3g} "
                  f"({s['forget_quality'] / fq0:.3g}x the original's), model_utility {s['model_utility']:.4f}, "
                  f"forget_prob {s['forget_prob']:.4f}, retain_prob {s['retain_prob']:.4f}", flush=True)


if __name__ == "__main__":
    main()
