"""P1b: how flat_ray's FLAT training step scales: Ray Train workers x ZeRO stage, forget-set size, sequence length.

    python benchmarks/step_scaling.py [--groups workers,size,length] [--repeats 1] [--hidden 256 --layers 4]

Every run is flat_ray's real training path (``flat_ray.launch.driver.run_training``: Ray Train workers, a
DeepSpeed engine, MLflow), one epoch of FLAT (total variation, ``paper`` normalisation), micro-batch 4 per worker,
fp32 on CPU, no evaluation, on a tiny Llama-style model built here. The matrix (10 runs by default):

- ``workers``: 1 and 2 workers x ZeRO stages 0, 2 and 3, on 200 forget rows;
- ``size``: 40, 200 and 400 forget rows (2 workers, ZeRO-3);
- ``length``: the 200 rows with every answer written once, twice and four times (2 workers, ZeRO-3).

The data are local TOFU-format files (``data.benchmark=tofu data.data_dir=...``) written here from
``../shared/data/tofu_mini``: 40 rows = its forget.jsonl (TOFU forget10's first 40), 200 = those plus the first
160 rows of its retain.jsonl (real TOFU QA pairs), 400 = the 240 real rows plus the first 160 of them again
(exact repeats: only lengths matter for timing). Without tofu_mini, the demo's 200 rows are used the same way.

Each run logs per-step ``tokens_per_s`` (real tokens of both splits over all workers / rank 0's time for the
step) into MLflow; the step time is the interval between consecutive per-step records, so it covers everything
the loop does per optimizer step (data, forward, backward, DeepSpeed step, the collective, logging). The first
``--warmup-steps`` steps are left out of both; figures are medians. ``worker_s`` (the rank-0 worker's own time:
engine, training, export) and ``duration_s`` (the whole run, Ray Train's worker start included) come from the
timing metrics every run logs. Ray is started once for all runs. With ``--repeats 2`` each run is made twice.
Each worker gets ``launch.cpus_per_worker`` = 0.99 CPU, for which Ray sets ``OMP_NUM_THREADS=1``: one worker
computes on one core, two workers on two. The default matrix takes about 5 min on a 2-core machine under light
load (8 min while other test suites shared it), mostly Ray Train starting a worker group per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flat_ray import tracking  # noqa: E402
from flat_ray.config import load_config  # noqa: E402
from flat_ray.data import BUILTIN_TEMPLATES, UnlearnDataset, load_split, make_template_source  # noqa: E402
from flat_ray.data.demo import demo_texts  # noqa: E402
from flat_ray.launch.driver import run_training  # noqa: E402
from flat_ray.models import (  # noqa: E402
    TinySpec,
    build_tiny_model,
    count_parameters,
    load_model_and_tokenizer,
    resolve_profile,
)

TOFU_MINI = ROOT.parent / "shared" / "data" / "tofu_mini"
MAX_LENGTH = 512  # no answer is cut, even written four times
SEED = 42  # optim.seed's default: the template assignment below is the one training uses


@dataclass(frozen=True)
class Run:
    group: str  # the table it is reported in
    workers: int
    stage: int
    split: str


GROUPS = {
    "workers": [Run("workers", w, s, "rows200") for w in (1, 2) for s in (0, 2, 3)],
    "size": [Run("size", 2, 3, split) for split in ("rows40", "rows200", "rows400")],
    "length": [Run("length", 2, 3, split) for split in ("rows200", "rows200_answers_x2", "rows200_answers_x4")],
}
ROWS = {"rows40": 40, "rows200": 200, "rows400": 400, "rows200_answers_x2": 200, "rows200_answers_x4": 200}


def configurations(groups: list[str]) -> list[tuple[int, int, str]]:
    """(workers, stage, split) of every run the groups need; the 2-worker ZeRO-3 run on 200 rows serves all."""
    return list(dict.fromkeys((r.workers, r.stage, r.split) for g in groups for r in GROUPS[g]))


def write_data(data_dir: Path) -> tuple[list[str], str]:
    """Write the TOFU-format splits; return the texts to train the tokenizer on and where the rows came from."""
    if (TOFU_MINI / "forget.jsonl").is_file() and (TOFU_MINI / "retain.jsonl").is_file():
        real = load_split("tofu", "forget", str(TOFU_MINI)) + load_split("tofu", "retain", str(TOFU_MINI))
        texts, source = [f"{r['question']} {r['answer']}" for r in real], "tofu_mini forget + retain"
    else:
        real, texts, source = load_split("demo", "full"), demo_texts(), "demo full (tofu_mini is absent)"
    real = [{"question": r["question"], "answer": r["answer"]} for r in real]
    splits = {"rows40": real[:40], "rows200": real[:200], "rows400": (real + real)[:400]}
    for k in (2, 4):
        splits[f"rows200_answers_x{k}"] = [{**r, "answer": " ".join([r["answer"]] * k)} for r in real[:200]]
    data_dir.mkdir(parents=True)
    for name, rows in splits.items():
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return texts, source


def sequence_lengths(model_dir: Path, data_dir: Path, split: str) -> tuple[float, float]:
    """Mean tokens of the forget and the template sequences of a split, as training builds them."""
    _, tok = load_model_and_tokenizer(str(model_dir), load_model=False)
    rows = load_split("tofu", split, str(data_dir))
    ds = UnlearnDataset(rows, tok, resolve_profile("auto", str(model_dir), tok),
                        make_template_source("builtin", rows, seed=SEED), max_length=MAX_LENGTH)
    items = [ds[i] for i in range(len(ds))]
    return (statistics.mean(len(i["forget"]["input_ids"]) for i in items),
            statistics.mean(len(i["template"]["input_ids"]) for i in items))


def step_times(uri: str, run_id: str, warmup: int) -> list[float]:
    """Seconds between consecutive per-step records after the warm-up steps."""
    from mlflow.tracking import MlflowClient  # flat_ray.tracking.metric_history keeps no timestamps

    stamps = sorted((m.step, m.timestamp) for m in MlflowClient(uri).get_metric_history(run_id, "tokens_per_s"))
    return [(b[1] - a[1]) / 1000 for a, b in zip(stamps, stamps[1:], strict=False) if b[0] > warmup]


def last(uri: str, run_id: str, key: str) -> float:
    hist = tracking.metric_history(uri, run_id, key)
    return hist[-1][1] if hist else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default="workers,size,length", help="comma-separated: workers, size, length")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each configuration")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of step time and tokens/s")
    args = ap.parse_args()
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if not set(groups) <= set(GROUPS):
        ap.error(f"unknown group(s) {sorted(set(groups) - set(GROUPS))}; choose from {', '.join(GROUPS)}")
    import ray
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ray.init(num_cpus=os.cpu_count(), logging_level="WARNING")
    spec = TinySpec(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                    num_layers=args.layers, num_heads=max(1, args.hidden // 64), max_position_embeddings=MAX_LENGTH)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        texts, source = write_data(data_dir)
        model_dir = build_tiny_model(texts + list(BUILTIN_TEMPLATES), Path(tmp) / "model", spec)
        lengths = {}
        results: dict[tuple[int, int, str], list[tuple[int, float, float, float, float]]] = {}
        for repeat in range(args.repeats):
            for i, (workers, stage, split) in enumerate(configurations(groups)):
                if split not in lengths:
                    lengths[split] = sequence_lengths(model_dir, data_dir, split)
                cfg = load_config(None, [
                    f"model.name_or_path={model_dir}", "data.benchmark=tofu", f"data.data_dir={data_dir}",
                    f"data.split={split}", f"data.max_length={MAX_LENGTH}", "method.name=flat", "optim.epochs=1",
                    f"optim.micro_batch_size={args.micro_batch}", "eval.enabled=false", f"deepspeed.stage={stage}",
                    f"launch.num_workers={workers}", "tracking.log_model_max_mb=0",
                    f"tracking.run_name=scale-{i}-{repeat}-{time.strftime('%H%M%S')}", f"paths.workdir={tmp}/work"])
                res = run_training(cfg)
                uri, rid = res.mlflow_uri, res.run_id
                history = tracking.metric_history(uri, rid, "tokens_per_s")
                rates = [v for step, v in history if step > args.warmup_steps]
                times = step_times(uri, rid, args.warmup_steps)
                results.setdefault((workers, stage, split), []).append((
                    len(history), statistics.median(times) if times else float("nan"),
                    statistics.median(rates) if rates else float("nan"),
                    last(uri, rid, "worker_s"), last(uri, rid, "duration_s")))
        n_params = count_parameters(load_model_and_tokenizer(str(model_dir))[0])
    print(f"\nmodel: Llama-style {n_params / 1e6:.1f} M params (hidden {spec.hidden_size}, {spec.num_layers} layers, "
          f"vocab {spec.vocab_size}), fp32 on CPU; data: {source}; FLAT tv/paper, 1 epoch, micro-batch "
          f"{args.micro_batch} per worker, max_length {MAX_LENGTH}; first {args.warmup_steps} steps left out; "
          f"script wall time {time.perf_counter() - started:.0f} s")
    for group in groups:
        print(f"\n[{group}]")
        print(f"{'workers':>7s} {'ZeRO':>4s} {'rows':>5s} {'split':20s} {'forget/template tokens':>22s} {'steps':>5s} "
              f"{'median step':>11s} {'tokens/s':>8s} {'worker_s':>8s} {'run wall':>8s}")
        for run in GROUPS[group]:
            f_len, e_len = lengths[run.split]
            for steps, step_s, rate, worker_s, duration_s in results[(run.workers, run.stage, run.split)]:
                print(f"{run.workers:7d} {run.stage:4d} {ROWS[run.split]:5d} {run.split:20s} {f_len:13.0f} / {e_len:4.0f}  "
                      f"{steps:5d} {step_s:9.3f} s {rate:8.0f} {worker_s:7.1f}s {duration_s:7.1f}s")


if __name__ == "__main__":
    main()
