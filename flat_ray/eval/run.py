"""`flat-ray eval`: the benchmark's evaluation suite (and optionally lm-eval utility) on one model, logged to
MLflow. Each suite writes its own logs (TOFU-format per-question logs, or ``summary.json``; see
:mod:`flat_ray.eval.suites`). Single process: the model is loaded whole on this machine."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flat_ray import tracking
from flat_ray.assets import (
    FineTune,
    demo_retain_path,
    ensure_demo_retain,
    recipe_retain_config,
    recipe_retain_path,
    resolve_model_path,
    workdir,
)
from flat_ray.config import AUTO_REFERENCE, RunConfig
from flat_ray.errors import FlatRayError
from flat_ray.eval.harness import lm_eval_version, run_lm_eval, task_manager
from flat_ray.eval.open_unlearning import read_logs
from flat_ray.eval.suites import scored, suite_for
from flat_ray.eval.tofu import LOG_FILES, read_reference, read_reference_mia, summarize
from flat_ray.models import load_model_and_tokenizer
from flat_ray.pipeline import profile_for
from flat_ray.preflight import check_inputs

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
ARTIFACT_DIR = "tofu_eval"


@dataclass
class EvalResult:
    summary: dict[str, Any]
    utility: dict[str, dict[str, float]]
    out_dir: Path | None
    run_id: str | None


def resolve_reference(ref: str | None, uri: str) -> tuple[np.ndarray | None, dict[str, Any] | None, str]:
    """Reference truth ratios and membership values (None where its logs have none) from a path (TOFU logs,
    open-unlearning JSON) or an MLflow run id whose ``tofu_eval`` artifacts flat-ray eval wrote."""
    if not ref:
        return None, None, "none"
    if not Path(ref).expanduser().exists() and RUN_ID.match(ref):
        with tempfile.TemporaryDirectory() as tmp:
            local = tracking.download_artifacts(uri, ref, ARTIFACT_DIR, tmp)
            values, _ = read_reference(local)
            mia = read_reference_mia(local)
        return values, mia, f"mlflow-run:{ref}"
    values, source = read_reference(Path(ref).expanduser())
    return values, read_reference_mia(Path(ref).expanduser()), source


def auto_reference_logs(cfg: RunConfig) -> Path:
    """Where ``eval.reference=auto`` keeps the retain model's eval logs for ``cfg``'s evaluation settings."""
    e = cfg.eval
    name = f"eval-{cfg.data.split}-{e.max_examples or 'all'}q-{e.max_new_tokens}t-{cfg.data.max_length}"
    name += "-mia" if cfg.mia() else ""  # with membership inference: the retain model's AUC for PrivLeak
    return demo_retain_path(cfg) / name


def auto_reference(cfg: RunConfig, finetune: FineTune | None) -> RunConfig:
    """``eval.reference=auto``: ``cfg`` with the TOFU-format eval logs of the demo's retain model as its reference.

    The retain model is fine-tuned once with the original's recipe on the forget split's complement (cached by a
    hash of that recipe, like the original), then evaluated once with ``cfg``'s evaluation settings (the same
    questions, prompt and generation length as the runs it is the reference of); both stay cached in the work
    directory, and the evaluation is an MLflow run of its own. Any other ``eval.reference`` is returned as is."""
    if cfg.eval.reference != AUTO_REFERENCE:
        return cfg
    if finetune is None:
        raise FlatRayError("eval.reference=auto needs the demo's retain model, which only a training run, a sweep "
                           "or flat-ray eval builds")
    if cfg.eval.retain_recipe:
        return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, reference=str(recipe_reference(cfg, finetune))))
    model_dir = ensure_demo_retain(cfg, finetune)
    e, logs = cfg.eval, auto_reference_logs(cfg)
    if not (logs / LOG_FILES["forget"]).is_file():
        _, tokenizer = load_model_and_tokenizer(str(model_dir), load_model=False)
        profile = profile_for(cfg, cfg.model.name_or_path, tokenizer)  # the original's prompt, whatever the path
        ref_cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, name_or_path=str(model_dir), profile=profile.name),
            eval=dataclasses.replace(e, reference=None),
            tracking=dataclasses.replace(cfg.tracking, run_name=None))
        tmp = logs.with_name(logs.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        evaluate_model(ref_cfg, max_examples=e.max_examples, out_dir=str(tmp))
        tmp.rename(logs)
    return dataclasses.replace(cfg, eval=dataclasses.replace(e, reference=str(logs)))


def recipe_reference(cfg: RunConfig, finetune: FineTune) -> Path:
    """``eval.retain_recipe``: the retain model fine-tuned once by that recipe on the forget split's complement (a
    Ray Train run, on the cluster), evaluated at its end with ``cfg``'s evaluation settings; returns the folder of
    those per-question logs, cached beside the model."""
    target = recipe_retain_path(cfg)
    logs = target / "reference"
    if (logs / LOG_FILES["forget"]).is_file():
        return logs
    ft = recipe_retain_config(cfg)
    log.info("building the retain model: %s fine-tuned on %s by %s", ft.model.name_or_path, ft.data.split,
             cfg.eval.retain_recipe)
    model_dir = Path(finetune(dataclasses.replace(ft, tracking=dataclasses.replace(ft.tracking,
                                                                                     run_name=target.name))))
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp / "model")
    shutil.copytree(model_dir.parent / "eval_logs" / f"epoch{ft.optim.epochs}", tmp / "reference")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return logs


def eval_device() -> str:
    """Where `flat-ray eval` runs the model: the first GPU where there is one (the suites and lm-eval run it where
    it is), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def eval_dtype(device: str) -> Any:
    """bf16 on a GPU, as TOFU's evaluation loads its models (and an fp32 7B checkpoint fits a 24 GB card); on the
    CPU the checkpoint's own dtype."""
    import torch

    return torch.bfloat16 if device == "cuda" else None


