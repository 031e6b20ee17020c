"""flat_ray's own per-worker training loop on one GPU, without Ray: tokens/s, MFU, peak memory against the memory
plan, and evaluation time per epoch (#18 item 5).

    bash benchmarks/gpu_path.sh                      # on the GPU machine (installs what it lacks, then this)
    python benchmarks/gpu_path.py [--out DIR] [--cache DIR] [--peak-tflops 989] [--variants zero0,zero3,...]
    python benchmarks/gpu_path.py --device cpu --tiny  # the same code on a tiny model, to check it without a GPU
                                                       # (compiled with the aot_eager backend there: no C++ build)

What runs is the training job of ``flat_ray.engine.loop`` (the code every Ray Train worker runs): its set-up (data,
the DeepSpeed engine: AdamW, the lr schedule, ZeRO, bf16), its evaluation and its training epoch, with rank 0 of
a world of 1 and a tracker that keeps the metrics the loop logs in memory instead of sending them to MLflow. The
checkpoint and the export are left out: at 1B they write 20 GB and 2.5 GB, which is disk speed, not the loop's.

The model is a randomly initialised Llama-style config of the Llama-3.2-1B shape (hidden 2048, 16 layers, 32
heads, 8 KV heads, MLP 8192, vocabulary 128256, tied embeddings: 1.24 B parameters), saved in bf16, with the tiny
model's tokenizer. The data is TOFU-shaped: 400 forget questions of about 20 words with answers of about 70
(TOFU forget10's size), in TOFU's file layout, FLAT with total variation and the paper's normalisation, micro-batch
16, 512 tokens at most. Each variant runs: set-up, the evaluation before training (all questions), epoch 1, the
interim evaluation (``eval.interim_examples``), epoch 2, the last evaluation.

Reported per variant: tokens/s over epoch 2 (the loop's own ``tokens_per_s``, counted non-padding tokens of the
forget and template sequences), MFU = 6 * parameters * tokens/s / peak FLOP/s, the peak GPU memory of training
(``torch.cuda.max_memory_allocated`` from set-up to the end of epoch 2, evaluation excluded) next to
``flat_ray.memory.plan``'s estimate, and each evaluation's time (``eval_s``).

Variants: ZeRO-0 and ZeRO-3, each with and without gradient checkpointing; compiled (``deepspeed.compile``) ZeRO-0,
and ZeRO-3 with gradient checkpointing; ZeRO-3 evaluating from the shards (``eval.gathered=false``: without #18
item 2's gathered copy; on one GPU the "shards" are the whole model, so this ratio only bounds the multi-GPU one).
The gradient-checkpointing variants skip evaluation (it is the same as without).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flat_ray import tracking  # noqa: E402
from flat_ray.config import load_config  # noqa: E402
from flat_ray.engine.loop import WorkerContext, _Job  # noqa: E402
from flat_ray.memory import Arch, plan  # noqa: E402

NO_EVAL = "eval.enabled=false"  # gradient checkpointing changes training only: those variants skip evaluation
VARIANTS: dict[str, list[str]] = {
    "zero0": ["deepspeed.stage=0"],
    "zero0-gc": ["deepspeed.stage=0", "model.gradient_checkpointing=true", NO_EVAL],
    "zero3": ["deepspeed.stage=3"],
    "zero3-gc": ["deepspeed.stage=3", "model.gradient_checkpointing=true", NO_EVAL],
    "zero0-compiled": ["deepspeed.stage=0", "deepspeed.compile=true"],
    "zero3-gc-compiled": ["deepspeed.stage=3", "model.gradient_checkpointing=true", "deepspeed.compile=true", NO_EVAL],
    "zero3-shards": ["deepspeed.stage=3", "eval.gathered=false"],
}
ONE_B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True}


class Recorder(tracking.NullTracker):
    """The tracker of rank 0, keeping what the loop logs: (step, key, value)."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, str, float]] = []

    def log_metrics(self, metrics, step: int = 0) -> None:
        self.logged += [(step, k, float(v)) for k, v in metrics.items()]

    def values(self, key: str) -> list[tuple[int, float]]:
        return [(s, v) for s, k, v in self.logged if k == key]


