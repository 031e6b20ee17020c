"""What a sweep will cost before it runs: GPU-hours per trial, per cell and in all, from counted FLOPs at a stated
model-FLOPs utilisation (MFU), and money where node types have an hourly price (docs/sweeps.md, "Cost").

Per trial, with N parameters (the memory plan's architecture table) and T tokens per sequence:

- training: every epoch runs each forget example's sequences (FLAT: the forget answer and the template answer;
  GradDiff adds a retain sequence; each method's batch splits) forward and backward, 6·N FLOPs per token, plus
  2·N more when layers are recomputed in backward (``model.gradient_checkpointing``), plus a forward of the frozen
  reference model (2·N per token) over the splits NPO / DPO / SimNPO-style methods read it on;
- evaluation, before training and after every evaluated epoch: each question's answer, paraphrase and perturbed
  answers scored (2·N per token) and ``eval.max_new_tokens`` greedy tokens generated (2·N per token; decoding is
  bound by memory bandwidth, so this part is a floor rather than an estimate).

T is the mean token count of the split's questions and answers when the data and the tokenizer are on this
machine, else ``data.max_length`` (so the estimate is an upper bound, marked ``<=``). GPU-seconds = FLOPs / (peak
dense bf16 FLOP/s of the GPU type x MFU). The MFU is the one flat_ray has measured for its FLAT step on a GPU:
35% (BENCHMARKS.md, P4: eager, one H200, 1.24 B parameters); ZeRO-3's gathers and optimizer offload to host
memory lower it, so real runs of 7B trials on PCIe nodes take longer than this says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flat_ray.config import RunConfig
from flat_ray.errors import FlatRayError

MFU = 0.35
# dense bf16 tensor-core peak per GPU (TFLOP/s), vendor datasheets; H200 has the H100's compute
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "A10G": 70.0}
DEFAULT_GPU = "H100"
# published sizes (questions) where the data is not on this machine: TOFU's forget splits and evaluation splits
KNOWN_SIZES = {("tofu", "forget01"): 40, ("tofu", "forget05"): 200, ("tofu", "forget10"): 400,
               ("tofu", "retain99"): 3960, ("tofu", "retain95"): 3800, ("tofu", "retain90"): 3600}
TOFU_EVAL = {"retain": 400, "real_authors": 100, "world_facts": 117}
PERTURBED = {"forget": 5, "retain": 5, "real_authors": 3, "world_facts": 3}  # TOFU's perturbed answers per question


@dataclass(frozen=True)
class TrialCost:
    """One trial's counted work."""

    train_flops: float
    eval_flops: float  # the evaluations after training epochs
    tokens_per_sequence: float
    exact: bool  # token counts from the data (else data.max_length: an upper bound)
    original_flops: float = 0.0  # the evaluation before training: once per cell in a sweep (flat_ray.eval.original)

    @property
    def flops(self) -> float:
        return self.train_flops + self.eval_flops + self.original_flops

    def gpu_hours(self, gpu: str, flops: float | None = None) -> float:
        if gpu not in PEAK_TFLOPS:
            raise FlatRayError(f"no peak FLOP/s known for GPU type {gpu}; known: {', '.join(PEAK_TFLOPS)}")
        return (self.flops if flops is None else flops) / (PEAK_TFLOPS[gpu] * 1e12 * MFU) / 3600

    def cell_gpu_hours(self, trials: int, gpu: str, shared_original: bool) -> float:
        """``trials`` trials of a cell; the original evaluated once for all of them where the cell shares it."""
        once = self.original_flops if shared_original else trials * self.original_flops
        return self.gpu_hours(gpu, trials * (self.train_flops + self.eval_flops) + once)