def model_location(cfg: RunConfig, finetune: FineTune | None = None) -> str:
    """A model path or hub id; a `flat-ray train` run directory means its exported ``model/``; the demo's original
    is built with ``finetune`` when it is not cached yet."""
    path = resolve_model_path(cfg, finetune)
    if (Path(path) / "model" / "config.json").is_file():
        return str(Path(path) / "model")
    return path


def evaluate_model(cfg: RunConfig, *, reference: str | None = None, tasks: list[str] | None = None,
                   tasks_include: str | None = None, limit: int | None = None, max_examples: int | None = None,
                   out_dir: str | None = None, run_id: str | None = None,
                   finetune: FineTune | None = None) -> EvalResult:
    """Evaluate one model (``finetune`` builds the demo's original, and with ``eval.reference=auto`` its retain
    model, if they are asked for and not cached yet)."""
    if (reference or cfg.eval.reference) == AUTO_REFERENCE:  # the retain model, on this evaluation's questions
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, reference=AUTO_REFERENCE,
                                                                max_examples=max_examples or cfg.eval.max_examples))
        check_inputs(cfg)
        reference = None
    cfg = auto_reference(cfg, finetune)
    uri = cfg.tracking.mlflow_uri or tracking.default_uri(workdir(cfg))
    # everything a user can get wrong, before the model is loaded or anything is written
    suite = suite_for(cfg)
    rows = suite.rows(cfg, max_examples)
    tracking.check_reachable(uri)
    ref_tr, ref_mia, ref_source = resolve_reference(reference or cfg.eval.reference, uri)
    if run_id:
        tracking.run_data_or_error(uri, run_id)
    manager = task_manager(tasks, tasks_include) if tasks else None
    path = model_location(cfg, finetune)
    device = eval_device()
    model, tokenizer = load_model_and_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code,
                                                revision=cfg.model.revision, tokenizer=cfg.model.tokenizer,
                                                dtype=eval_dtype(device))
    model.to(device)
    profile = profile_for(cfg, cfg.model.name_or_path, tokenizer)
    utility = run_lm_eval(model, tokenizer, tasks, include_path=tasks_include, limit=limit,
                          batch_size=cfg.eval.batch_size, device=device, manager=manager) if tasks else {}
    out = Path(out_dir) if out_dir else workdir(cfg) / "evals" / f"{Path(path).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    meta = {"model": cfg.model.name_or_path, "model_path": path, "benchmark": cfg.data.benchmark,
            "split": cfg.data.split, "questions": {k: scored(v) for k, v in rows.items()},
            "forget_quality_reference": ref_source, "lm_eval": utility,
            "lm_eval_version": lm_eval_version() if tasks else None}
    summary = {**suite.report(model, tokenizer, profile, rows, cfg, out, meta, device=device, reference_tr=ref_tr,
                              reference_mia=ref_mia),
               "forget_quality_reference": ref_source}

    if run_id:
        tracker = tracking.Tracker(uri, run_id)
    else:
        tracker = tracking.start_run(uri, cfg.tracking.experiment, f"eval-{Path(path).name}",
                                     workdir(cfg) / "mlartifacts",
                                     {"kind": "eval", "model": cfg.model.name_or_path,
                                      "benchmark": f"{cfg.data.benchmark}/{cfg.data.split}"})
        tracker.log_params({"eval.model": cfg.model.name_or_path, "eval.benchmark": cfg.data.benchmark,
                            "eval.split": cfg.data.split, "eval.truth_ratio": cfg.eval.truth_ratio,
                            "eval.max_new_tokens": cfg.eval.max_new_tokens, "eval.tasks": ",".join(tasks or []),
                            "version.lm_eval": lm_eval_version(), "resolved.git_sha": tracking.git_sha() or "unknown"})
    prefix = suite.prefix or cfg.data.benchmark
    metrics = {f"{prefix}/{k}": v for k, v in summary.items() if isinstance(v, float)}
    metrics.update({f"lm_eval/{t}/{m}": v for t, ms in utility.items() for m, v in ms.items()})
    tracker.log_metrics(metrics, step=0)
    tracker.set_tags({"forget_quality_reference": ref_source, "truth_ratio_variant": cfg.eval.truth_ratio})
    tracker.log_artifact(out, ARTIFACT_DIR)
    if not run_id:
        tracker.finish("FINISHED")
    return EvalResult(summary, utility, out, tracker.run_id)


def summary_from_logs(logs: str, reference: str | None, truth_ratio: str) -> dict[str, Any]:
    """Recompute the TOFU summary from a directory of TOFU-format eval logs (published, or flat-ray's)."""
    ref_tr, source = read_reference(Path(reference)) if reference else (None, "none")
    summary = summarize(read_logs(logs), truth_ratio=truth_ratio, reference_tr=ref_tr,
                        reference_mia=read_reference_mia(Path(reference)) if reference else None)
    summary["forget_quality_reference"] = source
    return summary