def words(n: int, rng: random.Random, vocab: list[str]) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def write_data(root: Path, n_forget: int, n_eval: int, q_words: int = 20, a_words: int = 70) -> Path:
    """TOFU's file layout with TOFU-shaped rows: forget10 (train), and the four perturbed evaluation splits."""
    from flat_ray.data.demo import demo_texts

    rng = random.Random(0)
    vocab = sorted({w for t in demo_texts() for w in t.split()})

    def qa(paraphrase: bool) -> dict[str, Any]:
        row = {"question": words(q_words, rng, vocab) + "?", "answer": words(a_words, rng, vocab) + "."}
        if paraphrase:
            row["paraphrased_answer"] = words(a_words, rng, vocab) + "."
            row["perturbed_answer"] = [words(a_words, rng, vocab) + "." for _ in range(5)]
        return row

    root.mkdir(parents=True, exist_ok=True)
    splits = {"forget10": (n_forget, False), "forget10_perturbed": (n_eval, True), "retain_perturbed": (n_eval, True),
              "real_authors_perturbed": (n_eval, True), "world_facts_perturbed": (n_eval, True)}
    for split, (n, para) in splits.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(qa(para)) + "\n" for _ in range(n)))
    return root


def write_model(root: Path, shape: dict[str, Any]) -> Path:
    """A random-init Llama model of ``shape`` in bf16, with the tiny model's tokenizer (trained on the demo text)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from flat_ray.data.demo import demo_texts
    from flat_ray.models import train_tokenizer

    if (root / "config.json").is_file():
        return root
    tokenizer = train_tokenizer(demo_texts(), 512)
    config = LlamaConfig(**shape, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root, safe_serialization=True)
    tokenizer.save_pretrained(root)
    return root


def _drop_state() -> None:
    """Forget the last variant: its engine (garbage), transformers' ZeRO-3 hook, torch.compile's caches."""
    import gc

    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    gc.collect()
    unset_hf_deepspeed_config()
    torch._dynamo.reset()


def _graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_variant(name: str, model_dir: Path, data_dir: Path, out: Path, args) -> dict[str, Any]:
    """Set-up, evaluation, epoch 1, interim evaluation, epoch 2, last evaluation: the loop's own pieces."""
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", "data.benchmark=tofu", f"data.data_dir={data_dir}", "data.split=forget10",
        f"data.max_length={args.max_length}", "method.name=flat", "method.divergence=total_variation",
        "method.normalize=paper", f"optim.micro_batch_size={args.micro_batch}", "optim.grad_accum_steps=1",
        "optim.epochs=2", "optim.lr=1e-5", "optim.warmup_ratio=0.1", "launch.num_workers=1",
        f"eval.max_examples={args.eval_examples}", f"eval.interim_examples={max(1, args.eval_examples // 4)}",
        f"eval.max_new_tokens={args.new_tokens}", f"eval.batch_size={args.eval_batch}",
        f"deepspeed.precision={'bf16' if args.device == 'cuda' else 'fp32'}", *VARIANTS[name]])
    payload = {"run": cfg.to_dict(), "model_path": str(model_dir), "output_dir": str(out / name),
               "storage_dir": str(out / name / "storage"), "mlflow": {"uri": None, "run_id": None},
               "restore_from": None}
    recorder = Recorder()
    graphs_before = _graphs()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    job = _Job.setup(payload, WorkerContext(0, 1, 0), recorder, lambda event: None)
    setup_s = time.perf_counter() - started
    train_peak = 0.0
    epoch_s = []
    job.evaluate(0)
    job.engine.train()
    for epoch in range(2):
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        problem = job.train_epoch(epoch)
        if args.device == "cuda":
            torch.cuda.synchronize()
            train_peak = max(train_peak, torch.cuda.max_memory_allocated())
        epoch_s.append(time.perf_counter() - t0)
        if problem:
            raise SystemExit(f"{name}: {problem}")
        graphs = _graphs()
        job.evaluate(epoch + 1)
        eval_graphs = _graphs() - graphs  # the evaluation runs eager, compiled training or not
    steps = len(job.loader)
    tps = [v for s, v in recorder.values("tokens_per_s") if s > steps]  # epoch 2: compiled and warm
    tokens_per_s = sum(tps) / len(tps)
    arch = Arch.from_config(json.loads((model_dir / "config.json").read_text()))
    estimate = plan(cfg, arch, world_size=1, precision="bf16" if args.device == "cuda" else "fp32").train
    result = {
        "variant": name, "params": arch.params, "setup_s": setup_s, "epoch_s": epoch_s, "steps_per_epoch": steps,
        "tokens_per_s": tokens_per_s, "mfu": 6 * arch.params * tokens_per_s / (args.peak_tflops * 1e12),
        "train_peak_gib": train_peak / 2**30, "plan_train_gib": estimate / 2**30,
        "eval_s": dict(recorder.values("eval_s")), "eval_examples": dict(recorder.values("eval_examples")),
        "losses": [v for _, v in recorder.values("train/loss")],
        "compiled": bool(job.engine.is_compiled), "graphs_compiled": _graphs() - graphs_before, "graphs_compiled_by_eval": eval_graphs,
    }
    del job
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_path_out")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a tiny model and few rows (checks the code, not speed)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cache", help="where the model and data are written (default: OUT/cache)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run this variant in this process (the parent starts one each)
    args = ap.parse_args()
    args.max_length, args.micro_batch = (64, 2) if args.tiny else (512, 16)
    args.eval_examples, args.new_tokens, args.eval_batch = (4, 4, 4) if args.tiny else (32, 64, 16)
    out = Path(args.out).resolve()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; valid choices: {', '.join(VARIANTS)}")
    cache = Path(args.cache).resolve() if args.cache else out / "cache"
    model_dir = write_model(cache / ("tiny" if args.tiny else "llama-1b"), TINY if args.tiny else ONE_B)
    data_dir = write_data(cache / "data", *((16, args.eval_examples, 3, 6) if args.tiny else (400, args.eval_examples)))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    if args.device == "cpu":  # the CPU check: Dynamo's graph capture and AOT autograd, without inductor's C++ build
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_compile_backend("aot_eager")
    if args.one:
        result = run_variant(args.one, model_dir, data_dir, out, args)
        (out / f"{args.one}.json").write_text(json.dumps(result, indent=1))
        return
    results = []
    for name in names:
        # on a GPU a fresh process per variant (its own CUDA memory, peak statistics and compile caches); on the
        # CPU check one process, each variant's DeepSpeed and transformers state dropped before the next
        if args.device == "cpu":
            (out / f"{name}.json").write_text(json.dumps(run_variant(name, model_dir, data_dir, out, args), indent=1))
            _drop_state()
        elif subprocess.run([sys.executable, __file__, "--one", name, *sys.argv[1:]]).returncode != 0:
            print(f"{name:<18} failed (its output is above)", flush=True)
            continue
        r = json.loads((out / f"{name}.json").read_text())
        results.append(r)
        print(f"{name:<18} {r['tokens_per_s']:>10.0f} tok/s  MFU {r['mfu']:6.1%}  train peak "
              f"{r['train_peak_gib']:6.2f} GiB (plan {r['plan_train_gib']:6.2f})  epoch {r['epoch_s'][1]:6.1f} s  "
              f"eval {' / '.join(f'{v:.1f}' for v in r['eval_s'].values())} s", flush=True)
    (out / "gpu_path.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