def trial_cost(cfg: RunConfig, params: int, examples: int, tokens: float, exact: bool,
               eval_questions: dict[str, int]) -> TrialCost:
    """The counted FLOPs of one trial of ``cfg``: ``params`` parameters, ``examples`` forget examples of ``tokens``
    tokens per sequence, and ``eval_questions`` questions per evaluation split."""
    from flat_ray.losses import METHODS

    method = METHODS[cfg.method.name]
    knobs = vars(cfg.method)
    # forward 2N, backward 2N for the activations' gradients and 2N for the weights' (none with LoRA, whose
    # frozen base weights get no gradient: 4N); gradient checkpointing recomputes the forward
    per_token = (4 if cfg.model.lora_rank else 6) * params + (2 * params if cfg.model.gradient_checkpointing else 0)
    trained = examples * len(method.splits(knobs)) * tokens * cfg.optim.epochs
    reference = examples * len(method.reference_keys) * tokens * cfg.optim.epochs
    train = trained * per_token + reference * 2 * params
    evals = {0: 0.0, 1: 0.0}  # before training; after epochs
    if cfg.eval.enabled:
        for epoch in range(cfg.optim.epochs + 1):
            if not (epoch in (0, cfg.optim.epochs) or epoch % cfg.eval.every_epochs == 0):
                continue
            interim = cfg.eval.interim_examples if 0 < epoch < cfg.optim.epochs else None
            for split, n in eval_questions.items():
                q = min(n, interim) if interim else n
                scored = q * (2 + PERTURBED.get(split, 0)) * tokens
                generated = q * (tokens + cfg.eval.max_new_tokens)  # the prompt once, then each new token
                evals[min(epoch, 1)] += (scored + generated) * 2 * params
    return TrialCost(train, evals[1], tokens, exact, evals[0])


def estimate(cfg: RunConfig) -> TrialCost | None:
    """One trial's cost from what this machine has: None when the model's size is unknown here."""
    from flat_ray.memory import arch_for

    arch = arch_for(cfg.model.name_or_path)
    if arch is None:
        return None
    rows, questions = _local_rows(cfg)
    examples = len(rows) if rows else KNOWN_SIZES.get((cfg.data.benchmark, cfg.data.split))
    if examples is None:
        return None
    tokens, exact = _mean_tokens(cfg, rows)
    limit = cfg.eval.max_examples
    questions = {k: min(v, limit) if limit else v for k, v in questions.items()}
    return trial_cost(cfg, arch.params, examples, tokens, exact, questions)


def _unknown(cfg: RunConfig) -> str:
    """Why :func:`estimate` has no cost for ``cfg``: the model's size or the forget split's is not known here."""
    from flat_ray.memory import arch_for

    if arch_for(cfg.model.name_or_path) is None:
        return "model size unknown here"
    return "forget-set size unknown here: pass data.data_dir with the benchmark's files"


def _local_rows(cfg: RunConfig) -> tuple[list[dict], dict[str, int]]:
    """The forget split's rows and the evaluation splits' sizes when the data is on this machine (the demo's, or
    ``data.data_dir``), else TOFU's published sizes (nothing is downloaded for an estimate)."""
    if cfg.data.benchmark == "demo" or cfg.data.data_dir:
        from flat_ray.data import load_split
        from flat_ray.eval.suites import suite_for

        rows = load_split(cfg.data.benchmark, cfg.data.split, cfg.data.data_dir)
        try:
            evals = {k: len(v) for k, v in suite_for(cfg).rows(cfg, None).items()}
        except FlatRayError:
            evals = {}
        return rows, evals
    if cfg.data.benchmark == "tofu":
        from flat_ray.eval.runner import eval_split_names

        forget = eval_split_names("tofu", cfg.data.split)["forget"].removesuffix("_perturbed")
        return [], {"forget": KNOWN_SIZES.get(("tofu", forget), 0), **TOFU_EVAL}
    return [], {}


def _mean_tokens(cfg: RunConfig, rows: list[dict]) -> tuple[float, bool]:
    """Mean tokens of a formatted question and its answer, counted with the run's tokenizer where the rows and
    the tokenizer are on this machine; else ``data.max_length`` (an upper bound)."""
    if not rows:
        return float(cfg.data.max_length), False
    try:
        from transformers import AutoTokenizer

        from flat_ray.pipeline import profile_for

        tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.name_or_path, local_files_only=True)
        profile = profile_for(cfg, cfg.model.name_or_path, tok)
    except (OSError, ValueError, FlatRayError):
        return float(cfg.data.max_length), False
    counts = [min(len(tok(profile.prompt(r["question"], tok) + " " + r["answer"])["input_ids"]), cfg.data.max_length)
              for r in rows if "question" in r and "answer" in r]
    return (math.fsum(counts) / len(counts), True) if counts else (float(cfg.data.max_length), False)


