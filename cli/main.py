"""``flat-ray``: parse, validate, call flat_ray. Heavy imports happen inside the commands so --help is fast.

User mistakes (:class:`flat_ray.errors.FlatRayError`) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import click

from flat_ray.ratios import DEFAULT_TRUTH_RATIO, TRUTH_RATIOS


def _split_args(args: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] [key=value ...]`` -> (config path or None, overrides)."""
    from flat_ray.errors import FlatRayError

    paths = [a for a in args if "=" not in a]
    if len(paths) > 1:
        raise FlatRayError(f"give at most one config file, got {len(paths)}: {' '.join(paths)} "
                           "(overrides look like section.key=value)")
    return (paths[0] if paths else None), [a for a in args if "=" in a]


def _load(args: tuple[str, ...], presets: list[str] = (), address: str | None = None):
    """Config from ``[CONFIG.yaml] [key=value ...]``; with no file the embedded demo preset comes first."""
    from flat_ray.config import load_config
    from flat_ray.launch.cluster import ray_address
    from flat_ray.preflight import check_inputs, check_model

    path, overrides = _split_args(args)
    if address:
        overrides.append(f"launch.address={address}")
    cfg = load_config(path, overrides, presets=(["demo"] if path is None else []) + list(presets))
    if cfg.launch.address is None and ray_address(None):  # RAY_ADDRESS, below a config file's launch.address
        cfg = dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, address=ray_address(None)))
    check_inputs(cfg)
    check_model(cfg)
    return cfg


class _Commands(click.Group):
    """An unknown command with no close match names the commands there are (click suggests only close ones)."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            close = getattr(exc, "possibilities", None) or "Did you mean" in exc.message
            if close or not exc.message.startswith("No such command"):
                raise
            raise click.UsageError(f"{exc.message} Commands: {', '.join(self.list_commands(ctx))}.", ctx) from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flat-ray")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Level of flat-ray's own messages.")
@click.option("-v", "--verbose", is_flag=True, help="Also show the raw logs of Ray, Ray Train/Tune, DeepSpeed, "
              "transformers and the workers (by default they go to Ray's log files only).")
def cli(log_level: str, verbose: bool) -> None:
    """FLAT LLM unlearning on Ray: single runs, sweeps, evaluation and reports.

    Configs are YAML files plus section.key=value overrides; `flat-ray validate` checks one and
    docs/config.md lists every key.
    """
    import os

    if verbose:
        os.environ["FLAT_RAY_VERBOSE"] = "1"  # read by the driver and by the processes Ray starts from it
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s", force=True)
    logging.getLogger("flat_ray").setLevel(log_level.upper())
    if not verbose:
        # rouge_score's "Using default tokenizer." (absl) and library warnings: flat-ray's own lines only
        logging.getLogger("absl").setLevel(logging.ERROR)
        # DeepSpeed's logger writes to stdout with its own handler and resets its level on import (accelerate
        # imports it when transformers saves a model); a filter on the logger survives that
        logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
        import warnings

        warnings.filterwarnings("ignore")


@cli.command()
def env() -> None:
    """Print versions of the stack, the accelerator and the CPU count."""
    from flat_ray.envinfo import environment

    for key, value in environment().items():
        click.echo(f"{key:<14}{value}")


@cli.command()
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [KEY=VALUE]...")
@click.option("--print", "print_config", is_flag=True, help="Print the resolved config as YAML.")
def validate(args: tuple[str, ...], print_config: bool) -> None:
    """Check a config (with overrides) as `flat-ray train` does before it starts: its values, the files it names,
    the model's tokenizer, the data, templates and evaluation rows, the MLflow URI's form. Runs and writes nothing.

    With no config file this is the embedded demo's config (what `flat-ray train` runs)."""
    from flat_ray import tracking
    from flat_ray.preflight import check_loadable

    cfg = _load(args)
    check_loadable(cfg)
    if cfg.tracking.mlflow_uri:
        tracking.check_scheme(cfg.tracking.mlflow_uri)
    if print_config:
        click.echo(cfg.to_yaml(), nl=False)
    click.echo(f"ok: {cfg.method.name}/{cfg.method.divergence} on {cfg.data.benchmark}/{cfg.data.split}, "
               f"model {cfg.model.name_or_path}, lr {cfg.optim.lr:g}, {cfg.optim.epochs} epochs")


