"""Selectivity on real TOFU text across model sizes (#14 item 4): how well FLAT and the baselines lower the
forget answers' probability while keeping the retain answers', for random-init Llama-style models of several
sizes fine-tuned until they know ``../shared/data/tofu_mini``.

    python benchmarks/selectivity.py --sizes 64x2 --lrs 3e-4,1e-3 --rows flat/kl,npo     # a quick check (CPU)
    python benchmarks/selectivity.py --device cuda --sizes 256x4,512x8 --out sel.json   # one process per size

For each size ``HxL`` (hidden size H, L layers, MLP width 2H, heads H/32 but at least 4, a 2048-token BPE
vocabulary trained on the tofu_mini text):

1. the *original*: the random-init model trained with plain next-token loss on all 240 QA pairs (forget + retain)
   for ``--ft-epochs`` epochs at ``--ft-lr`` x 128/H, one rank, micro-batch 8;
2. for every method row and learning rate, the demo's unlearning recipe (4 epochs, micro-batch 4, two ranks
   replayed in one process by ``flat_ray.engine.replica``, warm-up 10%, linear decay, clipping at 1) from the
   original, on the 40 forget pairs, with TOFU's own "I don't know" answers as templates. Methods with a retain
   term sample retain pairs 41-200;
3. ``forget_prob`` and ``retain_prob`` after training: TOFU's per-question answer probability (exp of minus the
   mean answer-token NLL), averaged over the 40 forget pairs and over retain pairs 1-40, which every model was
   fine-tuned on and no method trains on.

A star marks a cell that halves forget probability and keeps at least 0.8 of retain probability. Each size is
printed as a table and written to ``--out`` (JSON) as soon as it ends. Nothing here needs Ray, DeepSpeed or MLflow.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOFU_MINI = ROOT.parent / "shared" / "data" / "tofu_mini"
RETAIN_EVAL = 40  # retain pairs 1-40 are evaluated; the methods' retain batches come from the rest
ROWS = ("flat/total_variation,flat/kl,flat/jensen_shannon,flat/pearson,"
        "grad_ascent,grad_diff,idk,npo,simnpo,dpo")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_splits(src: Path, out: Path) -> dict[str, list[dict]]:
    """forget / retain_eval / retain_train / full (forget + all retain) as TOFU-format JSONL under ``out``."""
    forget, retain = read_jsonl(src / "forget.jsonl"), read_jsonl(src / "retain.jsonl")
    splits = {"forget": forget, "retain_eval": retain[:RETAIN_EVAL], "retain_train": retain[RETAIN_EVAL:],
              "full": forget + retain}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]})
                                                   + "\n" for r in rows))
    shutil.copy(src / "idontknow.jsonl", out / "idontknow.jsonl")
    return splits


def spec_for(size: str):
    from flat_ray.models import TinySpec

    hidden, layers = (int(x) for x in size.split("x"))
    return TinySpec(vocab_size=2048, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                    num_heads=max(4, hidden // 32), max_position_embeddings=512)


def answer_prob(model, tokenizer, profile, rows: list[dict], device: str) -> float:
    import numpy as np
    import torch

    from flat_ray.eval.runner import answer_losses

    model.eval()
    with torch.no_grad():
        losses = answer_losses(model, tokenizer, profile, [(r["question"], r["answer"]) for r in rows],
                               max_length=256, batch_size=20, device=device)
    model.train()
    return float(np.mean(np.exp(-losses)))


def run_size(size: str, args, data: Path, splits: dict[str, list[dict]], save) -> dict:

    from flat_ray.config import load_config
    from flat_ray.data import Collator
    from flat_ray.engine.replica import train
    from flat_ray.models import cached_tiny_model, load_model_and_tokenizer
    from flat_ray.pipeline import build_dataset, profile_for

    spec = spec_for(size)
    texts = [f"{r['question']} {r['answer']}" for r in splits["full"]]
    texts += [r["text"] for r in read_jsonl(data / "idontknow.jsonl")]
    path = cached_tiny_model(texts, Path(args.cache), spec)
    model, tok = load_model_and_tokenizer(str(path))
    model.to(args.device)
    params = sum(p.numel() for p in model.parameters())
    base = ["data.benchmark=tofu", f"data.data_dir={data}", "data.max_length=256", f"model.name_or_path={path}"]
    ft = load_config(None, [*base, "data.split=full", "method.name=sft", f"optim.lr={args.ft_lr * 128 / spec.hidden_size}",
                            f"optim.epochs={args.ft_epochs}", "optim.micro_batch_size=8", "optim.warmup_ratio=0.05",
                            "optim.weight_decay=0.0", "launch.num_workers=1"], presets=["demo"])
    profile = profile_for(ft, str(path), tok)
    collate = Collator(tok.pad_token_id)
    start = time.time()
    train(ft, model, build_dataset(ft, tok, profile), collate, 1, args.device)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    f0 = answer_prob(model, tok, profile, splits["forget"], args.device)
    r0 = answer_prob(model, tok, profile, splits["retain_eval"], args.device)
    result = {"size": size, "params": params, "finetune_s": round(time.time() - start, 1), "forget_prob": f0,
              "retain_prob": r0, "lrs": args.lrs, "rows": {}}
    print(f"[{size}] {params / 1e6:.2f} M parameters; original after {result['finetune_s']} s: forget_prob {f0:.4f}, "
          f"retain_prob {r0:.4f}", flush=True)
    for row in args.rows:
        name, _, div = row.partition("/")
        cells = []
        for lr in args.lrs:
            cfg = load_config(None, [*base, "data.split=forget", f"method.name={name}", f"optim.lr={lr}",
                                     "method.retain_split=retain_train", "data.template_source=file",
                                     f"data.template_file={data / 'idontknow.jsonl'}"]
                              + ([f"method.divergence={div}"] if div else []), presets=["demo"])
            model.load_state_dict(original)
            train(cfg, model, build_dataset(cfg, tok, profile), collate, cfg.launch.num_workers, args.device)
            f1 = answer_prob(model, tok, profile, splits["forget"], args.device)
            r1 = answer_prob(model, tok, profile, splits["retain_eval"], args.device)
            cells.append([f1, r1] if math.isfinite(f1) and math.isfinite(r1) else [None, None])
        result["rows"][row] = cells
        save(result)
        print(f"[{size}] {row:<22}" + "".join(f"{cell(c, f0, r0):>15}" for c in cells), flush=True)
    model.load_state_dict(original)
    result["total_s"] = round(time.time() - start, 1)
    return result


def cell(c: list, f0: float, r0: float) -> str:
    if c[0] is None:
        return "nan"
    star = "*" if c[0] <= 0.5 * f0 and c[1] >= 0.8 * r0 else " "
    return f"{c[0]:.3f}/{c[1]:.3f}{star}"


def summary(res: dict) -> list[str]:
    """Per row: the best retain ratio among cells that halve forget probability."""
    f0, r0 = res["forget_prob"], res["retain_prob"]
    lines = []
    for row, cells in res["rows"].items():
        ok = [(c[1] / r0, lr, c) for lr, c in zip(res["lrs"], cells, strict=True) if c[0] is not None
              and c[0] <= 0.5 * f0]
        best = max(ok, default=None)
        lines.append(f"{row:<22} " + (f"keeps {best[0]:.2f} of retain at lr {best[1]:.1e} "
                                       f"(forget {best[2][0]:.3f}, retain {best[2][1]:.3f})" if best
                                       else "never halves forget probability on this grid"))
    return lines


def table(res: dict) -> list[str]:
    """One size as a markdown table: a row per method, a column per learning rate."""
    f0, r0 = res["forget_prob"], res["retain_prob"]
    lines = [f"{res['size']} ({res['params'] / 1e6:.2f} M parameters; original forget {f0:.4f}, retain {r0:.4f})", "",
             "| method | " + " | ".join(f"{lr:g}" for lr in res["lrs"]) + " |",
             "|---" * (len(res["lrs"]) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(cell(c, f0, r0).strip() for c in cells) + " |"
              for row, cells in res["rows"].items()]
    return lines


def show(results: list | dict) -> None:
    groups = results.items() if isinstance(results, dict) else [("results", results)]
    for name, group in groups:
        if not isinstance(group, list):
            continue
        print(f"## {name}\n")
        for res in group:
            print("\n".join(table(res)) + "\n")
            print("\n".join(summary(res)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(TOFU_MINI))
    parser.add_argument("--sizes", default="64x2,128x4", help="HIDDENxLAYERS, comma-separated")
    parser.add_argument("--lrs", default="2e-5,5e-5,1e-4,2e-4,3e-4,5e-4,7e-4,1e-3,2e-3")
    parser.add_argument("--rows", default=ROWS, help="methods, FLAT's as flat/<divergence>")
    parser.add_argument("--ft-epochs", type=int, default=30)
    parser.add_argument("--ft-lr", type=float, default=3e-3, help="fine-tuning lr at hidden size 128 (x 128/H)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "flat_ray_selectivity"))
    parser.add_argument("--out", help="JSON results file")
    parser.add_argument("--show", metavar="JSON", help="print the tables of a results file (--out's, or a list "
                        "of them under 'coarse'/'fine' keys as in benchmarks/results/) and exit")
    args = parser.parse_args()
    if args.show:
        show(json.loads(Path(args.show).read_text()))
        return
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.rows = args.rows.split(",")
    if not Path(args.data, "forget.jsonl").is_file():
        sys.exit(f"selectivity.py: {args.data} has no forget.jsonl; pass --data DIR (tofu_mini)")
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    data = Path(args.cache) / "data"
    splits = write_splits(Path(args.data), data)
    results: list[dict] = []

    def save(partial: dict) -> None:  # after every row, so a run cut short keeps what it measured
        if args.out:
            Path(args.out).write_text(json.dumps([*results, partial], indent=1))

    for size in args.sizes.split(","):
        result = run_size(size, args, data, splits, save)
        save(result)
        results.append(result)
        print(f"[{size}] lrs: " + ", ".join(f"{lr:.1e}" for lr in args.lrs), flush=True)
        for line in summary(result):
            print(f"[{size}] {line}", flush=True)


if __name__ == "__main__":
    main()
