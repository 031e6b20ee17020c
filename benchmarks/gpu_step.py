"""FLAT step vs NPO step on one GPU at 1B scale: tokens/s, MFU and peak memory (performance issue, P4/P5).

    python benchmarks/gpu_step.py [--out DIR] [--peak-tflops 989]

Runs on any CUDA machine with torch and transformers (no Ray, DeepSpeed or MLflow needed). The model is a
randomly initialised Llama-style config of the Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads,
MLP 8192, vocabulary 128256, tied embeddings: 1.24 B parameters), sdpa attention, bf16 autocast over fp32 master
weights (what DeepSpeed's bf16 mode keeps), fused AdamW, gradient clipping at 1.0; every sequence is 512 tokens
(the first quarter a masked prompt). The loss is flat_ray's own step, ``flat_ray.engine.step.method_loss``:
FLAT (TV, paper normalisation) forwards forget and template sequences in one concatenated pass; NPO (beta 0.1,
forget-only: ``retain_weight`` 0) forwards the forget sequences and a frozen bf16 reference model's forward on them.

1. The largest FLAT micro-batch (forget/template pairs) that fits is found by trying one step at each size.
2. FLAT at that micro-batch, NPO at the same number of forget examples, and NPO at the same number of sequences
   (twice as many forget examples) are each timed on a fresh model and optimiser: warm-up steps, then timed
   steps between CUDA events. Peak memory is ``torch.cuda.max_memory_allocated`` over the whole life of that
   model, optimiser and step.

MFU = counted FLOPs / step time / peak, with 6 * params per trained token (forward + backward; attention's
FLOPs, about 3% here, are not counted) plus 2 * params per token of NPO's reference forward. ``--device cpu
--tiny`` runs the same code on a tiny model to check it without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flat_ray.engine.step import method_loss  # noqa: E402
from flat_ray.losses import METHODS  # noqa: E402

SHAPE_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
SHAPE_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)
KNOBS = {"divergence": "tv", "normalize": "paper", "beta": 0.1, "retain_weight": 0.0}


def build_model(shape: dict, seq: int, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, max_position_embeddings=max(seq, 512), tie_word_embeddings=True,
                         rope_theta=500000.0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.float().train()


def make_batch(keys: tuple[str, ...], n: int, seq: int, vocab: int, device: str, gen: torch.Generator) -> dict:
    batch = {}
    for key in keys:
        ids = torch.randint(0, vocab, (n, seq), generator=gen).to(device)
        labels = ids.clone()
        labels[:, : seq // 4] = -100  # the prompt
        batch[key] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return batch


class Trial:
    """A fresh model + optimiser (+ NPO's frozen bf16 reference) for one method; ``step()`` is one optimiser step."""

    def __init__(self, method: str, shape: dict, seq: int, device: str, autocast: bool, compile: bool = False):
        self.method = METHODS[method]
        self.model = build_model(shape, seq, device)
        self.forward = torch.compile(self.model) if compile else self.model
        self.params = sum(p.numel() for p in self.model.parameters())
        self.reference = None
        if self.method.needs_reference:
            self.reference = build_model(shape, seq, device)
            self.reference.load_state_dict(self.model.state_dict())
            self.reference = self.reference.to(torch.bfloat16).eval().requires_grad_(False)
        fused = {"fused": True} if device == "cuda" else {}
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.01, **fused)
        self.device, self.autocast = device, autocast

    def step(self, batch: dict) -> torch.Tensor:
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            out = method_loss(self.forward, batch, self.method, KNOBS, self.reference)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    def close(self) -> None:
        del self.model, self.forward, self.reference, self.opt


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fits(method: str, n: int, args, shape: dict) -> bool:
    trial = None
    try:
        trial = Trial(method, shape, args.seq, args.device, args.device == "cuda")
        gen = torch.Generator().manual_seed(0)
        batch = make_batch(trial.method.splits(KNOBS), n, args.seq, shape["vocab_size"], args.device, gen)
        for _ in range(2):  # the second step is the peak: AdamW's states exist during forward and backward
            trial.step(batch)
        sync(args.device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        if trial is not None:
            trial.close()
        del trial
        free(args.device)


def measure(method: str, n: int, args, shape: dict, compile: bool = False) -> dict:
    free(args.device)
    trial = Trial(method, shape, args.seq, args.device, args.device == "cuda", compile)
    gen = torch.Generator().manual_seed(1)
    batches = [make_batch(trial.method.splits(KNOBS), n, args.seq, shape["vocab_size"], args.device, gen)
               for _ in range(2)]
    for i in range(args.warmup):
        trial.step(batches[i % 2])
    sync(args.device)
    times = []
    losses = []
    for i in range(args.steps):
        if args.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(trial.step(batches[i % 2]))
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            losses.append(trial.step(batches[i % 2]))
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    seqs = n * len(trial.method.splits(KNOBS))
    tokens = seqs * args.seq
    flops = 6 * trial.params * tokens + (2 * trial.params * tokens if trial.reference is not None else 0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    result = {
        "method": method + (" (torch.compile)" if compile else ""), "forget_examples": n, "sequences": seqs, "tokens_per_step": tokens,
        "step_s_median": step_s, "step_s_all": times, "tokens_per_s": tokens / step_s,
        "forget_examples_per_s": n / step_s, "tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / (args.peak_tflops * 1e12), "peak_mem_gib": peak, "params": trial.params,
        "losses_finite": bool(torch.isfinite(torch.stack(losses)).all()),
    }
    trial.close()
    del trial, batches
    free(args.device)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model, to check the script without a GPU")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--sizes", default="8,16,24,32,40,48,56,64", help="FLAT micro-batches (pairs) to try")
    ap.add_argument("--compile", action="store_true", help="also time both methods with torch.compile")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100/H200 SXM)")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for gpu_step.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or check the script with --device cpu --tiny")
    shape = SHAPE_TINY if args.tiny else SHAPE_1B
    import transformers

    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"card: {card}; torch {torch.__version__}; transformers {transformers.__version__}; seq {args.seq}",
          flush=True)
    t0 = time.perf_counter()
    largest = 0
    for n in (int(s) for s in args.sizes.split(",")):
        ok = fits("flat", n, args, shape)
        print(f"FLAT micro-batch {n} pairs ({2 * n} sequences of {args.seq}): {'fits' if ok else 'out of memory'} "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        if not ok:
            break
        largest = n
    if not largest:
        sys.exit("not even the smallest micro-batch fits")
    rows = []
    runs = [(m, n, compiled) for compiled in ((False, True) if args.compile else (False,))
            for m, n in (("flat", largest), ("npo", largest), ("npo", 2 * largest))]
    for method, n, compiled in runs:
        try:
            rows.append(measure(method, n, args, shape, compiled))
        except torch.OutOfMemoryError:
            rows.append({"method": method, "forget_examples": n, "oom": True})
            free(args.device)
        except Exception as exc:  # torch.compile can fail on a machine without a working compiler
            if not compiled:
                raise
            print(f"torch.compile run failed: {type(exc).__name__}: {exc}", flush=True)
            break
        r = rows[-1]
        print(json.dumps({k: v for k, v in r.items() if k != "step_s_all"}), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "gpu_step.json").write_text(json.dumps({
                "card": card, "torch": torch.__version__, "transformers": transformers.__version__,
                "seq": args.seq, "rows": rows}, indent=1))
    params = max(r.get("params", 0) for r in rows)
    print(f"\n{card}, {params / 1e9:.2f} B params, seq {args.seq}, bf16 autocast, sdpa")
    print("| method | forget examples | sequences | step (s) | tokens/s | TFLOP/s | MFU | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['method']} | {r['forget_examples']} | | out of memory | | | | |")
            continue
        print(f"| {r['method']} | {r['forget_examples']} | {r['sequences']} | {r['step_s_median']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | {r['mfu']:.1%} | {r['peak_mem_gib']:.1f} |")
    done = [r for r in rows if not r.get("oom")]
    for flat in (r for r in done if r["method"].startswith("flat")):
        for npo in (r for r in done if r["method"] == flat["method"].replace("flat", "npo")):
            print(f"{flat['method']} at {flat['forget_examples']} pairs / {npo['method']} at "
                  f"{npo['forget_examples']} forget examples: peak memory "
                  f"{flat['peak_mem_gib'] / npo['peak_mem_gib']:.2f}, forget examples/s "
                  f"{flat['forget_examples_per_s'] / npo['forget_examples_per_s']:.2f}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