def _summary(result) -> None:
    """Before/after of every evaluated metric: the metric registry's forget metrics, then utility, then the
    objectives and diagnostics (registry order within each), then anything the registry does not know."""
    from flat_ray.console import format_value
    from flat_ray.metrics import METRICS

    keys = [k.removeprefix("eval/") for k in result.before if k.startswith("eval/") and k in result.after]
    roles = ("forget", "utility", "objective", "diagnostic")
    known = sorted((m for m in METRICS if m in keys), key=lambda m: roles.index(METRICS[m].role))
    if keys:
        click.echo(f"{'metric':<28}{'before':>10}{'after':>10}{'after/before':>14}")
    for key in known + [k for k in keys if k not in METRICS]:
        b, a = result.before[f"eval/{key}"], result.after[f"eval/{key}"]
        ratio = "-" if not b else f"{a / b:.3f}" if abs(a / b) < 1e3 else f"{a / b:.3g}"  # forget quality: x1e3+
        click.echo(f"{key:<28}{format_value(b):>10}{format_value(a):>10}{ratio:>14}")
    click.echo(f"run {result.run_name} finished in {result.seconds:.0f} s")
    click.echo(f"model: {result.model_dir}")
    click.echo(f"MLflow run id: {result.run_id}")
    _browse(result.mlflow_uri, result.run_id)


def _browse(uri: str, run_id: str) -> None:
    """How to open the run's experiment on its runs table (MLflow's UI, started here for a local store)."""
    from flat_ray import tracking

    page = f"#/experiments/{tracking.experiment_id(uri, run_id)}/runs"
    if uri.startswith("http"):
        click.echo(f"browse: {uri.rstrip('/')}/{page}")
    else:
        click.echo(f"browse: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open "
                   f"http://127.0.0.1:5000/{page}")


def _run(args: tuple[str, ...], presets: list[str], dry_run: bool, resume: str | None, address: str | None,
         gpu_memory: str | None = None) -> None:
    from transformers.utils import logging as hf_logging

    from flat_ray.dryrun import gpu_gib_of, run_lines

    cfg = _load(args, presets, address)
    gpu_gib = gpu_gib_of(gpu_memory)
    hf_logging.disable_progress_bar()
    if dry_run:
        click.echo("\n".join(run_lines(cfg, gpu_gib)))
        return
    if gpu_gib is not None:
        from flat_ray.memory import check_fits

        check_fits([(f"run {cfg.tracking.run_name or cfg.model.name_or_path}", cfg)], gpu_gib)
    from flat_ray.launch.driver import run_training

    _summary(run_training(cfg, resume=resume, console=True))


_run_options = [
    click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [KEY=VALUE]..."),
    click.option("--dry-run", is_flag=True, help="Build the model, data and one batch and compute the loss once; "
                                                  "no Ray, no training."),
    click.option("--resume", metavar="RUN_NAME", help="Continue the named run from its latest checkpoint."),
    click.option("--address", metavar="ADDR", help="Join this Ray cluster (same as launch.address=ADDR); default: "
                 "RAY_ADDRESS where set, else a Ray of the run's own, even where another runs on this machine."),
    click.option("--gpu-memory", metavar="GIB|CLUSTER.yaml", help="GPU memory per worker (GiB, or the smallest GPU "
                 "of a Ray cluster YAML's node types): refuse a run whose memory plan does not fit; default: this "
                 "machine's GPU."),
]


def _with_run_options(fn):
    for option in reversed(_run_options):
        fn = option(fn)
    return fn


