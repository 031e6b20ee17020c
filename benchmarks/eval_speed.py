"""P3: batched TOFU evaluation vs a straightforward per-question loop, on the same tiny model and data.

    python benchmarks/eval_speed.py [--questions 40] [--max-new-tokens 24]

The loop scores every candidate answer (answer, paraphrase, perturbed answers) with its own forward pass and
generates one question at a time, as simple evaluation scripts do. flat_ray's path scores all candidates of a
split in length-sorted batches and generates in left-padded batches. Both must give the same per-question
losses (asserted) before the times are compared. Prints one line per path and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flat_ray.assets import DEMO_SPEC  # noqa: E402
from flat_ray.data import BUILTIN_TEMPLATES, encode_qa, load_split  # noqa: E402
from flat_ray.data.demo import demo_texts  # noqa: E402
from flat_ray.eval.runner import evaluate_split, rouge_l_recall  # noqa: E402
from flat_ray.losses import mean_token_nll  # noqa: E402
from flat_ray.models import PROFILES, build_tiny_model, load_model_and_tokenizer  # noqa: E402


@torch.no_grad()
def per_question(model, tok, profile, rows, max_length, max_new_tokens):
    gt, para, pert = [], [], []
    for r in rows:
        def nll(answer, question=r["question"]):
            enc = encode_qa(tok, profile, question, answer, max_length)
            return mean_token_nll(model(torch.tensor([enc["input_ids"]])).logits, torch.tensor([enc["labels"]])).item()
        gt.append(nll(r["answer"]))
        para.append(nll(r["paraphrased_answer"]))
        pert.append([nll(a) for a in r["perturbed_answer"]])
        enc = encode_qa(tok, profile, r["question"], r["answer"], max_length)
        prompt = enc["input_ids"][: enc["labels"].count(-100)]
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        rouge_l_recall(tok.decode(out[0, len(prompt):], skip_special_tokens=True), r["answer"])
    return np.array(gt), np.array(para), np.array(pert)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(demo_texts() + list(BUILTIN_TEMPLATES), tmp, DEMO_SPEC)
        model, tok = load_model_and_tokenizer(str(path))
    model.eval()
    profile = PROFILES["generic"]
    rows = (load_split("demo", "full") * 4)[: args.questions]
    kw = {"max_length": 128, "max_new_tokens": args.max_new_tokens}
    per_question(model, tok, profile, rows[:2], **kw)  # warm-up
    t0 = time.perf_counter()
    gt, para, pert = per_question(model, tok, profile, rows, **kw)
    loop_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    v = evaluate_split(model, tok, profile, rows, batch_size=args.batch_size, **kw)
    batched_s = time.perf_counter() - t0
    np.testing.assert_allclose(v.avg_gt_loss, gt, rtol=1e-4)
    np.testing.assert_allclose(v.avg_paraphrased_loss, para, rtol=1e-4)
    np.testing.assert_allclose(v.average_perturb_loss, pert, rtol=1e-4)
    n_seq = len(rows) * (2 + pert.shape[1])
    print(f"model: tiny Llama {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, CPU threads "
          f"{torch.get_num_threads()}; {len(rows)} questions, {n_seq} scored answers, {args.max_new_tokens} new tokens")
    print(f"per-question loop: {loop_s:8.2f} s")
    print(f"flat_ray batched:  {batched_s:8.2f} s  (batch {args.batch_size})")
    print(f"speed-up: {loop_s / batched_s:.1f}x  (same per-question losses, rtol 1e-4)")


if __name__ == "__main__":
    main()