def read_prices(path: str, node_types: list) -> dict[str, float]:
    """``--prices FILE``: a YAML mapping of node type to its price per node-hour, checked against the node types."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise FlatRayError(f"--prices {path}: cannot read it ({exc.__class__.__name__}); give a YAML mapping of node "
                           "type to price per node-hour") from None
    names = [n.name for n in node_types]
    if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in raw.values()):
        raise FlatRayError(f"--prices {path}: give a YAML mapping of node type to price per node-hour, e.g. "
                           f"{names[0] if names else 'gpu_node'}: 16.29")
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise FlatRayError(f"--prices {path}: unknown node type {unknown[0]!r}; the cluster's node types: "
                           f"{', '.join(names) or 'none'}")
    return {str(k): float(v) for k, v in raw.items()}


def _gpu_type(cfg: RunConfig, cluster: list | None) -> tuple[Any, str, str]:
    """The node type a cell lands on (None without a cluster file), its GPU type and " (assumed)" when that is
    the default rather than known."""
    from flat_ray.placement import landing

    node = landing(cfg, cluster) if cluster else None
    known = (node.accelerator if node else None) or cfg.launch.accelerator_type
    return node, known or DEFAULT_GPU, "" if known else " (assumed)"


def cost_lines(space, cluster: list | None, prices: dict[str, float] | None) -> list[str]:
    """The dry run's cost block: per cell its trials, GPU type, GPU-hours (and price), then the total."""
    from flat_ray.data import BENCHMARKS

    lines = [f"cost estimate (counted FLOPs at {MFU:.0%} MFU of each GPU type's dense bf16 peak; '<=' where "
             "sequences are counted at data.max_length; docs/sweeps.md, Cost):"]
    total_h, total_usd, unknown, bounded = 0.0, 0.0, False, False
    for cell in space.cells:
        cfg = cell.config
        trials = cell.trials(space.num_samples)
        if not cfg.launch.gpus_per_worker:
            lines.append(f"  cell {cell.name}: CPU trials, no GPU-hours")
            continue
        one = estimate(cfg)
        node, gpu, assumed = _gpu_type(cfg, cluster)
        if one is None or gpu not in PEAK_TFLOPS:
            why = _unknown(cfg) if one is None else f"no peak known for {gpu}"
            lines.append(f"  cell {cell.name}: {trials} trials, ? GPU-hours ({why})")
            unknown = True
            continue
        bound = "" if one.exact else "<= "
        bounded = bounded or not one.exact
        shared = BENCHMARKS[cfg.data.benchmark].evaluation == "tofu"  # per-question values: evaluated once
        hours = one.cell_gpu_hours(trials, gpu, shared)
        total_h += hours
        text = (f"  cell {cell.name}: {trials} trials x {bound}{one.gpu_hours(gpu):.2f} GPU-h on {gpu}{assumed}"
                f"{', the original evaluated once' if shared else ''} = {bound}{hours:.1f} GPU-h "
                f"({one.tokens_per_sequence:.0f} tokens/sequence, training {one.train_flops / one.flops:.0%} of a "
                "trial's FLOPs)")
        if prices is not None and node is not None and node.name in prices:
            usd = hours * prices[node.name] / max(node.resources.get("GPU", 1), 1)
            total_usd += usd
            text += f", {bound}${usd:,.0f} at ${prices[node.name]:g}/h per {node.name} node"
        lines.append(text)
    built: set[str] = set()
    for cell in space.cells:  # retain models built from a recipe (eval.retain_recipe): once per model and split
        cfg = cell.config
        if cfg.eval.reference != "auto" or not cfg.eval.retain_recipe or not cfg.launch.gpus_per_worker:
            continue
        from flat_ray.assets import recipe_retain_config, recipe_retain_path

        key = str(recipe_retain_path(cfg))
        if key in built:
            continue
        built.add(key)
        ft = recipe_retain_config(cfg)
        one = estimate(ft)
        _, gpu, _ = _gpu_type(cfg, cluster)
        if one is None or gpu not in PEAK_TFLOPS:
            lines.append(f"  retain model of cell {cell.name} ({ft.model.name_or_path} on {ft.data.split}): ? GPU-hours")
            unknown = True
            continue
        bound = "" if one.exact else "<= "
        bounded = bounded or not one.exact
        total_h += one.gpu_hours(gpu)
        lines.append(f"  retain model of cell {cell.name} ({ft.model.name_or_path} fine-tuned on {ft.data.split} by "
                     f"{cfg.eval.retain_recipe}, built once): {bound}{one.gpu_hours(gpu):.1f} GPU-h on {gpu}")
    mark = "<= " if bounded else ""
    lines.append(f"  total: {mark}{total_h:.1f} GPU-h" + (f", {mark}${total_usd:,.0f}" if prices else "")
                 + (" (cells marked ? not counted)" if unknown else ""))
    return lines
