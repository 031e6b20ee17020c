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


def _load(args: tuple[str, ...]):
    from flat_ray.config import load_config

    path, overrides = _split_args(args)
    return load_config(path, overrides)


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
    """Load and validate a config (with overrides) without running anything."""
    cfg = _load(args)
    if print_config:
        click.echo(cfg.to_yaml(), nl=False)
    click.echo(f"ok: {cfg.method.name}/{cfg.method.divergence} on {cfg.data.benchmark}/{cfg.data.split}, "
               f"model {cfg.model.name_or_path}, lr {cfg.optim.lr:g}, {cfg.optim.epochs} epochs")


@cli.command()
@click.argument("args", nargs=-1, metavar="[CONFIG.yaml] [KEY=VALUE]...")
@click.option("--dry-run", is_flag=True,
              help="Build the model, data and one batch and compute the loss once; no training.")
def train(args: tuple[str, ...], dry_run: bool) -> None:
    """Run one unlearning job. With no arguments: the embedded demo (tiny model, synthetic TOFU-format set)."""
    from flat_ray.errors import FlatRayError

    cfg = _load(args)
    if not dry_run:
        raise FlatRayError("training on Ray Train workers is not available in this version yet; "
                           "run `flat-ray train --dry-run` to check a config end to end")
    from transformers.utils import logging as hf_logging

    from flat_ray.pipeline import dry_run as run_dry

    hf_logging.disable_progress_bar()

    summary = run_dry(cfg)
    width = max(map(len, summary))
    for key, value in summary.items():
        click.echo(f"{key:<{width}}  {value}")
    click.echo("dry run ok: no parameters were updated")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one line and exit code 2."""
    from flat_ray.errors import FlatRayError

    try:
        cli.main(args=argv, prog_name="flat-ray", standalone_mode=False)
    except FlatRayError as exc:
        click.echo(f"flat-ray: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("flat-ray: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"flat-ray: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(0)


if __name__ == "__main__":
    main()
