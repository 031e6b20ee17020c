"""Run configuration: dataclasses with documented fields, YAML loading, ``key=value`` overrides, validation.

Everything that changes a result is a field here. A config is validated when it
is loaded, so an unknown key or an impossible value fails before any model is touched:

>>> cfg = load_config(None, ["optim.lr=2e-5", "method.divergence=js"])
>>> cfg.optim.lr, cfg.method.divergence
(2e-05, 'jensen_shannon')
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flat_ray.data import BENCHMARKS, TEMPLATE_SOURCES
from flat_ray.errors import FlatRayError
from flat_ray.losses import DIVERGENCES, METHODS, NORMALIZATIONS
from flat_ray.metrics import METRICS
from flat_ray.models import AUTO_PROFILE, DEMO_ORIGINAL, PROFILES, TINY
from flat_ray.ratios import DEFAULT_TRUTH_RATIO, TRUTH_RATIOS
from flat_ray.schedule import DECAYS

EXPORTS = ("last", "best", "none")
PLACEMENT_STRATEGIES = ("auto", "PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


def doc(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best in the field declarations
    return field(default=default, metadata={"help": help})


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FlatRayError(f"{key}={value!r} is not valid.{hint} Valid choices: {', '.join(map(str, choices))}")


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise FlatRayError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class ModelConfig:
    name_or_path: str = doc(TINY, f"Hub id or local directory of the model. '{TINY}' builds a random-init Llama-style "
                                  "model with a tokenizer trained on the demo text; "
                                  f"'{DEMO_ORIGINAL}' is that model fine-tuned on all demo authors and the "
                                  "background split (the demo's original model). Both are cached under paths.workdir.")
    profile: str = doc(AUTO_PROFILE, "Prompt format: 'auto' (by model name, then the tokenizer's chat template, "
                                     f"then generic) or one of: {PROFILES.choices()}.")
    trust_remote_code: bool = doc(False, "Allow model code from the hub to run. Off unless you trust the source.")
    revision: str | None = doc(None, "Hub revision (branch, tag or commit) to pin; null for the default branch.")
    tokenizer: str | None = doc(None, "Hub id or local directory to load the tokenizer from, when it is not the "
                                      "model's own (TOFU loads it from the base model, e.g. microsoft/phi-1_5 for "
                                      "locuslab/tofu_ft_phi-1.5, which ships no tokenizer files); null: the model's. "
                                      "model.revision applies to the model only.")
    gradient_checkpointing: bool = doc(False, "Recompute each layer's activations in the backward pass instead of "
                                              "keeping them: far less activation memory for about a third more "
                                              "compute (see the memory plan of --dry-run).")
    lora_rank: int = doc(0, "LoRA (through PEFT): the rank of the low-rank adapters trained in place of the weights; "
                            "0 trains every weight. With LoRA the base weights stay frozen, checkpoints hold the "
                            "adapter and its optimizer state, and NPO's/DPO's reference is the model with its adapter "
                            "switched off (no second model). TOFU's forget_lora config uses 8.")
    lora_alpha: float = doc(32.0, "LoRA scaling numerator: the adapter's update is multiplied by "
                                  "lora_alpha / lora_rank (TOFU: 32).")
    lora_dropout: float = doc(0.05, "Dropout on the adapters' input during training (TOFU: 0.05).")
    trainable: str | None = doc(None, "A regular expression: only the parameters whose full names match it train, the "
                                      "rest stay frozen (open-unlearning's trainable_params_regex; WMDP's RMU "
                                      "trains model\\.layers\\.[5-7]\\.mlp\\.down_proj\\.weight); null: every "
                                      "parameter. Not with LoRA.")
    lora_target_modules: str = doc("all-linear", "Comma-separated names of the linear modules that get adapters "
                                                 "(e.g. q_proj,v_proj), or 'all-linear': every linear layer but "
                                                 "the output head, as TOFU's LoRA runs do.")

    def __post_init__(self):
        if self.lora_rank < 0:
            raise FlatRayError(f"model.lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        _positive("model.lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise FlatRayError(f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules.strip(" ,"):
            raise FlatRayError("model.lora_target_modules must name at least one module, or be 'all-linear'")
        if not self.name_or_path:
            raise FlatRayError("model.name_or_path must not be empty; give a hub id, a local directory or 'tiny'")
        if self.tokenizer == "":
            raise FlatRayError("model.tokenizer must not be empty; give a hub id or a local directory, or null for "
                               "the model's own")
        if self.trainable is not None:
            try:
                re.compile(self.trainable)
            except re.error as exc:
                raise FlatRayError(f"model.trainable is not a regular expression ({exc}): {self.trainable!r}") from None
            if self.lora_rank:
                raise FlatRayError("model.trainable and LoRA (model.lora_rank > 0) both choose what trains; set one "
                                   "of them (model.trainable=null or model.lora_rank=0)")
        if self.profile != AUTO_PROFILE:
            try:
                self.profile = PROFILES.canonical(self.profile)
            except FlatRayError as exc:
                raise FlatRayError(f"model.profile: {exc} (or 'auto')") from None


@dataclass
class DataConfig:
    benchmark: str = doc("demo", f"Benchmark registry key: {BENCHMARKS.choices()}.")
    split: str | None = doc(None, "Forget split, e.g. forget01/forget05/forget10 for TOFU; null means the "
                                  "benchmark's default (demo: forget10, tofu: forget01).")
    data_dir: str | None = doc(None, "Local directory with the benchmark's files ({split}.json or .jsonl) instead "
                                     "of the hub; needed offline.")
    template_source: str = doc("builtin", f"Where template answers come from: {TEMPLATE_SOURCES.choices()}.")
    template_file: str | None = doc(None, "Template file for template_source=file: JSONL with a 'text' field, or "
                                          "a one-column CSV.")
    template_column: str | None = doc(None, "Forget-data column holding each example's template answer, for "
                                            "template_source=column.")
    max_length: int = doc(256, "Maximum tokens per sequence (prompt + answer + EOS); longer answers are cut.")
    chunk_tokens: int = doc(512, "Text benchmarks (muse_news, hp): the text is cut into chunks of this many "
                                 "tokens for training.")
    prompt_fraction: float = doc(0.5, "Text benchmarks: the first fraction of each chunk's tokens is the prompt; "
                                      "the rest is the continuation to forget (FLAT pairs it with a template). 0: "
                                      "no prompt, every token is forgotten (as MUSE's baselines train).")

    def __post_init__(self):
        try:
            self.benchmark = BENCHMARKS.canonical(self.benchmark)
        except FlatRayError as exc:
            raise FlatRayError(f"data.benchmark: {exc}") from None
        bench = BENCHMARKS[self.benchmark]
        if self.split is None:
            self.split = bench.default_split
        elif self.data_dir is None:
            _choice("data.split", self.split, bench.splits)
        _choice("data.template_source", self.template_source, TEMPLATE_SOURCES.keys())
        if self.template_source == "file" and not self.template_file:
            raise FlatRayError("data.template_source=file needs data.template_file=PATH (.jsonl, .txt or .csv)")
        if self.template_source == "column" and not self.template_column:
            raise FlatRayError("data.template_source=column needs data.template_column=NAME")
        if self.max_length < 8:
            raise FlatRayError(f"data.max_length must be >= 8, got {self.max_length}")
        if self.chunk_tokens < 16:
            raise FlatRayError(f"data.chunk_tokens must be >= 16, got {self.chunk_tokens}")
        if not 0 <= self.prompt_fraction < 1:
            raise FlatRayError(f"data.prompt_fraction must be in [0, 1), got {self.prompt_fraction}")


@dataclass
class MethodConfig:
    name: str = doc("flat", f"Unlearning method registry key: {METHODS.choices()}.")
    divergence: str = doc("total_variation", "FLAT f-divergence (canonical key or alias such as tv, js, KL, "
                                             f"Total-Variation): {DIVERGENCES.choices()}.")
    normalize: str = doc("paper", "Score normalisation: 'paper' (per-sample mean answer-token probability) or "
                                  "'repo' (released code: batches padded to data.max_length T, sum / B*(T-1); parity "
                                  "studies only).")
    beta: float = doc(0.1, "Inverse temperature of NPO and DPO (0.1 in the NPO paper and the FLAT comparisons).")
    simnpo_beta: float = doc(2.5, "SimNPO's beta (2.5, the SimNPO paper's TOFU setting).")
    gamma: float = doc(0.0, "SimNPO's reward margin gamma, as in the SimNPO paper: -(2/beta) log sigmoid(-beta "
                            "logp/|y| - gamma); equals simnpo_beta * delta of the SimNPO code and open-unlearning "
                            "(0 on TOFU).")
    retain_weight: float | None = doc(None, "Weight of the retain cross-entropy term of grad_diff, idk, npo, dpo, "
                                            "simnpo, wga, satimp, undial and rmu (open-unlearning's alpha; rmu's is "
                                            "an activation distance); null means the method's default, "
                                            "open-unlearning's: 1, and 0 for undial. 0 gives "
                                            "the forget-only forms and needs no retain data.")
    forget_weight: float | None = doc(None, "Weight of the forget term of wga, satimp, undial and rmu (open-unlearning's "
                                            "gamma); null means the method's default: 1, and 0.1 for satimp.")
    wga_beta: float = doc(1.0, "WGA's exponent: each forget token's ascent is weighted by p^wga_beta.")
    satimp_beta1: float = doc(5.0, "SatImp's saturation exponent: forget-token weight p^beta1 (1-p)^beta2.")
    satimp_beta2: float = doc(1.0, "SatImp's importance exponent: forget-token weight p^beta1 (1-p)^beta2.")
    undial_beta: float = doc(10.0, "UNDIAL's strength: how far the gold token's logit is lowered in the "
                                   "reference's distribution the model is distilled towards.")
    ceu_ignore_first: int = doc(1, "CE-U: the first answer tokens of each forget example left out of the loss.")
    rmu_layer: int = doc(7, "RMU: the decoder layer (0-based) whose output is steered (open-unlearning's "
                            "model.layers.7; a model has num_hidden_layers of them).")
    steering_coeff: float = doc(2.0, "RMU: the norm of the random control vector the forget activations are pushed "
                                     "towards (open-unlearning's default 2; WMDP's zephyr setting 6.5).")
    retain_split: str | None = doc(None, "Retain split sampled alongside forget batches by methods with a retain "
                                         "term (grad_diff, idk, npo, dpo, simnpo, wga, satimp, undial; none at "
                                         "retain_weight=0); null "
                                         "means the benchmark's complement of data.split (e.g. forget10 -> "
                                         "retain90).")

    def __post_init__(self):
        for key, registry in (("name", METHODS), ("divergence", DIVERGENCES), ("normalize", NORMALIZATIONS)):
            try:
                setattr(self, key, registry.canonical(getattr(self, key)))
            except FlatRayError as exc:
                raise FlatRayError(f"method.{key}: {exc}") from None
        for key, value in METHODS[self.name].defaults:  # the method's own default for a knob left null
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.retain_weight = 1.0 if self.retain_weight is None else self.retain_weight
        self.forget_weight = 1.0 if self.forget_weight is None else self.forget_weight
        _positive("method.beta", self.beta)
        _positive("method.simnpo_beta", self.simnpo_beta)
        _positive("method.undial_beta", self.undial_beta)
        _positive("method.steering_coeff", self.steering_coeff)
        _positive("method.rmu_layer", self.rmu_layer, allow_zero=True)
        for key in ("retain_weight", "forget_weight", "wga_beta", "satimp_beta1", "satimp_beta2", "ceu_ignore_first"):
            _positive(f"method.{key}", getattr(self, key), allow_zero=True)


SCHEDULES = tuple(DECAYS)  # the schedule module's decay table is the one list of names


@dataclass
class OptimConfig:
    lr: float = doc(1e-5, "Peak learning rate of AdamW.")
    epochs: int = doc(5, "Passes over the forget set.")
    micro_batch_size: int = doc(4, "Forget examples per worker per forward pass (each brings its template too).")
    grad_accum_steps: int = doc(1, "Micro-batches accumulated per optimizer step; effective batch = "
                                   "micro_batch_size * grad_accum_steps * workers.")
    weight_decay: float = doc(0.01, "AdamW weight decay.")
    warmup_ratio: float = doc(0.2, "Fraction of optimizer steps spent in linear warm-up (0.2 of 5 epochs = 1 epoch, "
                                   "as in the paper's recipe).")
    schedule: str = doc("linear", f"Learning-rate decay after warm-up: {', '.join(SCHEDULES)}.")
    max_grad_norm: float = doc(1.0, "Gradient clipping norm; 0 disables clipping.")
    seed: int = doc(42, "Seed for model init, data order and template assignment.")

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        for key in ("epochs", "micro_batch_size", "grad_accum_steps"):
            if getattr(self, key) < 1:
                raise FlatRayError(f"optim.{key} must be >= 1, got {getattr(self, key)}")
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.max_grad_norm", self.max_grad_norm, allow_zero=True)
        if not 0 <= self.warmup_ratio < 1:
            raise FlatRayError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _choice("optim.schedule", self.schedule, SCHEDULES)
        if self.seed < 0:
            raise FlatRayError(f"optim.seed must be >= 0, got {self.seed}")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class DeepSpeedConfig:
    stage: int = doc(3, "ZeRO stage: 0, 1, 2 or 3 (3 shards parameters; the paper's runs use 3).")
    offload_optimizer: bool = doc(False, "Keep optimizer states in CPU memory (ZeRO 1-3).")
    offload_params: bool = doc(False, "Keep parameters in CPU memory (ZeRO-3 only).")
    precision: str = doc("auto", f"{', '.join(PRECISIONS)}; auto = bf16 on GPU, fp32 on CPU.")
    compile: bool = doc(False, "Compile the model for training with torch.compile through DeepSpeed's "
                               "engine.compile() (the first steps pay for the compilation); evaluation runs eager.")

    def __post_init__(self):
        _choice("deepspeed.stage", self.stage, (0, 1, 2, 3))
        _choice("deepspeed.precision", self.precision, PRECISIONS)
        if self.offload_params and self.stage != 3:
            raise FlatRayError(f"deepspeed.offload_params needs deepspeed.stage=3, got stage {self.stage}")
        if self.offload_optimizer and self.stage == 0:
            raise FlatRayError("deepspeed.offload_optimizer needs deepspeed.stage >= 1")


@dataclass
class EvalConfig:
    enabled: bool = doc(True, "Evaluate the TOFU-style splits (forget, retain, real authors, world facts) before "
                              "training and after every eval.every_epochs epochs.")
    every_epochs: int = doc(1, "Evaluate every N epochs (always before training and after the last epoch).")
    max_examples: int = doc(32, "Questions per split in per-epoch evaluation (a bounded subset).")
    interim_examples: int | None = doc(None, "Questions per split in the evaluations between the first (before "
                                             "training) and the last: a cheaper check for the curves and a "
                                             "scheduler's early stop; null uses eval.max_examples throughout.")
    max_new_tokens: int = doc(32, "Greedy generation length for ROUGE.")
    batch_size: int = doc(8, "Evaluation batch size per worker.")
    truth_ratio: str = doc(DEFAULT_TRUTH_RATIO, "Truth-ratio variant for the per-split statistic and model utility: "
                                                f"{TRUTH_RATIOS.choices()} (arithmetic reproduces TOFU's published "
                                                "numbers).")
    prompt_words: int = doc(200, "hp completion test: words of each passage given as the prompt (a passage of "
                                 "no more words: its first half).")
    completion_file: str | None = doc(None, "hp: FLAT's own completion rows (a JSONL of prompt and response: "
                                            "data/hp/hp_train_qa_200.jsonl or hp_test_qa_200.jsonl of a clone of "
                                            "UCSC-REAL/FLAT) for the forget side of the completion test, scored as "
                                            "FLAT's evaluate.py scores them (docs/eval.md); null: the forget "
                                            "passages, cut at eval.prompt_words.")
    privleak_auc_retrain: float = doc(0.4772, "MUSE PrivLeak: the retrained model's forget-vs-holdout AUC (MUSE's "
                                              "published News value; `flat-ray eval` of a retain model prints "
                                              "its privleak_auc).")
    mia: bool | None = doc(None, "TOFU-style benchmarks: membership inference (LOSS, ZLib, Min-K%, Min-K%++ AUCs of "
                                 "the forget questions against held-out ones), privleak and the memorization "
                                 "metrics (extraction strength, exact memorization) at each evaluation, as "
                                 "open-unlearning computes them. Null: where the benchmark has holdout splits "
                                 "(tofu, demo); true: required.")
    mia_gradnorm: bool = doc(False, "Also the GradNorm attack (mia_gradnorm): one backward pass per forget and "
                                    "held-out question, so off by default as in open-unlearning's evaluations; "
                                    "needs the model's full weights (none where ZeRO-3 evaluates from the shards).")
    forget_tasks: str | None = doc(None, "wmdp: the lm-eval tasks whose accuracy measures forgetting, comma-separated; "
                                         "null: WMDP's own for the split (wmdp_bio or wmdp_cyber).")
    utility_tasks: str | None = doc(None, "wmdp: the lm-eval tasks whose accuracy measures utility, comma-separated; "
                                          "null: mmlu.")
    tasks_include: str | None = doc(None, "wmdp: a folder of local lm-eval task YAML files (tasks with local data), "
                                          "searched besides the tasks lm-eval ships.")
    gathered: bool = doc(True, "Under ZeRO-3, evaluate from a full copy of the model gathered once per evaluation "
                               "(when each rank has room for it) instead of gathering every layer again at every "
                               "forward and generated token; false keeps only the shards (less memory, slower).")
    save_logs: bool = doc(False, "TOFU-style benchmarks: each evaluation of a training run also writes its "
                                 "per-question results, in TOFU's eval-log layout and as open-unlearning's "
                                 "TOFU_EVAL.json / TOFU_SUMMARY.json, to <output_dir>/eval_logs/epoch<N> and to the "
                                 "run's MLflow artifacts (eval_logs/epoch<N>); either can be another run's "
                                 "eval.reference. `flat-ray eval` always writes both.")
    retain_recipe: str | None = doc(None, "With eval.reference=auto for a model other than the demo: the "
                                          "fine-tuning recipe that made the original, as a `flat-ray finetune` "
                                          "config file (its model.name_or_path the base model; epochs, lr, batch, "
                                          "weight decay) or a shipped one (tofu_finetune_llama2-7b, "
                                          "tofu_finetune_phi-1.5: TOFU's). The retain model is that recipe run on "
                                          "the forget split's complement (retain90/95/99), built once and cached "
                                          "by the recipe's hash.")
    reference: str | None = doc(None, "Forget-quality reference: a directory or file of TOFU-format eval logs "
                                      "(eval_log_forget.json; flat-ray eval writes them), open-unlearning's "
                                      "TOFU_EVAL.json (or a directory holding it), or 'auto' (model.name_or_path=demo: the demo's retain model, "
                                      "fine-tuned like the original on the forget split's complement, built and "
                                      "evaluated once, cached). Null: no forget quality.")

    def __post_init__(self):
        if not 0 < self.privleak_auc_retrain < 1:
            raise FlatRayError(f"eval.privleak_auc_retrain must be in (0, 1), got {self.privleak_auc_retrain}")
        for key in ("every_epochs", "max_examples", "max_new_tokens", "batch_size", "prompt_words", "interim_examples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise FlatRayError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        _choice("eval.truth_ratio", self.truth_ratio, TRUTH_RATIOS.keys())


@dataclass
class TrackingConfig:
    mlflow_uri: str | None = doc(None, "MLflow tracking URI; null means sqlite:///<paths.workdir>/mlflow.db.")
    experiment: str = doc("flat-ray", "MLflow experiment name.")
    run_name: str | None = doc(None, "Run name (MLflow and Ray); null derives one from method, divergence, lr "
                                     "and the start time.")
    log_model_max_mb: float = doc(1024.0, "Upload an exported model directory as an MLflow artifact when it is at "
                                          "most this many MiB; a larger one is left where it is and only its path is "
                                          "logged (the model_dir tag). 0 never uploads.")

    def __post_init__(self):
        if not self.experiment:
            raise FlatRayError("tracking.experiment must not be empty")
        _positive("tracking.log_model_max_mb", self.log_model_max_mb, allow_zero=True)


@dataclass
class LaunchConfig:
    num_workers: int = doc(2, "Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = doc(0.99, "CPUs reserved per worker; just under 1 so that 2 workers fit on a 2-CPU "
                                       "machine next to Ray's own actors.")
    gpus_per_worker: float = doc(0.0, "GPUs per worker; > 0 trains on GPUs (NCCL), 0 on CPUs (gloo).")
    accelerator_type: str | None = doc(None, "Run the workers only on nodes with this accelerator (Ray's "
                                             "accelerator_type resource, e.g. A10G, A100, H100, L4, T4: what AWS "
                                             "nodes advertise); null: any node with the resources.")
    placement_strategy: str = doc("auto", "How a run's workers are placed on nodes (Ray placement-group "
                                          f"strategy): {', '.join(PLACEMENT_STRATEGIES)}. 'auto' is STRICT_PACK "
                                          "for runs with several GPU workers (all ranks on one node: ZeRO-3's "
                                          "all-gathers never cross the network) and PACK otherwise.")
    address: str | None = doc(None, "Ray cluster to join (e.g. 'auto', HOST:6379 or ray://host:10001); null: "
                                    "RAY_ADDRESS where set (as in a `ray job submit` entrypoint), else a Ray of the "
                                    "run's own sized to this machine, even where another Ray runs there.")
    storage_path: str | None = doc(None, "Where Ray Train keeps checkpoints; null means <workdir>/ray_results. Use "
                                         "shared storage (NFS, s3://) on a multi-node cluster.")
    max_failures: int = doc(2, "How often a run restarts its workers from the last checkpoint after a worker or node "
                               "is lost (a spot node reclaimed, a process killed); 0 fails at the first loss. A "
                               "diverged run never restarts.")
    checkpoint_every_epochs: int = doc(1, "Checkpoint after every N-th epoch (and always after the last). A lost "
                                          "worker or a killed run resumes from the last checkpoint, so larger N "
                                          "writes less and repeats more after a failure.")
    keep_checkpoints: int = doc(0, "Checkpoints left in the storage path once the run has finished: 0 deletes them "
                                   "after the model is exported (a finished run is never resumed; at 7B each one "
                                   "holds about 88 GiB of weights and Adam state), N keeps the last N. While "
                                   "the run goes, Ray Train keeps the last max(1, N), and the best as well "
                                   "when launch.checkpoint_metric is set.")
    checkpoint_metric: str | None = doc(None, "Evaluation metric that ranks a run's checkpoints (its direction from "
                                              "the metric registry): Ray Train keeps the best ones next to the latest, "
                                              "and `flat-ray export --epoch best` and launch.export=best take the "
                                              "best. Null: the last epoch is the best. Sweeps set their objective.")
    export: str = doc("last", "The model a finished run writes to <output_dir>/model: 'last' (the workers export the "
                              "final weights), 'best' (the best checkpoint by launch.checkpoint_metric, consolidated "
                              "on the driver) or 'none' (checkpoints are kept instead; `flat-ray export` writes one "
                              "later).")

    def __post_init__(self):
        if self.checkpoint_every_epochs < 1:
            raise FlatRayError(f"launch.checkpoint_every_epochs must be >= 1, got {self.checkpoint_every_epochs}")
        if self.num_workers < 1:
            raise FlatRayError(f"launch.num_workers must be >= 1, got {self.num_workers}")
        if self.max_failures < 0:
            raise FlatRayError(f"launch.max_failures must be >= 0, got {self.max_failures}")
        if self.keep_checkpoints < 0:
            raise FlatRayError(f"launch.keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        _choice("launch.export", self.export, EXPORTS)
        _choice("launch.placement_strategy", self.placement_strategy, PLACEMENT_STRATEGIES)
        if self.accelerator_type is not None and not self.accelerator_type.strip():
            raise FlatRayError("launch.accelerator_type must not be empty; give a type such as A10G, or null")
        if self.checkpoint_metric is not None:
            _choice("launch.checkpoint_metric", self.checkpoint_metric, sorted(METRICS))
        if self.export == "best" and self.checkpoint_metric is None:
            raise FlatRayError("launch.export=best needs launch.checkpoint_metric (e.g. forget_prob) to tell which "
                               "epoch is best")
        _positive("launch.cpus_per_worker", self.cpus_per_worker)
        _positive("launch.gpus_per_worker", self.gpus_per_worker, allow_zero=True)

    def strategy(self) -> str:
        """The placement strategy in force: 'auto' resolved."""
        if self.placement_strategy != "auto":
            return self.placement_strategy
        return "STRICT_PACK" if self.num_workers > 1 and self.gpus_per_worker > 0 else "PACK"


@dataclass
class PathsConfig:
    workdir: str = doc("flat_ray_work", "Working directory for caches (tiny/original models), the default MLflow "
                                        "store and outputs; relative paths are relative to the current directory.")
    output_dir: str | None = doc(None, "Where checkpoints and the final model go; null means <workdir>/runs/<run>.")


@dataclass
class RunConfig:
    """One unlearning run."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The model to unlearn."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Benchmark, split and template answers."})
    method: MethodConfig = field(default_factory=MethodConfig, metadata={"help": "Unlearning method and its knobs."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimisation and seed."})
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, metadata={"help": "DeepSpeed engine."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Per-epoch evaluation."})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"help": "MLflow tracking."})
    launch: LaunchConfig = field(default_factory=LaunchConfig, metadata={"help": "Ray cluster and workers."})
    paths: PathsConfig = field(default_factory=PathsConfig, metadata={"help": "Files and directories."})

    def __post_init__(self):
        if "retain" in METHODS[self.method.name].splits(vars(self.method)):
            retain = self.retain_split()
            if retain is None:
                raise FlatRayError(f"method {self.method.name} needs retain data but benchmark {self.data.benchmark} has "
                                   f"no retain split for {self.data.split!r}; set method.retain_split (or "
                                   "method.retain_weight=0 for the forget-only form)")
            if self.data.data_dir is None:
                _choice("method.retain_split", retain, BENCHMARKS[self.data.benchmark].splits)
        have = ", ".join(k for k in BENCHMARKS if BENCHMARKS[k].holdout_of)  # benchmarks with held-out questions
        if self.eval.mia and not BENCHMARKS[self.data.benchmark].holdout_of:
            raise FlatRayError(f"eval.mia=true needs held-out questions, and benchmark {self.data.benchmark} has no "
                               f"holdout split (benchmarks with one: {have}); set eval.mia=false")
        if self.eval.mia_gradnorm and not self.mia():
            raise FlatRayError(f"eval.mia_gradnorm=true needs the membership metrics: eval.mia not false, on a "
                               f"benchmark with holdout splits ({have}; here {self.data.benchmark}); set "
                               "eval.mia_gradnorm=false")

    def mia(self) -> bool:
        """Whether evaluations compute the membership-inference and memorization metrics."""
        return self.eval.mia is not False and bool(BENCHMARKS[self.data.benchmark].holdout_of)

    def retain_split(self) -> str | None:
        """The retain split methods such as grad_diff sample from, or None when there is none."""
        return self.method.retain_split or BENCHMARKS[self.data.benchmark].retain_of.get(self.data.split)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"optim.lr": 1e-05, ...}``: every field under its dotted key (MLflow params, tables)."""
        return _flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -------------------------------------------------------------------------------------------------- building
def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key(key: str) -> FlatRayError:
    keys = all_keys()
    sections = list(dict.fromkeys(k.split(".")[0] for k in keys))
    # a misspelt section ("optimizer" for "optim"), else the closest dotted key
    close = ("." not in key and difflib.get_close_matches(key, sections, n=1, cutoff=0.6)) or \
        difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # a known leaf under the wrong section, e.g. "lr" for "optim.lr"
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
    section = key.split(".")[0]
    in_section = [k for k in keys if k.startswith(section + ".")]
    listing = f"; keys in {section}: {', '.join(in_section)}" if in_section else f"; sections: {', '.join(sections)}"
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return FlatRayError(f"unknown config key {key!r}{hint}{listing}")


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return getattr(base, "__name__", str(base)) + (" or null" if args else "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    optional = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    if optional:
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise FlatRayError(f"{key} must be {_type_name(tp if not optional else tp | None)}, got {value!r}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        where = f"section {prefix[:-1]!r}" if prefix else "the config"
        raise FlatRayError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(dotted)
        tp = hints[key]
        kwargs[key] = _build(tp, value, dotted + ".") if dataclasses.is_dataclass(tp) else _coerce(dotted, value, tp)
    return cls(**kwargs)


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=1e-5"`` -> ``("optim.lr", 1e-05)``; the value is read as YAML (so ``null``, ``true``, ``3``)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FlatRayError(f"override {item!r} must look like section.key=value, e.g. optim.lr=1e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):
        raise FlatRayError(f"override {item!r}: value must be a scalar, got a {type(value).__name__}")
    return key, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides. Changing ``data.benchmark`` to another one without ``data.split`` drops the
    split the base config had (a TOFU split means nothing to MUSE), so the new benchmark's default applies."""
    known = set(all_keys())
    parsed = [parse_override(item) for item in overrides]
    values = dict(parsed)
    base = data.get("data") if isinstance(data.get("data"), dict) else {}
    if "data.benchmark" in values and "data.split" not in values and base.get("benchmark") != values["data.benchmark"]:
        base.pop("split", None)
    for key, value in parsed:
        if key not in known:
            raise _unknown_key(key)
        section, leaf = key.split(".", 1)
        node = data.setdefault(section, {})
        if not isinstance(node, dict):
            raise FlatRayError(f"section {section!r} must be a mapping of keys to values")
        node[leaf] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        hint = f"; an override needs a value: {path}=VALUE" if str(path) in all_keys() else ""
        raise FlatRayError(f"config file {str(path)!r} does not exist{hint}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "parse error"
        raise FlatRayError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FlatRayError(f"config file {str(path)!r} must hold a mapping of sections (model, data, method, ...), got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


PRESETS = ("demo", "finetune", "demo_finetune", "tofu_finetune_llama2-7b", "tofu_finetune_phi-1.5")
# eval.retain_recipe may name one of these instead of a file
RECIPES = ("tofu_finetune_llama2-7b", "tofu_finetune_phi-1.5")


def preset(name: str) -> dict[str, Any]:
    """A packaged partial config from ``flat_ray/presets/{name}.yaml``."""
    from importlib.resources import files

    _choice("preset", name, PRESETS)
    return yaml.safe_load(files("flat_ray.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")) or {}


# eval.reference=auto: the demo's retain model, built and evaluated by the driver (flat_ray.eval.run.auto_reference)
AUTO_REFERENCE = "auto"


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), presets: Sequence[str] = ()) -> RunConfig:
    """Defaults <- presets (in order) <- YAML file (optional) <- ``key=value`` overrides, validated (values only:
    the files a config names are checked where a run or sweep enters, :func:`flat_ray.preflight.check_inputs`)."""
    data: dict[str, Any] = {}
    for name in presets:
        data = _merge(data, preset(name))
    if path is not None:
        data = _merge(data, read_yaml(path))
    return _build(RunConfig, apply_overrides(data, overrides))


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Rebuild (and re-validate) a config from :meth:`RunConfig.to_dict` output, e.g. inside a Ray worker."""
    return _build(RunConfig, dict(data))


def reference_markdown() -> str:
    """The config reference (docs/config.md), generated from the field help texts."""
    lines = ["# Configuration reference", "",
             "Generated from `flat_ray/config.py` (`python -m flat_ray.config > docs/config.md`). Every key can be set",
             "in a YAML file (`section: {key: value}`) or on the command line as `section.key=value`.", ""]
    hints = typing.get_type_hints(RunConfig)
    for section in dataclasses.fields(RunConfig):
        cls = hints[section.name]
        lines += [f"## `{section.name}`: {section.metadata['help']}", "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        sub = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = "null" if f.default is None else yaml.safe_dump(f.default).strip().removesuffix("...").strip()
            lines.append(f"| `{section.name}.{f.name}` | {_type_name(sub[f.name])} | `{default}` | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.stdout.write(reference_markdown())
