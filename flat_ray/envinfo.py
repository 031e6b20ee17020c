"""What ``flat-ray env`` reports: versions of the stack, the accelerator and the CPU count; and the environment
variables a joined cluster's workers get from the driver."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

PACKAGES = ("torch", "transformers", "datasets", "ray", "deepspeed", "mlflow", "lm_eval", "flat-ray")


# Variables that decide where a worker caches models and data and whether it may download: a node of a joined cluster
# starts its workers with its own environment, not the driver's, so the driver passes these (when set) to every
# worker of its Ray job. Credentials are deliberately not in this list: Ray shows the variables a job passes to its
# workers in plain text on its dashboard and in its job table; provision them on the nodes instead (cluster.yaml's
# setup, an instance role or a secret manager).
FORWARDED_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE",
                 "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
                 # where cloud storage is (an S3-compatible endpoint, the region); never the credentials
                 "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


def forwarded_env() -> dict[str, str]:
    """The :data:`FORWARDED_ENV` variables this process has, with their values."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def accelerator() -> str:
    import torch

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        return f"cuda x{torch.cuda.device_count()} ({', '.join(names)})"
    return "cpu"


def environment() -> dict[str, str]:
    info = package_versions()
    info["accelerator"] = accelerator()
    info["cpu_count"] = str(os.cpu_count())
    info["platform"] = platform.platform()
    return info


@contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in this process's environment (and so in every process started meanwhile), the old ones put back
    after."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