@cli.command()
@_with_run_options
def train(args: tuple[str, ...], dry_run: bool, resume: str | None, address: str | None,
          gpu_memory: str | None) -> None:
    """Run one unlearning job on Ray Train workers with DeepSpeed, recorded in MLflow.

    With no config file it runs the embedded demo: the tiny model fine-tuned on all demo authors and the background
    split (built and cached first), then FLAT on forget10 with 2 workers and ZeRO-3. eval.reference=auto also builds
    the demo's retain model and reports forget quality against it.
    """
    _run(args, [], dry_run, resume, address, gpu_memory)


@cli.command()
@_with_run_options
def finetune(args: tuple[str, ...], dry_run: bool, resume: str | None, address: str | None,
             gpu_memory: str | None) -> None:
    """Fine-tune a model with the plain next-token loss (original or retain models, e.g. data.split=retain90).

    Same machinery as train, with method.name=sft and data.split=full unless the config says otherwise. With no
    config file it builds the demo's original model recipe.
    """
    has_file = any("=" not in a for a in args)
    _run(args, ["finetune"] if has_file else ["finetune", "demo_finetune"], dry_run, resume, address, gpu_memory)


def _print_summary(summary: dict) -> None:
    splits = [s for s in ("forget", "retain", "real_authors", "world_facts") if f"{s}_prob" in summary]
    if not splits:  # MUSE-News, hp: one line per metric
        for key, value in summary.items():
            if isinstance(value, float) and not key.startswith("lm_eval/"):
                click.echo(f"{key:<24}{value:.4f}")
        return
    click.echo(f"{'split':<14}{'prob':>10}{'rougeL_rec':>12}{'truth_ratio':>13}")
    for split in splits:
        click.echo(f"{split:<14}{summary[f'{split}_prob']:>10.4f}{summary[f'{split}_rougeL_recall']:>12.4f}"
                   f"{summary[f'{split}_truth_ratio']:>13.4f}")
    if "model_utility" in summary:
        click.echo(f"model utility   {summary['model_utility']:.6f}  (truth ratio: {summary['truth_ratio_variant']})")
    if "forget_quality" in summary:
        click.echo(f"forget quality  {summary['forget_quality']:.4g}  (reference: {summary['forget_quality_reference']})")


@cli.command("eval")
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [KEY=VALUE]...")
@click.option("--model", help="Hub id, local model directory, a `flat-ray train` run directory, 'demo' or 'tiny'.")
@click.option("--benchmark", help="Benchmark registry key (data.benchmark).")
@click.option("--split", help="Forget split, e.g. forget01 (data.split).")
@click.option("--data-dir", help="Local directory with the benchmark's files (data.data_dir).")
@click.option("--reference", metavar="DIR|FILE|RUN_ID",
              help="Forget-quality reference: TOFU-format eval logs, an open-unlearning result JSON, the MLflow "
                   "run id of a `flat-ray eval` of a retain model, or 'auto' (the demo's retain model, built once).")
