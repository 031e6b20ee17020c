"""``flat-ray``: parse, validate, call flat_ray. Heavy imports happen inside the commands so --help is fast.

User mistakes (:class:`flat_ray.errors.FlatRayError`) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import logging
import sys

import click

EXIT_USAGE = 2


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

    path, overrides = _split_args(args)
    if address:
        overrides.append(f"launch.address={address}")
    return load_config(path, overrides, presets=(["demo"] if path is None else []) + list(presets))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flat-ray")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def cli(log_level: str) -> None:
    """FLAT LLM unlearning on Ray: single runs, sweeps, evaluation and reports.

    Configs are YAML files plus section.key=value overrides; `flat-ray validate` checks one and
    docs/config.md lists every key.
    """
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")


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
    """Load and validate a config (with overrides) without running anything.

    With no config file this is the embedded demo's config (what `flat-ray train` runs)."""
    cfg = _load(args)
    if print_config:
        click.echo(cfg.to_yaml(), nl=False)
    click.echo(f"ok: {cfg.method.name}/{cfg.method.divergence} on {cfg.data.benchmark}/{cfg.data.split}, "
               f"model {cfg.model.name_or_path}, lr {cfg.optim.lr:g}, {cfg.optim.epochs} epochs")


def _summary(result) -> None:
    rows = [("forget", "prob"), ("retain", "prob"), ("forget", "rougeL_recall"), ("retain", "rougeL_recall")]
    click.echo(f"{'split':<8}{'metric':<15}{'before':>10}{'after':>10}{'after/before':>14}")
    for split, metric in rows:
        key = f"eval/{split}_{metric}"
        if key in result.before and key in result.after:
            b, a = result.before[key], result.after[key]
            ratio = f"{a / b:.3f}" if b else "-"
            click.echo(f"{split:<8}{metric:<15}{b:>10.4f}{a:>10.4f}{ratio:>14}")
    click.echo(f"run {result.run_name} finished in {result.seconds:.0f} s")
    click.echo(f"model: {result.model_dir}")
    click.echo(f"MLflow run id: {result.run_id}")
    click.echo(f"browse: mlflow ui --backend-store-uri {result.mlflow_uri} --host 127.0.0.1")


def _run(args: tuple[str, ...], presets: list[str], dry_run: bool, resume: str | None, address: str | None) -> None:
    cfg = _load(args, presets, address)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if dry_run:
        from flat_ray.pipeline import dry_run as run_dry

        summary = run_dry(cfg)
        width = max(map(len, summary))
        for key, value in summary.items():
            click.echo(f"{key:<{width}}  {value}")
        click.echo("dry run ok: no parameters were updated")
        return
    from flat_ray.launch.driver import run_training

    _summary(run_training(cfg, resume=resume))


_run_options = [
    click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [KEY=VALUE]..."),
    click.option("--dry-run", is_flag=True, help="Build the model, data and one batch and compute the loss once; "
                                                  "no Ray, no training."),
    click.option("--resume", metavar="RUN_NAME", help="Continue the named run from its latest checkpoint."),
    click.option("--address", metavar="ADDR", help="Join this Ray cluster (same as launch.address=ADDR)."),
]


def _with_run_options(fn):
    for option in reversed(_run_options):
        fn = option(fn)
    return fn


@cli.command()
@_with_run_options
def train(args: tuple[str, ...], dry_run: bool, resume: str | None, address: str | None) -> None:
    """Run one unlearning job on Ray Train workers with DeepSpeed, recorded in MLflow.

    With no config file it runs the embedded demo: the tiny model fine-tuned on all demo authors (built and
    cached first), then FLAT on forget10 with 2 workers and ZeRO-3.
    """
    _run(args, [], dry_run, resume, address)


@cli.command()
@_with_run_options
def finetune(args: tuple[str, ...], dry_run: bool, resume: str | None, address: str | None) -> None:
    """Fine-tune a model with the plain next-token loss (original or retain models, e.g. data.split=retain90).

    Same machinery as train, with method.name=sft and data.split=full unless the config says otherwise. With no
    config file it builds the demo's original model recipe.
    """
    has_file = any("=" not in a for a in args)
    _run(args, ["finetune"] if has_file else ["finetune", "demo_finetune"], dry_run, resume, address)


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
