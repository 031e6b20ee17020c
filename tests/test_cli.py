"""The flat-ray command line: help, env, validate, train --dry-run, and one-line errors for user mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main

FLAT_RAY = str(Path(sys.executable).with_name("flat-ray"))


def run_main(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_help_lists_the_commands():
    res = subprocess.run([FLAT_RAY, "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "validate", "env"):
        assert command in res.stdout


def test_env_reports_versions_accelerator_and_cpus(capsys):
    code, out, _ = run_main(["env"], capsys)
    assert code == 0
    for key in ("python", "torch", "transformers", "ray", "deepspeed", "mlflow", "lm_eval", "accelerator", "cpu_count"):
        assert any(line.split()[0] == key for line in out.splitlines()), key
    assert "not installed" not in out


def test_validate_ok_and_print(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("method:\n  divergence: KL\n")
    code, out, _ = run_main(["validate", str(f), "optim.lr=2e-6", "--print"], capsys)
    assert code == 0 and "ok: flat/kl on demo/forget10" in out and "lr: 2.0e-06" in out


BAD_INPUTS = [
    (["validate", "optim.lrr=1"], "did you mean 'optim.lr'"),
    (["validate", "method.divergence=tvv"], "Valid choices: kl, reverse_kl, jeffrey"),
    (["validate", "{dir}/missing.yaml"], "does not exist"),
    (["validate", "{dir}/malformed.yaml"], "not valid YAML"),
    (["validate", "optim.lr=-0.001"], "optim.lr must be > 0"),
    (["validate", "deepspeed.stage=2", "deepspeed.offload_params=true"], "needs deepspeed.stage=3"),
    (["validate", "method.name=gradient_ascent"], "Valid choices: flat"),
    (["validate", "data.benchmark=pile"], "Valid choices: tofu, demo, muse_news, hp, wmdp"),
    (["validate", "deepspeed.stage=7"], "Valid choices: 0, 1, 2, 3"),
    (["validate", "optim.epochs=two"], "optim.epochs must be int"),
    (["validate", "a.yaml", "b.yaml"], "give at most one config file"),
    (["validate", "data.template_source=file"], "needs data.template_file"),
    (["validate", "data.template_source=file", "data.template_file={dir}/none.jsonl"], "does not exist"),
    (["validate", "data.data_dir={dir}/nodir", "data.benchmark=tofu"], "is not a directory"),
    (["validate", "{dir}/list.yaml"], "must hold a mapping of sections"),
    (["validate", "optim.warmup_ratio=1.5"], "optim.warmup_ratio must be in [0, 1)"),
    (["train", "--dry-run", "optim.lrr=1", "paths.workdir={dir}/wd"], "did you mean 'optim.lr'"),
    (["train", "--dry-run", "method.normalize=paperr", "paths.workdir={dir}/wd"], "Valid choices: paper, repo"),
    (["train", "--dry-run", "model.name_or_path={dir}/no-model", "paths.workdir={dir}/wd"], "does not exist"),
    (["train", "--dry-run", "data.benchmark=tofu", "data.data_dir={dir}/good", "data.split=forget01",
      "model.name_or_path={dir}/no-model", "paths.workdir={dir}/wd"], "model path"),
    (["train", "--dry-run", "data.benchmark=tofu", "data.data_dir={dir}/blank", "data.split=forget01",
      "paths.workdir={dir}/wd"], "contains no rows"),
    (["train", "--dry-run", "data.benchmark=tofu", "data.data_dir={dir}/schema", "data.split=forget01",
      "paths.workdir={dir}/wd"], "row 1 lacks field(s) answer"),
    (["train", "--dry-run", "data.benchmark=tofu", "data.data_dir={dir}/empty", "data.split=forget01",
      "paths.workdir={dir}/wd"], "no forget01.jsonl or forget01.json"),
    (["train", "--dry-run", "--no-such-flag"], "No such option"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])
def test_user_mistakes_give_one_line_exit_2_and_write_nothing(args, message, tmp_path, capsys):
    (tmp_path / "malformed.yaml").write_text("optim: {lr: 1e-5\n")
    (tmp_path / "list.yaml").write_text("- optim\n")
    for name, content in (("good", '{"question": "q", "answer": "a"}\n'), ("blank", ""), ("schema", '{"question": "q"}\n')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "forget01.jsonl").write_text(content)
    (tmp_path / "empty").mkdir()
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_main([a.format(dir=tmp_path) for a in args], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flat-ray: error: "), err
    assert message in lines[0]
    assert "Traceback" not in err + out
    assert sorted(tmp_path.rglob("*")) == before  # nothing written (no workdir, no model cache)


def test_console_script_exit_code_and_no_traceback(tmp_path):
    res = subprocess.run([FLAT_RAY, "train", "--dry-run", "method.divergence=hellinger2", f"paths.workdir={tmp_path}/wd"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Did you mean 'squared_hellinger'" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "wd").exists()


def test_train_dry_run_end_to_end_on_the_demo(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = [FLAT_RAY, "train", "--dry-run", f"paths.workdir={tmp_path}/wd", "method.divergence=js", "optim.micro_batch_size=2"]
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    out = dict(line.split(None, 1) for line in res.stdout.splitlines() if line and not line.startswith("dry run"))
    assert out["forget_examples"] == "20" and "jensen_shannon" in out["method"]
    assert out["first_batch"].startswith("{'forget': (2, ")
    assert 0 < float(out["first_batch_score_forget"]) < 1
    assert "dry run ok" in res.stdout
    # building the tiny model imports DeepSpeed (through accelerate); its accelerator warning stays off the console
    assert "built tiny model" in res.stderr and "Setting accelerator" not in res.stdout + res.stderr
    models = list((tmp_path / "wd" / "models").iterdir())
    assert len(models) == 1 and (models[0] / "model.safetensors").is_file()
    # (a second run reuses the cached model: tests/test_models.py, in process)
    # --verbose brings the libraries' own output back (and flat-ray's lines with their logger names)
    loud = subprocess.run([FLAT_RAY, "--verbose", *args[1:3], f"paths.workdir={tmp_path}/wd2", *args[4:]],
                          capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == 0, loud.stderr
    assert "Setting accelerator to CPU" in loud.stdout and "INFO flat_ray.models: built tiny model" in loud.stderr