@click.option("--truth-ratio", type=click.Choice(TRUTH_RATIOS.keys()), help="Truth-ratio variant.")
@click.option("--max-examples", type=click.IntRange(min=1), help="Evaluate only the first N questions per split.")
@click.option("--tasks", help="lm-eval tasks for utility: 'default' (the paper's set) or a comma-separated list.")
@click.option("--tasks-include", type=click.Path(file_okay=False), help="Folder of local lm-eval task YAMLs.")
@click.option("--limit", type=click.IntRange(min=1), help="lm-eval: at most N documents per task.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default <workdir>/evals/...).")
@click.option("--run-id", help="Attach the results to this MLflow run (e.g. a training run) instead of a new one.")
@click.option("--from-logs", type=click.Path(file_okay=False),
              help="Recompute the summary from a folder of TOFU-format eval logs; no model is loaded.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def eval_cmd(args, model, benchmark, split, data_dir, reference, truth_ratio, max_examples, tasks, tasks_include,
             limit, out, run_id, from_logs, as_json) -> None:
    """Evaluate a model with its benchmark's suite and optionally lm-eval tasks.

    TOFU-style benchmarks: probability, ROUGE-L, truth ratio, model utility, forget quality (or recompute them
    from eval logs with --from-logs). muse_news: VerbMem, KnowMem, PrivLeak. hp: completion BLEU / ROUGE-L."""
    import json

    if from_logs:
        from flat_ray.eval.run import summary_from_logs

        summary = summary_from_logs(from_logs, reference, truth_ratio or DEFAULT_TRUTH_RATIO)
    else:
        from flat_ray.eval.harness import parse_tasks
        from flat_ray.eval.run import evaluate_model
        from flat_ray.launch.driver import finetuner

        overrides = [f"{key}={value}" for key, value in (("model.name_or_path", model), ("data.benchmark", benchmark),
                     ("data.split", split), ("data.data_dir", data_dir), ("eval.truth_ratio", truth_ratio)) if value]
        cfg = _load(tuple(args) + tuple(overrides))
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        result = evaluate_model(cfg, reference=reference, tasks=parse_tasks(tasks) if tasks else None,
                                tasks_include=tasks_include, limit=limit, max_examples=max_examples, out_dir=out,
                                run_id=run_id, finetune=finetuner(console=True))
        summary = {**result.summary, **{f"lm_eval/{t}/{m}": v for t, ms in result.utility.items() for m, v in ms.items()},
                   "out_dir": str(result.out_dir), "mlflow_run_id": result.run_id}
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
        return
    _print_summary(summary)
    for key, value in summary.items():
        if key.startswith("lm_eval/"):
            click.echo(f"{key:<40}{value:.4f}")
    if "out_dir" in summary:
        click.echo(f"per-question results: {summary['out_dir']}")
        click.echo(f"MLflow run id: {summary['mlflow_run_id']}")


@cli.command()
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--space", default="demo", show_default=True, metavar="NAME|PATH",
              help="A shipped search space (see --list) or a YAML file.")
@click.option("--name", metavar="NAME", help="Sweep name (MLflow experiment, directories); default <space>-<time>.")
@click.option("--resume", metavar="NAME", help="Continue an interrupted sweep; finished trials are not re-run.")
@click.option("--dry-run", is_flag=True, help="Validate the space and print the trial table; start nothing.")
@click.option("--list", "list_spaces", is_flag=True, help="List the shipped search spaces.")
@click.option("--address", metavar="ADDR", help="Join this Ray cluster (e.g. auto); default: RAY_ADDRESS where "
              "set, else a Ray of the sweep's own, even where another runs on this machine.")
@click.option("--storage-path", metavar="DIR", help="Shared storage for Ray state and checkpoints (required on "
                                                    "multi-node clusters: an NFS or bucket mount).")
@click.option("--mlflow-uri", metavar="URI", help="MLflow tracking URI (an http server on a cluster).")
@click.option("--workdir", metavar="DIR", help="Where --resume looks for sweeps (default flat_ray_work).")
@click.option("--gpu-memory", metavar="GIB|CLUSTER.yaml", help="GPU memory of the nodes that run trials (GiB, or the "
              "smallest GPU of a Ray cluster YAML's node types): the dry run says which cells fit, a sweep refuses "
              "to start a cell that does not; default: this machine's GPU.")
@click.option("--prices", metavar="FILE", help="With --dry-run and --gpu-memory CLUSTER.yaml: a YAML mapping of node "
              "type to its price per node-hour; the cost estimate adds money.")
