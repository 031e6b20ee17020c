"""Security defaults: secrets in the environment never reach MLflow, artifacts, outputs or the console; no unsafe
deserialisation; remote code off; models exported as safetensors; MLflow servers bound to loopback."""

from __future__ import annotations

import ast
import inspect
import os
import re
from pathlib import Path

import pytest

from tests.runs import SECRETS, SENTINEL

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "flat_ray").rglob("*.py"), *(ROOT / "cli").rglob("*.py")])


# ------------------------------------------------------------------------------------ secrets in a real run
@pytest.mark.slow
def test_secrets_never_reach_mlflow_artifacts_outputs_or_the_console(ray_local, interrupted, tmp_path):
    """The suite's interrupted run (tests/runs.py: `flat-ray train` killed and resumed) ran in processes whose
    environment holds the secrets, and joined the suite's Ray, whose every process holds them too (as a cluster's
    nodes hold credentials): its Ray Train workers had them."""
    import ray
    from mlflow.tracking import MlflowClient

    @ray.remote(num_cpus=0)
    def worker_env(key: str) -> str | None:
        return os.environ.get(key)

    assert all(ray.get(worker_env.remote(key)).startswith(SENTINEL) for key in SECRETS)

    work = interrupted.work
    assert interrupted.resumed.returncode == 0, interrupted.resumed.stderr[-3000:]
    printed = interrupted.first_log + interrupted.resumed.stdout + interrupted.resumed.stderr
    assert "MLflow run id:" in printed and SENTINEL not in printed
    run_id = re.search(r"MLflow run id: ([0-9a-f]{32})", interrupted.resumed.stdout).group(1)
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.params and run.data.metrics  # the scan below looks at a real run
    for key, value in [*run.data.params.items(), *run.data.tags.items()]:
        assert SENTINEL not in key and SENTINEL not in value, key
    assert all(SENTINEL not in key for key in run.data.metrics)
    experiment = client.get_experiment(run.info.experiment_id)
    assert all(SENTINEL not in f"{k}={v}" for k, v in experiment.tags.items())

    artifacts = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    logged = [p for p in artifacts.rglob("*") if p.is_file()]
    assert {"config.yaml", "model.safetensors"} <= {p.name for p in logged}
    # every file of the run: downloaded artifacts, the output folder, Ray's run folder with its checkpoints (in the
    # bucket), the MLflow store itself
    bucket = interrupted.run_dir.download(tmp_path / "bucket")  # Ray's run folder in the S3 bucket, checkpoints too
    scanned = [*logged, *(p for p in work.rglob("*") if p.is_file()), *(p for p in bucket.rglob("*") if p.is_file())]
    assert (work / "runs" / "interrupted" / "config.yaml") in scanned and (work / "mlflow.db") in scanned
    assert any(p.name.endswith("_optim_states.pt") for p in scanned)  # DeepSpeed's checkpoint files too
    leaks = [str(p) for p in scanned if SENTINEL.encode() in p.read_bytes()]
    assert not leaks, f"secret found in {leaks}"


@pytest.mark.slow
def test_exported_model_is_safetensors_only(interrupted):
    model_dir = interrupted.work / "runs" / "interrupted" / "model"
    names = {p.name for p in model_dir.iterdir()}
    assert "model.safetensors" in names
    pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    assert not pickled, pickled


