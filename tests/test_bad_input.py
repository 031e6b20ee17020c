"""The bad-input matrix: user mistakes across train, finetune, tune, eval, validate and report, run through the
real CLI entry point (and a few through the ``flat-ray`` console script).

Every mistake must give exit code 2, exactly one line on stderr (``flat-ray: error: ...``) that says what to do,
no traceback, and write nothing: every path option points into ``tmp_path`` (which is also the working directory)
and the tree is compared before and after. In-process cases also carry tripwires: starting Ray, creating an MLflow
run or evaluating a model fails the case, because every mistake must be caught before any of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main

FLAT_RAY = str(Path(sys.executable).with_name("flat-ray"))

# where each path option points (all under tmp_path); {in} holds the inputs the cases read
WD, URI, ST, OUT = "{tmp}/wd", "sqlite:///{tmp}/wd/mlflow.db", "{tmp}/st", "{tmp}/out"
RUN_PATHS = [f"paths.workdir={WD}", f"tracking.mlflow_uri={URI}", f"launch.storage_path={ST}",
             f"paths.output_dir={OUT}"]
TUNE_PATHS = [f"paths.workdir={WD}", f"--mlflow-uri={URI}", f"--storage-path={ST}", f"--workdir={WD}"]
EVAL_PATHS = [f"paths.workdir={WD}", f"tracking.mlflow_uri={URI}", f"--out={OUT}"]
TOFU_DIR = ["data.benchmark=tofu", "data.split=forget01"]

SPACES = {
    "space_method": "base: [demo]\ngrid: {method: [flat, forget_everything]}\n",
    "space_divergence": "base: [demo]\nparams: {method.divergence: {grid: [tv, wasserstein]}}\n",
    "space_benchmark": "base: [demo]\ngrid: {benchmark: [pile/forget01]}\n",
    "space_objective": "base: [demo]\nobjective: accuracy\n",
    "space_key": "base: [demo]\ncolour: red\n",
    "space_ranked": "base: [demo]\nset: {launch.checkpoint_metric: forget_prob}\nobjective: unlearn_score\n",
    "space_lr": "base: [demo]\nparams: {optim.lr: {uniform: [0, 1.0e-3]}}\n",
    "space_malformed": "base: [demo]\ngrid: {method: [flat, npo\n",
}


def case(id_, argv, message, via="main", marks=()):
    return pytest.param(argv, message, via, id=id_, marks=marks)


MISTAKES = [
    # ------------------------------------------------------------------------------ search spaces (tune)
    case("tune-space-unknown-method", ["tune", "--space", "{in}/space_method.yaml", *TUNE_PATHS],
         "unknown method 'forget_everything'. Valid choices: flat, sft, grad_ascent"),
    case("tune-space-unknown-divergence", ["tune", "--space", "{in}/space_divergence.yaml", *TUNE_PATHS],
         "unknown divergence 'wasserstein'. Valid choices: kl, reverse_kl, jeffrey", via="script"),
    case("tune-space-unknown-benchmark", ["tune", "--space", "{in}/space_benchmark.yaml", *TUNE_PATHS],
         "unknown benchmark 'pile'. Valid choices: tofu, demo, muse_news, hp, wmdp"),
    case("tune-space-unknown-objective", ["tune", "--space", "{in}/space_objective.yaml", *TUNE_PATHS],
         "unknown metric 'accuracy'. Valid choices: forget_prob"),
    case("tune-space-epochs-ranked-by-another-metric", ["tune", "--space", "{in}/space_ranked.yaml", *TUNE_PATHS],
         "launch.checkpoint_metric=forget_prob in a sweep: a sweep ranks every trial's epochs by its first objective "
         "(unlearn_score)"),
    case("tune-space-unknown-key", ["tune", "--space", "{in}/space_key.yaml", *TUNE_PATHS],
         "unknown key 'colour' in search space"),
    case("tune-space-malformed-yaml", ["tune", "--space", "{in}/space_malformed.yaml", *TUNE_PATHS],
         "is not valid YAML"),
    case("tune-space-lr-range-reaches-0", ["tune", "--space", "{in}/space_lr.yaml", *TUNE_PATHS],
         "params.optim.lr=0.0: optim.lr must be > 0"),
    case("tune-dry-run-bad-override", ["tune", "--dry-run", "optim.epochs=0", *TUNE_PATHS],
         "flat: optim.epochs must be >= 1, got 0"),
    case("tune-mlflow-unreachable", ["tune", "--mlflow-uri=http://127.0.0.1:9", f"paths.workdir={WD}",
                                     f"--storage-path={ST}"], "MLflow server http://127.0.0.1:9 is unreachable"),
    case("tune-more-gpus-than-exist", ["tune", "launch.gpus_per_worker=1", *TUNE_PATHS],
         "GPU(s); lower launch.gpus_per_worker"),
    case("tune-resume-unknown-sweep", ["tune", "--resume", "never-ran", f"--workdir={WD}"],
         "no sweep named 'never-ran'"),
    case("tune-missing-bucket", ["tune", "--storage-path=s3://no-such-bucket/ray", f"paths.workdir={WD}"],
         "storage s3://no-such-bucket/ray/"),
    # ------------------------------------------------------------------------------ train / finetune
    case("train-lr-zero", ["train", "optim.lr=0", *RUN_PATHS], "optim.lr must be > 0, got 0.0"),
    case("train-empty-forget-file", ["train", "model.name_or_path={tiny}", *TOFU_DIR, "data.data_dir={in}/empty",
                                     *RUN_PATHS], "forget01.jsonl contains no rows"),
    case("train-forget-wrong-schema", ["train", "model.name_or_path={tiny}", *TOFU_DIR, "data.data_dir={in}/schema",
                                       *RUN_PATHS], "row 1 lacks field(s) question, answer"),
    case("train-rmu-layer-outside-the-model", ["train", "method.name=rmu", *RUN_PATHS],
         "method.rmu_layer=7 is outside model 'demo': its decoder layers are 0..3"),
    case("tune-rmu-layer-outside-the-model", ["tune", "--dry-run", "method.name=rmu", "method.rmu_layer=-1",
                                              *TUNE_PATHS], "method.rmu_layer must be >= 0, got -1"),
    case("train-wmdp-folder-without-its-corpora", ["train", "data.benchmark=wmdp", "data.data_dir={in}/empty",
                                                   *RUN_PATHS],
         "has no cyber-forget-corpus.jsonl (split cyber); WMDP's corpora are expected there or in its wmdp-corpora/ "
         "folder: bio-forget-corpus.jsonl, cyber-forget-corpus.jsonl, bio-retain-corpus.jsonl, "
         "cyber-retain-corpus.jsonl"),
    case("train-mia-without-holdout", ["train", "data.benchmark=muse_news", "eval.mia=true", *RUN_PATHS],
         "eval.mia=true needs held-out questions, and benchmark muse_news has no holdout split (benchmarks with "
         "one: tofu, demo); set eval.mia=false"),
    case("train-trainable-not-a-regex", ["train", "model.trainable=layers.(5", *RUN_PATHS],
         "model.trainable is not a regular expression (missing ), unterminated subpattern at position 7): "
         "'layers.(5'"),
    case("train-trainable-with-lora", ["train", "model.trainable=.*down_proj.*", "model.lora_rank=8", *RUN_PATHS],
         "model.trainable and LoRA (model.lora_rank > 0) both choose what trains; set one of them "
         "(model.trainable=null or model.lora_rank=0)"),
    case("train-trainable-matches-nothing", ["train", "model.name_or_path={tiny}", "model.trainable=layers.0.mlp.*",
                                             *RUN_PATHS],
         "model.trainable='layers.0.mlp.*' matches no parameter of the model (its names look like "
         "model.embed_tokens.weight, model.layers.1.self_attn.q_proj.weight); the whole name must match"),
    case("train-gradnorm-without-mia", ["train", "eval.mia=false", "eval.mia_gradnorm=true", *RUN_PATHS],
         "eval.mia_gradnorm=true needs the membership metrics: eval.mia not false, on a benchmark with holdout "
         "splits (tofu, demo; here demo); set eval.mia_gradnorm=false"),
    case("train-mia-holdout-file-missing", ["train", "model.name_or_path={tiny}", *TOFU_DIR, "eval.mia=true",
                                            "data.data_dir={in}/no_holdout", *RUN_PATHS],
         "no holdout01.jsonl or holdout01.json in"),
    case("train-model-path-missing", ["train", "model.name_or_path={in}/no-model", *RUN_PATHS],
         "does not exist or has no config.json"),
    case("train-hub-id-offline", ["train", "model.name_or_path=some-org/not-cached-model", *RUN_PATHS],
         "HF_HUB_OFFLINE=1 and it is not in the local cache"),
    case("train-mlflow-unreachable", ["train", *RUN_PATHS, "tracking.mlflow_uri=http://127.0.0.1:9"],
         "MLflow server http://127.0.0.1:9 is unreachable"),
    case("train-mlflow-uri-unsupported", ["train", *RUN_PATHS, "tracking.mlflow_uri=file:///tmp/mlruns"],
         "is not supported; use sqlite:///PATH or http(s)://HOST:PORT"),
    case("train-more-gpus-than-exist", ["train", "launch.gpus_per_worker=1", *RUN_PATHS],
         "GPU(s); lower launch.gpus_per_worker", via="script"),
    case("train-more-cpus-than-exist", ["train", "launch.num_workers=1000", *RUN_PATHS],
         "CPUs but this machine has"),
    # an address nothing answers at: at once, where ray.init would retry its connection for many minutes
    case("train-ray-address-nothing-answers", ["train", "--address", "127.0.0.1:1", *RUN_PATHS],
         "no Ray answers at 127.0.0.1:1 (--address, launch.address or RAY_ADDRESS): Connection refused; is the "
         "cluster up?"),
    case("tune-ray-address-is-a-dashboard-url", ["tune", "--address", "http://127.0.0.1:8265", *TUNE_PATHS],
         "Ray address http://127.0.0.1:8265 is a dashboard (Ray Jobs) URL; give the cluster's address"),
    case("tune-tofu-without-toFUs-retain-logs", ["tune", "--space", "tofu", *TUNE_PATHS],
         "cell llama2-7b-tofu_forget01-flat: eval.reference 'tofu/data/ft_epoch5_lr1e-05_llama2-7b_retain99_wd0.01/"
         "eval_results/ds_size300' does not exist"),
    case("tune-does-not-fit-the-gpus", ["tune", "--space", "tofu", "--gpu-memory", "16", *TUNE_PATHS],
         "cell llama2-7b-tofu_forget01-flat needs about 20.9 GiB per GPU at its peak of evaluation, the GPUs have 16 "
         "GiB: set"),
    case("train-gpu-memory-not-a-size", ["train", "--gpu-memory", "lots", *RUN_PATHS],
         "--gpu-memory 'lots' is neither a number of GiB nor a cluster YAML file"),
    case("train-lora-target-the-model-lacks", ["train", "model.name_or_path={tiny}", "model.lora_rank=8",
                                               "model.lora_target_modules=q_proj,c_attn", *RUN_PATHS],
         "model.lora_target_modules names c_attn, which this model does not have; its linear modules: down_proj, "
         "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or all-linear)"),
    case("train-lora-rank-negative", ["train", "model.lora_rank=-8", *RUN_PATHS],
         "model.lora_rank must be >= 0 (0: no LoRA), got -8"),
    case("train-override-without-key", ["train", "=1e-5", *RUN_PATHS], "must look like section.key=value"),
    case("train-override-without-value", ["train", "optim.lr", *RUN_PATHS],
         "an override needs a value: optim.lr=VALUE"),
    case("train-empty-template-file", ["train", "data.template_source=file", "data.template_file={in}/empty.jsonl",
                                       *RUN_PATHS], "contains no templates"),
    case("train-resume-unknown-run", ["train", "--resume", "never-ran", *RUN_PATHS], "no run named 'never-ran'"),
    case("train-reference-auto-for-a-hub-model", ["train", "model.name_or_path={tiny}", "eval.reference=auto",
                                                  *RUN_PATHS], "eval.reference=auto for a model other than the demo "
                                                               "needs eval.retain_recipe"),
    case("train-retain-recipe-missing", ["train", "model.name_or_path={tiny}", "eval.reference=auto",
                                         "eval.retain_recipe={in}/no_recipe.yaml", *RUN_PATHS],
         "no_recipe.yaml' does not exist; give a `flat-ray finetune` config file"),
    case("train-reference-auto-for-the-demos-full-split", ["train", "data.split=full", "eval.reference=auto", *RUN_PATHS],
         "eval.reference=auto needs a forget split with a retain complement; demo has them for: forget05, forget10"),
    case("train-reference-not-json", ["train", "eval.reference={in}/not_json.json", *RUN_PATHS],
         "is not valid JSON"),
    case("train-hp-without-data-dir", ["train", "data.benchmark=hp", *RUN_PATHS], "benchmark hp needs data.data_dir"),
    case("train-chat-template-profile-without-template",
         ["train", "model.name_or_path={tiny}", "model.profile=chat_template", *RUN_PATHS],
         "needs a tokenizer with a chat template"),
    case("train-template-column-missing",
         ["train", "model.name_or_path={tiny}", "data.template_source=column", "data.template_column=refusal",
          *RUN_PATHS], "template column 'refusal' is missing"),
    case("finetune-unknown-split", ["finetune", "data.split=forget99", *RUN_PATHS],
         "Did you mean 'forget10'? Valid choices: full"),
    # ------------------------------------------------------------------------------ eval
    case("eval-model-missing", ["eval", "--model", "{in}/no-model", *EVAL_PATHS], "does not exist", via="script"),
    case("eval-hub-id-offline", ["eval", "--model", "some-org/not-cached-model", *EVAL_PATHS],
         "HF_HUB_OFFLINE=1 and it is not in the local cache"),
    case("eval-mlflow-unreachable", ["eval", "--model", "{tiny}", *EVAL_PATHS, "tracking.mlflow_uri=http://127.0.0.1:9"],
         "MLflow server http://127.0.0.1:9 is unreachable"),
    case("eval-unknown-benchmark", ["eval", "--model", "{tiny}", "--benchmark", "pile", *EVAL_PATHS],
         "unknown benchmark 'pile'. Valid choices: tofu, demo"),
    case("eval-forget-wrong-schema", ["eval", "--model", "{tiny}", "--benchmark", "tofu", "--split", "forget01",
                                      "--data-dir", "{in}/schema", *EVAL_PATHS], "lacks field(s) question, answer"),
    case("eval-tofu-offline-without-data-dir", ["eval", "--model", "{tiny}", "--benchmark", "tofu", *EVAL_PATHS],
         "offline? set data.data_dir"),
    case("eval-truth-ratio-choice", ["eval", "--model", "{tiny}", "--truth-ratio", "harmonic", *EVAL_PATHS],
         "'harmonic' is not one of 'arithmetic', 'geometric'"),
    case("eval-max-examples-0", ["eval", "--model", "{tiny}", "--max-examples", "0", *EVAL_PATHS],
         "0 is not in the range x>=1"),
    case("eval-reference-auto-for-a-hub-model", ["eval", "--model", "{tiny}", "--reference", "auto", *EVAL_PATHS],
         "needs eval.retain_recipe"),
    case("eval-reference-missing", ["eval", "--model", "{tiny}", "--reference", "{in}/no-logs", *EVAL_PATHS],
         "forget-quality reference"),
    case("eval-unknown-run-id", ["eval", "--model", "{tiny}", "--run-id", "0123456789abcdef0123456789abcdef",
                                 *EVAL_PATHS], "no MLflow run '0123456789abcdef0123456789abcdef'"),
    case("eval-from-logs-missing", ["eval", "--from-logs", "{in}/no-logs"], "eval-log directory"),
    case("eval-unknown-lm-eval-task", ["eval", "--model", "{tiny}", "--tasks", "no_such_task", *EVAL_PATHS],
         "unknown lm-eval task(s): no_such_task"),
    # ------------------------------------------------------------------------------ report, validate, global
    case("report-unknown-sweep", ["report", "never-ran", f"--workdir={WD}"], "no sweep named 'never-ran'"),
    case("report-not-a-sweep-directory", ["report", "{in}", f"--workdir={WD}"], "is not a sweep directory"),
    case("validate-unknown-profile", ["validate", "model.profile=llama3", *RUN_PATHS], "Did you mean 'llama2_chat'"),
    case("validate-not-a-bool", ["validate", "eval.enabled=maybe", *RUN_PATHS], "eval.enabled must be bool"),
    case("validate-unknown-section", ["validate", "{in}/unknown_section.yaml", *RUN_PATHS],
         "unknown config key 'optimizer' (did you mean 'optim'?); sections: model, data"),
    # validate makes the checks train makes before it starts (each of these once passed validate with "ok")
    case("validate-mlflow-uri-scheme", ["validate", *RUN_PATHS, "tracking.mlflow_uri=file://{tmp}/mlruns"],
         "/mlruns' is not supported; use sqlite:///PATH or http(s)://HOST:PORT"),
    case("validate-hp-without-data", ["validate", "data.benchmark=hp", "model.name_or_path={tiny}", *RUN_PATHS],
         "benchmark hp needs data.data_dir"),
    case("validate-template-column-missing", ["validate", "data.template_source=column",
                                              "data.template_column=refusal", *RUN_PATHS],
         "template column 'refusal' is missing or empty in 20 forget rows (first: row 0)"),
    case("validate-lora-module-missing", ["validate", "model.name_or_path={tiny}", "model.lora_rank=8",
                                          "model.lora_target_modules=q_proj,nope_proj", *RUN_PATHS],
         "model.lora_target_modules names nope_proj, which this model does not have"),
    case("unknown-command", ["trian"], "No such command 'trian'. Did you mean 'train'?"),
    case("unknown-command-far-from-any", ["run"], "No such command 'run'. Commands: env, eval, export, finetune, report, train, tune, validate."),
    case("unknown-log-level", ["--log-level", "VERBOSE", "validate"], "'VERBOSE' is not one of 'debug'"),
]


def make_inputs(tmp_path: Path) -> Path:
    """The files the cases read, under ``tmp_path/in``."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, text in SPACES.items():
        (inputs / f"{name}.yaml").write_text(text)
    (inputs / "empty").mkdir()
    (inputs / "empty" / "forget01.jsonl").write_text("")
    (inputs / "schema").mkdir()
    for split in ("forget01", "forget01_perturbed"):  # train reads forget01, eval forget01_perturbed first
        (inputs / "schema" / f"{split}.jsonl").write_text('{"q": "Who?", "a": "Nobody."}\n')
    (inputs / "no_holdout").mkdir()
    (inputs / "no_holdout" / "forget01.jsonl").write_text('{"question": "Who?", "answer": "Nobody."}\n')
    (inputs / "empty.jsonl").write_text("")
    (inputs / "not_json.json").write_text("not json\n")
    (inputs / "unknown_section.yaml").write_text("optimizer: {lr: 1.0e-5}\n")
    return inputs


