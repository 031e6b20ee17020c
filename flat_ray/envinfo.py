"""What ``flat-ray env`` reports: versions of the stack, the accelerator and the CPU count."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform

PACKAGES = ("torch", "transformers", "datasets", "ray", "deepspeed", "mlflow", "lm_eval", "flat-ray")


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