# ------------------------------------------------------------------------------------------ static checks
def _calls(tree: ast.AST):
    """``(call, owner, method)`` for every ``owner.method(...)`` call; ``owner`` as source text."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node, ast.unparse(node.func.value), node.func.attr


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_no_unsafe_deserialisation_in_the_package():
    """torch.load only with weights_only=True; no pickle/dill/joblib loads; no numpy loads with allow_pickle."""
    bad = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for call, owner, attr in _calls(ast.parse(text)):
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            if owner == "torch" and attr == "load" and _keyword(call, "weights_only") is not True:
                bad.append(f"{where} torch.load without weights_only=True")
            if owner in ("pickle", "cPickle", "dill", "cloudpickle", "joblib") and attr in ("load", "loads"):
                bad.append(f"{where} {owner}.{attr}")
            if owner in ("np", "numpy") and attr == "load" and _keyword(call, "allow_pickle") not in (None, False):
                bad.append(f"{where} numpy.load with allow_pickle")
        # aliases such as `from torch import load` or `from pickle import loads` would hide a call from the above
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "joblib"):
                if any(a.name in ("load", "loads") for a in node.names):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import load")
    assert not bad, bad


def test_remote_code_is_off_by_default_everywhere():
    from flat_ray.config import PRESETS, ModelConfig, load_config
    from flat_ray.models import load_model_and_tokenizer
    from flat_ray.sweep import load_space, shipped_spaces

    assert ModelConfig().trust_remote_code is False
    assert inspect.signature(load_model_and_tokenizer).parameters["trust_remote_code"].default is False
    assert load_config(None).model.trust_remote_code is False
    for name in PRESETS:
        assert load_config(None, presets=[name]).model.trust_remote_code is False, name
    for name in shipped_spaces():
        assert all(c.config.model.trust_remote_code is False for c in load_space(name, check_files=False).cells), name
    # no code path switches it on by itself
    forced = [f"{p.relative_to(ROOT)}:{c.lineno}" for p in SOURCES for c, _, _ in _calls(ast.parse(p.read_text()))
              if _keyword(c, "trust_remote_code") is True]
    assert not forced, forced


def test_models_are_saved_with_safetensors():
    """Every save_pretrained in the package either says safe_serialization=True or saves a tokenizer or a config
    (JSON: PEFT's adapter config; the adapter's weights are written with safetensors' save_file)."""
    saves, bad = [], []
    for path in SOURCES:
        for call, owner, attr in _calls(ast.parse(path.read_text())):
            if attr == "save_pretrained" and "tok" not in owner and "config" not in owner:
                saves.append(owner)
                if _keyword(call, "safe_serialization") is not True:
                    bad.append(f"{path.relative_to(ROOT)}:{call.lineno} {owner}.save_pretrained")
    assert not bad, bad
    assert len(saves) >= 2  # the tiny-model builder and the final export (flat_ray/engine/ds.py)


MLFLOW_COMMAND = re.compile(r"mlflow\"?\s+(?:ui|server)\b[^\n]*(?:\n\s+--[^\n]*)*")
HOST = re.compile(r"--host[= ]+[\"']?([^\s\"')]+)")
# files that may bind a non-loopback address, on purpose: the cluster's head binds its private address only
PRIVATE_ADDRESS_OK = {"head_start.sh"}  # cluster.yaml's head: the private address, never 0.0.0.0


def test_mlflow_servers_flat_ray_starts_or_suggests_bind_to_loopback():
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "cluster.yaml", *(ROOT / "docs").glob("*.md"),
             *(p for p in (ROOT / "scripts").rglob("*") if "__pycache__" not in p.parts), *(ROOT / ".ci").glob("*"), *SOURCES]
    found = 0
    for path in (p for p in files if p.is_file()):
        for match in MLFLOW_COMMAND.finditer(path.read_text(encoding="utf-8")):
            found += 1
            command = match.group(0)
            where = f"{path.relative_to(ROOT)}: {command.strip()[:120]}"
            host = HOST.search(command)
            assert host, f"no --host (be explicit): {where}"
            value = host.group(1).strip("\"'")
            assert value not in ("0.0.0.0", "::", "[::]", "*"), f"binds every interface: {where}"
            if value not in ("127.0.0.1", "localhost", "::1"):
                assert path.name in PRIVATE_ADDRESS_OK, f"binds {value}, not loopback: {where}"
    assert found >= 4  # README, the train and tune summaries, the unreachable-server hint, the head's script
    assert "--dashboard-host=127.0.0.1" in (ROOT / "scripts" / "node" / "head_start.sh").read_text()


def test_no_secrets_are_forwarded_to_ray_workers():
    """If the package ever passes environment variables to Ray (runtime_env env_vars), none may be a credential,
    and no code may log the whole environment."""
    secretish = re.compile(r"TOKEN|PASSWORD|SECRET|_KEY\b|CREDENTIAL", re.IGNORECASE)
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for lineno, line in enumerate(text.splitlines(), 1):
            if "runtime_env" in line or "env_vars" in line:
                assert not secretish.search(line), f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}"
        for call, _, attr in _calls(ast.parse(text)):
            if attr in ("log_params", "set_tags", "log_param", "set_tag", "log_dict", "log_text"):
                assert "os.environ" not in ast.unparse(call), f"{path.relative_to(ROOT)}:{call.lineno}"