class Tripwire(AssertionError):
    """Raised when a case gets as far as starting Ray, creating an MLflow run or evaluating a model."""


@pytest.fixture
def tripwires(monkeypatch):
    import ray

    import flat_ray.eval.suites
    from flat_ray import tracking
    from flat_ray.eval import hp, muse

    def trip(what):
        def fn(*args, **kwargs):
            raise Tripwire(f"{what} started before the mistake was reported")
        return fn

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # a Ray left running by another test must not count
    monkeypatch.setattr(ray, "init", trip("Ray"))
    monkeypatch.setattr(tracking, "start_run", trip("an MLflow run"))
    for module, name in ((flat_ray.eval.suites, "evaluate_tofu"), (muse, "evaluate"), (hp, "evaluate")):
        monkeypatch.setattr(module, name, trip("the evaluation"))


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(("argv", "message", "via"), MISTAKES)
def test_mistake_gives_one_line_exit_2_and_writes_nothing(argv, message, via, tmp_path, tiny_model_dir, monkeypatch,
                                                          capsys, tripwires, s3_bucket):
    inputs = make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)  # a default relative path (flat_ray_work) would land here and be seen
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
        monkeypatch.setenv(key, value)
    args = [a.format(tmp=tmp_path, tiny=tiny_model_dir, **{"in": inputs}) for a in argv]
    before = tree(tmp_path)

    if via == "script":
        res = subprocess.run([FLAT_RAY, *args], capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ),
                             timeout=300)
        code, out, err = res.returncode, res.stdout, res.stderr
    else:
        with pytest.raises(SystemExit) as exc:
            main(args)
        captured = capsys.readouterr()
        code, out, err = exc.value.code, captured.out, captured.err

    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("flat-ray: error: ") and message in lines[0], lines[0]
    assert code == 2, (code, err)
    assert tree(tmp_path) == before, "files were written"
    assert not list(tmp_path.rglob("mlflow.db"))


def test_ray_address_in_the_environment_is_the_default_address(tmp_path, monkeypatch, capsys, tripwires):
    """RAY_ADDRESS (what `ray job submit` sets for its entrypoint) is the address of train and tune where neither
    --address nor launch.address gives one, and is checked like one; launch.address wins over it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    wd = [f"paths.workdir={tmp_path}/wd"]
    for argv, address in ((["train", *wd], "127.0.0.1:1"), (["tune", "--space", "demo", *wd], "127.0.0.1:1"),
                          (["train", "launch.address=127.0.0.1:9", *wd], "127.0.0.1:9")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.startswith(f"flat-ray: error: no Ray answers at {address} "), (argv, err)
    assert tree(tmp_path) == []


def test_the_matrix_is_broad():
    """At least 20 distinct mistakes, over every user-facing command, some through the console script."""
    ids = [p.id for p in MISTAKES]
    assert len(set(ids)) == len(ids) >= 20
    commands = {p.values[0][0] for p in MISTAKES}
    assert {"train", "finetune", "tune", "eval", "validate", "report"} <= commands
    assert sum(p.values[2] == "script" for p in MISTAKES) >= 2