def tune(overrides, space, name, resume, dry_run, list_spaces, address, storage_path, mlflow_uri, workdir,
         gpu_memory, prices) -> None:
    """Sweep a search space with Ray Tune: models x benchmarks x methods, sampled hyperparameters.

    Every trial is a `flat-ray train` run (Ray Train workers, DeepSpeed) nested under one MLflow parent run per
    sweep; the report table ends the sweep. KEY=VALUE overrides apply to every trial (e.g. optim.epochs=2).
    """
    from transformers.utils import logging as hf_logging

    from flat_ray.dryrun import gpu_gib_of, space_lines, sweep_lines
    from flat_ray.memory import check_fits
    from flat_ray.sweep_state import space_to_run

    if list_spaces:
        click.echo("\n".join(space_lines()))
        return
    if resume and (name or overrides):
        raise click.UsageError("--resume continues a sweep with its own space and overrides; drop --name and KEY=VALUE")
    if dry_run:
        click.echo("\n".join(sweep_lines(space_to_run(space, list(overrides), resume, workdir), gpu_memory, prices)))
        return
    from flat_ray.launch.tune import run_sweep

    hf_logging.disable_progress_bar()
    gpu_gib = gpu_gib_of(gpu_memory)
    if gpu_gib is not None:  # refuse before a GPU node is paid for (the sweep checks the files itself)
        check_fits([(f"cell {c.name}", c.config) for c in space_to_run(space, list(overrides), resume, workdir).cells],
                   gpu_gib)
    result = run_sweep(space, list(overrides), name=name, resume=resume, address=address,
                       storage_path=storage_path, mlflow_uri=mlflow_uri, workdir_hint=workdir, echo=click.echo)
    click.echo(f"sweep {result.name}: {result.trials} trials, {result.errored} errored, {result.seconds:.0f} s")
    click.echo(f"report: {result.sweep_dir / 'report'}")
    _browse(result.mlflow_uri, result.parent_run_id)
    result.raise_if_errored()


@cli.command()
@click.argument("sweep", metavar="NAME|DIR")
@click.option("--workdir", metavar="DIR", help="Where to look for the sweep by name (default flat_ray_work).")
def report(sweep: str, workdir: str | None) -> None:
    """Write and print a sweep's report: per benchmark the best trial of each method, Pareto and loss plots."""
    from flat_ray.report import write_report
    from flat_ray.sweep_state import find_sweep

    result = write_report(find_sweep(sweep, workdir))
    click.echo(result.text)
    click.echo(f"files: {', '.join(str(p) for p in result.files)}")


@cli.command("export")
@click.argument("run", metavar="RUN_NAME|RUN_DIR")
@click.argument("args", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--epoch", default="best", show_default=True, metavar="best|last|N",
              help="Which kept checkpoint: the best by the run's launch.checkpoint_metric, the last, or epoch N.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default <output_dir>/model-epochN).")
@click.option("--adapter", is_flag=True, help="A LoRA run: write the adapter alone (PEFT's layout, tens of MB; "
                                              "default <output_dir>/adapter-epochN) instead of the merged model.")
def export_cmd(run: str, args: tuple[str, ...], epoch: str, out: str | None, adapter: bool) -> None:
    """Write a Hugging Face model from one of a run's kept checkpoints, and record it on the run's MLflow run. A
    LoRA run's model is its base model with the adapter merged (the adapter alone in its adapter/ folder).

    RUN_NAME is looked up in the storage path that paths.workdir= or launch.storage_path= give (as for
    `train --resume`); RUN_DIR is the run's own storage folder (a sweep trial's: <storage>/<sweep>/train/<trial>).
    """
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from flat_ray.export import RUN_STATE, export_run
    from flat_ray.storage import Place, is_cloud

    hf_logging.disable_progress_bar()
    given = Place.of(run) if is_cloud(run) or Path(run).expanduser().is_dir() else None
    if given is not None and (given / RUN_STATE).is_file():
        run_dir = given
    else:
        from flat_ray.launch.driver import storage_root

        run_dir = storage_root(_load(args)) / run
    done = export_run(run_dir, epoch, Path(out) if out else None, adapter)
    click.echo(f"exported epoch {done.epoch} of {run_dir.name} to {done.model_dir} (MLflow run {done.run_id}; "
               f"{'uploaded as its model artifact' if done.uploaded else 'its path is the model_dir tag'})")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one line and exit code 2."""
    from flat_ray.errors import FlatRayError

    try:
        cli.main(args=argv, prog_name="flat-ray", standalone_mode=False)
    except FlatRayError as exc:
        click.echo(f"flat-ray: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("flat-ray: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"flat-ray: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(0)


if __name__ == "__main__":
    main()
