"""Search spaces (validated without Ray), the metric registry's objectives, the Ray Tune translation and the
report's pure parts."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cli.main import main
from flat_ray.errors import FlatRayError
from flat_ray.memory import GIB
from flat_ray.metrics import METRICS, add_derived, fq_scaled
from flat_ray.report import markdown, pareto_front
from flat_ray.sweep import load_space, shipped_spaces
from flat_ray.sweep_table import max_concurrent, trial_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo", "demo_baselines", "tofu", "tofu_lora", "tofu_baselines", "muse", "hp",
                                  "wmdp"])
def test_every_shipped_space_validates(name):
    space = load_space(name, check_files=False)
    assert space.cells and space.total_trials() >= 4
    for cell in space.cells:
        assert cell.config.eval.enabled
        for key in cell.params:  # an axis is never also a constant
            assert key not in cell.constants


def test_shipped_spaces_are_all_listed_and_tested():
    assert shipped_spaces() == sorted(p.stem for p in (ROOT / "search_spaces").glob("*.yaml"))
    assert set(shipped_spaces()) == {"demo", "demo_baselines", "tofu", "tofu_lora", "tofu_baselines", "muse", "hp",
                                     "wmdp"}


def test_demo_space_is_lr_times_four_divergences():
    space = load_space("demo")
    (cell,) = space.cells
    assert cell.trials(space.num_samples) == 4
    assert cell.params["method.divergence"].kind == "grid" and len(cell.params["method.divergence"].args) == 4
    assert cell.params["optim.lr"].kind == "loguniform"
    assert cell.config.model.name_or_path == "demo" and cell.config.launch.num_workers == 2


def test_tofu_space_is_the_model_by_split_grid_with_the_papers_recipe():
    space = load_space("tofu", check_files=False)
    assert len(space.cells) == 6
    models = {c.config.model.name_or_path for c in space.cells}
    assert models == {"locuslab/tofu_ft_llama2-7b", "locuslab/tofu_ft_phi-1.5"}
    assert {c.config.data.split for c in space.cells} == {"forget01", "forget05", "forget10"}
    profiles = {c.labels["model"]: c.config.model.profile for c in space.cells}
    assert profiles == {"llama2-7b": "llama2_chat", "phi-1.5": "phi"}
    cfg = space.cells[0].config
    assert (cfg.optim.epochs, cfg.deepspeed.stage, cfg.deepspeed.precision, cfg.launch.gpus_per_worker) == (5, 3, "bf16", 1)


def test_baseline_spaces_give_each_method_its_own_cell():
    space = load_space("demo_baselines")
    methods = [c.config.method.name for c in space.cells]
    assert methods == ["flat"] * 4 + ["grad_ascent", "grad_diff", "idk", "npo", "dpo", "simnpo", "wga", "satimp",
                                      "undial", "ceu", "rmu"]
    assert [c.config.method.divergence for c in space.cells[:4]] == ["total_variation", "kl", "jensen_shannon",
                                                                     "pearson"]
    assert all(c.trials(space.num_samples) == 2 for c in space.cells)
    assert all(c.config.eval.reference == "auto" for c in space.cells) and space.objective == ["tofu_score"]
    tofu = load_space("tofu_baselines", check_files=False)
    assert tofu.algorithm == "optuna" and tofu.scheduler == "asha"
    assert [c.config.method.name for c in tofu.cells][0] == "flat" and tofu.cells[0].config.method.divergence == "kl"


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


GOOD = """
base: [demo]
grid:
  method:
    - {name: flat, params: {method.divergence: {grid: [tv, kl, js]}}}
    - npo
params:
  optim.lr: {grid: [1.0e-4, 3.0e-4]}
"""


def test_entry_params_apply_to_their_cell_only(tmp_path):
    space = load_space(_write(tmp_path, GOOD))
    flat, npo = space.cells
    assert flat.trials(1) == 6 and npo.trials(1) == 2
    assert "method.divergence" not in npo.params
    assert flat.config.method.divergence == "total_variation"  # aliases resolve through the registry
    assert space.total_trials() == 8


def test_overrides_become_constants_of_every_trial(tmp_path):
    space = load_space(_write(tmp_path, GOOD), ["optim.epochs=1", "eval.max_examples=3"])
    assert all(c.config.optim.epochs == 1 and c.config.eval.max_examples == 3 for c in space.cells)


BAD = [
    ("colour: red", "unknown key 'colour' in search space"),
    ("params: {optim.lrr: {grid: [1.0e-4]}}", "did you mean 'optim.lr'"),
    ("params: {method.divergence: {grid: [tv, wasserstein]}}", "Valid choices: kl, reverse_kl"),
    ("params: {optim.lr: {loguniform: [0, 1.0e-3]}}", "bounds must be > 0"),
    ("params: {optim.lr: {uniform: [1.0e-3, 1.0e-4]}}", "low must be below high"),
    ("params: {optim.lr: {normal: [0, 1]}}", "must be a constant or one of {grid|choice|uniform|loguniform|randint"),
    ("params: {optim.lr: [1.0e-4, 2.0e-4]}", "a list is ambiguous"),
    ("params: {optim.epochs: {uniform: [1, 3]}}", "optim.epochs must be int"),
    ("params: {optim.lr: {grid: [1.0e-4]}}\nsearch: {algorithm: optuna}", "optuna cannot search; use choice"),
    ("objective: [unlearn_score, model_utility]", "needs search.algorithm=optuna"),
    ("objective: [unlearn_score, model_utility]\nsearch: {algorithm: optuna}\nscheduler: {name: asha}",
     "asha needs a single objective"),
    ("objective: accuracy", "unknown metric 'accuracy'"),
    ("objective: tofu_score", "needs forget quality; give the space's references"),
    ("search: {algorithm: bayes}", "unknown search algorithm 'bayes'"),
    ("scheduler: {name: pbt}", "unknown scheduler 'pbt'"),
    ("scheduler: {name: asha, grace_period: 0}", "scheduler.grace_period must be an integer >= 1"),
    ("num_samples: 0", "num_samples must be an integer >= 1"),
    ("grid: {method: [flat, forget_everything]}", "unknown method 'forget_everything'"),
    ("grid: {benchmark: [demo/forget99]}", "data.split='forget99' is not valid. Did you mean 'forget10'"),
    ("grid: {dataset: [demo]}", "unknown key 'dataset' in grid"),
    ("grid: {method: [flat, flat]}", "names must be unique"),
    ("set: {eval.enabled: false}", "the objective needs per-epoch evaluation"),
    ("report: {pareto: [forget_prob]}", "report.pareto needs two metrics"),
    ("resources: {gpus: 1}", "unknown key 'gpus' in resources"),
    ("base: [nothing_here]", "neither a preset"),
    ("params: {optim.lr: {grid: [1.0e-4, 2.0e-4]}}\nnope: [", "is not valid YAML"),
    ("objective: tofu_score\nset: {eval.reference: auto, eval.interim_examples: 2}",
     "remove eval.interim_examples so every epoch is judged on the same questions"),
    ("references: {demo/demo/forget10: /tmp}", "references needs grid.model and grid.benchmark entries"),
    ("grid: {model: [demo], benchmark: [demo/forget10, demo/forget05]}\nreferences: {demo/demo/forget01: /tmp}",
     "references: unknown cell 'demo/demo/forget01'; valid keys (<model>/<benchmark>): demo/demo/forget10, "
     "demo/demo/forget05"),
    ("grid: {model: [demo], benchmark: [demo/forget10, demo/forget05]}\nreferences: {demo/demo/forget10: /tmp}",
     "references: no path for demo/demo/forget05"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_bad_spaces_fail_with_one_actionable_line(tmp_path, text, message):
    with pytest.raises(FlatRayError) as info:
        load_space(_write(tmp_path, "base: [demo]\n" + text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_rejects_bad_input_with_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv, message in ((["tune", "--space", "nope"], "shipped spaces: demo, demo_baselines, hp, muse"),
                          (["tune", "--space", "missing.yaml"], "does not exist"),
                          (["tune", "optim.lr=1e-3"], "optim.lr is a search axis"),
                          (["tune", "optim.lrr=1"], "did you mean 'optim.lr'"),
                          (["tune", "--resume", "nothing"], "no sweep named 'nothing'"),
                          (["report", "nothing"], "no sweep named 'nothing'"),
                          (["tune", "--name", "my sweep"], "may only use letters"),
                          (["tune", "--resume", "a", "--name", "b"], "drop --name and KEY=VALUE"),
                          (["tune", "--space", "tofu", "eval.reference=/nowhere"], "eval.reference '/nowhere' does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert list(tmp_path.iterdir()) == []


def test_the_tofu_spaces_optimise_tofu_score_against_toFUs_own_retain_logs(tmp_path, monkeypatch, capsys):
    """Each (model, split) cell's reference is TOFU's published eval logs of the retain model that split leaves
    (forget01 -> retain99 ...), as paths in a clone of locuslab/tofu beside where the sweep runs: the dry run names
    them (missing here), the sweep refuses to start without them, and with them in place every cell has its own."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--space", "tofu", "--dry-run"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "objective tofu_score (max)" in out
    assert ("cell phi-1.5-tofu_forget05-flat: tofu/data/ft_epoch5_lr2e-05_phi_retain95_wd0.01/eval_results/ds_size300 "
            "(missing: the sweep refuses to start until it is there)") in out
    with pytest.raises(FlatRayError, match="cell llama2-7b-tofu_forget01-flat: eval.reference 'tofu/data/ft_epoch5_"
                                           "lr1e-05_llama2-7b_retain99_wd0.01/eval_results/ds_size300' does not exist"):
        load_space("tofu")
    expected = {}
    for model, tag, lr in (("llama2-7b", "llama2-7b", "1e-05"), ("phi-1.5", "phi", "2e-05")):
        for forget, retain in (("01", "99"), ("05", "95"), ("10", "90")):
            folder = tmp_path / f"tofu/data/ft_epoch5_lr{lr}_{tag}_retain{retain}_wd0.01/eval_results/ds_size300"
            folder.mkdir(parents=True)
            (folder / "eval_log_forget.json").write_text("{}")
            expected[f"{model}-tofu_forget{forget}-flat"] = str(folder.relative_to(tmp_path))
    for name in ("tofu", "tofu_baselines"):
        space = load_space(name)
        assert space.objective == ["tofu_score"]
        for cell in space.cells:
            assert cell.config.eval.reference == expected[cell.name.replace(cell.labels["method"], "flat")]
            assert cell.config.eval.interim_examples is None and cell.config.eval.max_examples == 300
    main_out = []
    with pytest.raises(SystemExit):
        main(["tune", "--space", "tofu_baselines", "--dry-run"])
    main_out = capsys.readouterr().out
    found = (tmp_path / "tofu/data/ft_epoch5_lr1e-05_llama2-7b_retain95_wd0.01/eval_results/ds_size300").resolve()
    assert f"cell llama2-7b-tofu_forget05-npo: published logs at {found} (TOFU-format eval logs)" in main_out


@pytest.mark.parametrize("name", ["demo", "tofu"])
def test_dry_run_prints_the_trial_table(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--space", name, "--dry-run"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    total = load_space(name, check_files=False).total_trials()
    assert f"{total} trials" in out and "concurrent" in out and "nothing was started" in out
    assert list(tmp_path.iterdir()) == []


def test_concurrency_is_what_the_nodes_hold():
    from flat_ray.placement import NodeType

    def node(cpus, gpus=0, count=1):
        return NodeType("n", {"CPU": cpus, "GPU": gpus, "memory": 1000 * GIB}, count)

    demo = load_space("demo").cells[0].config  # 2 workers x 0.99 CPU, spread as they fit (PACK)
    assert max_concurrent(demo, [node(2)]) == 1
    assert max_concurrent(demo, [node(1)]) == 0 and max_concurrent(demo, [node(1, count=2)]) == 1
    assert max_concurrent(demo, [node(8)]) == 4
    tofu = load_space("tofu", check_files=False).cells[0].config  # 2 workers x (8 CPU, 1 GPU), both on one node (STRICT_PACK)
    assert max_concurrent(tofu, [node(64, 8)]) == 4  # GPUs bind: 8 workers, 4 trials
    assert max_concurrent(tofu, [node(32, 8)]) == 2  # CPUs bind
    assert max_concurrent(tofu, [node(8, 1, count=4)]) == 0  # one worker per node: never both on one
    assert max_concurrent(tofu, [node(128, 0)]) == 0
    rows = trial_table(load_space("tofu", check_files=False), [node(128, 4)])
    assert [r["concurrent"] for r in rows] == [2] * 6 and rows[0]["gpus/trial"] == 2


def test_space_vocabulary_becomes_ray_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    from flat_ray.launch.search import domain
    from flat_ray.sweep import Spec

    assert domain(Spec("grid", (1, 2))) == {"grid_search": [1, 2]}
    assert isinstance(domain(Spec("choice", ("a", "b"))), Categorical)
    lo = domain(Spec("loguniform", (1e-6, 1e-4)))
    assert isinstance(lo, Float) and lo.lower == 1e-6 and lo.upper == 1e-4
    assert isinstance(domain(Spec("uniform", (0.0, 1.0))), Float)
    ri = domain(Spec("randint", (1, 4)))
    assert isinstance(ri, Integer) and ri.upper == 4


def test_searchers_and_schedulers_follow_the_space(tmp_path):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from flat_ray.launch.search import SCHEDULER_BUILDERS, SEARCH_BUILDERS
    from flat_ray.sweep import SCHEDULERS, SEARCHERS

    # every name a space may use has a builder, and no builder hides behind an unlisted name
    assert set(SEARCH_BUILDERS) == set(SEARCHERS.keys()) and set(SCHEDULER_BUILDERS) == set(SCHEDULERS.keys())
    demo = load_space("demo")
    assert isinstance(SEARCH_BUILDERS[demo.algorithm](demo, demo.cells[0], 1), BasicVariantGenerator)
    multi = load_space(_write(tmp_path, "base: [demo]\nparams: {optim.lr: {loguniform: [1.0e-4, 1.0e-3]}}\n"
                                        "search: {algorithm: optuna, seed: 3}\n"
                                        "objective: [forget_prob, retain_prob]\n"))
    searcher = SEARCH_BUILDERS[multi.algorithm](multi, multi.cells[0], 2)
    assert isinstance(searcher, ConcurrencyLimiter) and searcher.max_concurrent == 2
    assert searcher.searcher.metric == ["forget_prob", "retain_prob"]
    assert searcher.searcher.mode == ["min", "max"]  # directions from the metric registry
    tofu = load_space("tofu_baselines", check_files=False)
    sched = SCHEDULER_BUILDERS[tofu.scheduler](tofu, tofu.cells[0])
    assert isinstance(sched, ASHAScheduler) and sched._max_t == tofu.cells[0].config.optim.epochs + 1


def test_objective_modes_come_from_the_metric_registry():
    assert METRICS["forget_prob"].mode == "min" and METRICS["forget_rougeL_recall"].mode == "min"
    assert METRICS["forget_truth_ratio"].mode == "max" and METRICS["forget_quality"].mode == "max"
    assert METRICS["model_utility"].mode == "max" and METRICS["unlearn_score"].mode == "max"


def test_derived_objectives_by_hand():
    s = add_derived({"forget_prob": 0.3, "retain_prob": 0.9})
    assert s["unlearn_score"] == pytest.approx(2 * 0.7 * 0.9 / 1.6)
    assert add_derived({"forget_prob": 1.0, "retain_prob": 0.9})["unlearn_score"] == 0.0
    assert "tofu_score" not in s
    assert fq_scaled(1.0) == 1.0 and fq_scaled(1e-5) == pytest.approx(0.5) and fq_scaled(1e-12) == 0.0
    assert fq_scaled(0.05) == pytest.approx(1 + math.log10(0.05) / 10)
    t = add_derived({"model_utility": 0.6, "forget_quality": 1e-5})
    assert t["tofu_score"] == pytest.approx(2 * 0.6 * 0.5 / 1.1)


def test_tofu_score_on_published_logs(tofu_mini):
    from flat_ray.eval.run import summary_from_logs

    logs = tofu_mini.parent / "tofu_eval_logs"
    if not logs.is_dir():
        pytest.skip(f"published TOFU eval logs not found at {logs}")
    full = summary_from_logs(logs / "llama2-7b_full", str(logs / "llama2-7b_retain90"), "arithmetic")
    same = summary_from_logs(logs / "llama2-7b_retain90", str(logs / "llama2-7b_retain90"), "arithmetic")
    assert full["tofu_score"] == 0.0  # FQ 1.8e-21: nothing forgotten
    assert same["tofu_score"] == pytest.approx(2 * 0.575240 / 1.575240, abs=1e-5)


def test_pareto_front_respects_metric_directions():
    pts = [(0.1, 0.9), (0.2, 0.95), (0.3, 0.5), (0.1, 0.8), (0.05, 0.2)]
    # forget_prob lower is better, retain_prob higher is better
    assert pareto_front(pts, "forget_prob", "retain_prob") == [0, 1, 4]
    # forget_quality and model_utility: both higher is better
    assert pareto_front(pts, "forget_quality", "model_utility") == [1, 2]


def test_markdown_table_formats_missing_values():
    text = markdown([{"method": "flat", "lr": 1e-4, "forget_prob": 0.12345}, {"method": "npo", "lr": None,
                                                                            "forget_prob": None}])
    lines = text.splitlines()
    assert lines[0].startswith("| method") and "0.0001" in lines[2] and "0.1235" in lines[2]
    assert lines[3].count(" - ") == 2


def test_a_normal_install_finds_the_shipped_spaces(tmp_path):
    """Not editable: build the wheel, install it under a prefix, run from outside the checkout."""
    wheel_dir, prefix = tmp_path / "wheel", tmp_path / "prefix"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel = next(wheel_dir.glob("flat_ray-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--ignore-installed", "--prefix", str(prefix), str(wheel)],
                   check=True, capture_output=True, cwd=tmp_path)
    site = next(prefix.glob("lib/python*/site-packages"))
    code = ("import flat_ray, flat_ray.sweep as s; print(flat_ray.__file__); print(s.spaces_dir()); "
            "print(','.join(s.shipped_spaces())); print(s.load_space('demo').total_trials())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}).stdout.split()
    assert out[0].startswith(str(prefix))
    assert out[1] == str(prefix / "share" / "flat-ray" / "search_spaces")
    assert out[2] == "demo,demo_baselines,hp,muse,tofu,tofu_baselines,tofu_lora,wmdp" and out[3] == "4"


def test_text_benchmark_spaces_follow_their_recipes():
    muse = load_space("muse")
    assert [c.config.method.name for c in muse.cells] == ["flat", "npo"]
    assert [c.trials(muse.num_samples) for c in muse.cells] == [8, 2]  # divergences only for FLAT
    assert muse.cells[0].config.data.benchmark == "muse_news" and muse.objective == ["muse_score"]
    assert muse.cells[0].config.data.chunk_tokens == 2048 and muse.cells[0].config.data.max_length > 2048
    # MUSE's baselines (baselines/iterative.py): HF TrainingArguments with lr_scheduler_type='constant', the default
    # warm-up 0 and weight decay 0, 10 epochs, 32 sequences per step; NPO's chunks all labels (dataset.py)
    for cell in muse.cells:
        o, n = cell.config.optim, cell.config.launch.num_workers
        assert (o.schedule, o.warmup_ratio, o.weight_decay, o.epochs) == ("constant", 0, 0, 10)
        assert o.micro_batch_size * o.grad_accum_steps * n == 32
    assert [c.config.data.prompt_fraction for c in muse.cells] == [0.5, 0]
    hp = load_space("hp")
    (cell,) = hp.cells
    assert cell.config.data.benchmark == "hp" and cell.config.data.data_dir is None  # the user passes the book
    assert hp.objective == ["completion_score"] and hp.modes == ["max"]
    # FLAT's copyright runs (README: batch 4 x accumulation 4 x 2 GPUs; unlearn.py: warm-up of one epoch of 5)
    o = cell.config.optim
    assert o.micro_batch_size * o.grad_accum_steps * cell.config.launch.num_workers == 32
    assert (o.epochs, o.warmup_ratio, o.max_grad_norm) == (5, 0.2, 0)  # FLAT's DeepSpeed config: no clipping
    assert cell.config.data.template_source == "retain_text"  # FLAT's HP data: other text as the good answer
    assert [c.config.optim.max_grad_norm for c in muse.cells] == [1.0, 1.0]  # MUSE's Trainer without DeepSpeed clips


def test_tofu_spaces_train_as_flats_and_tofus_trainer_runs():
    """FLAT's unlearn.py (and TOFU's forget.py) on TOFU: 32 sequences per step, max_steps = 5 * n // 32, warm-up
    max(2, n // 32) steps in FLAT's code (max(1, ...) in TOFU's), and no gradient clipping: their DeepSpeed config has
    no `gradient_clipping`, the Trainer fills only "auto" entries and leaves clipping to DeepSpeed (default 0). The
    retain-model recipes (TOFU's finetune.py) use the same DeepSpeed config."""
    from flat_ray.config import load_config
    from flat_ray.schedule import micro_batches_per_epoch, optimizer_steps, warmup_steps

    sizes = {"forget01": 40, "forget05": 200, "forget10": 400}
    for cell in load_space("tofu", check_files=False).cells:
        o, n = cell.config.optim, sizes[cell.config.data.split]
        total = optimizer_steps(micro_batches_per_epoch(n, o.micro_batch_size, cell.config.launch.num_workers),
                                o.epochs, o.grad_accum_steps)
        assert (total, warmup_steps(total, o.warmup_ratio)) == (5 * n // 32, max(2, n // 32)), cell.name
    for name in ("tofu", "tofu_lora", "tofu_baselines"):
        assert {c.config.optim.max_grad_norm for c in load_space(name, check_files=False).cells} == {0}, name
    for recipe in ("tofu_finetune_llama2-7b", "tofu_finetune_phi-1.5"):
        assert load_config(None, [], presets=["finetune", recipe]).optim.max_grad_norm == 0


def test_on_an_autoscaling_cluster_every_trial_may_wait_and_the_multi_node_guard_holds(ray_local, tmp_path,
                                                                                       monkeypatch, caplog):
    """Joined to a cluster whose GPU nodes scale from zero (this local Ray has no GPU; its node types are
    cluster.yaml's, read as from the head's ~/ray_bootstrap_config.yaml), a sweep does not run one trial at a time:
    as many as fit the cluster at its largest may be pending, so the autoscaler sees their whole demand. Those
    trials run on nodes yet to come, so shared storage, a server MLflow and the work folder on the storage's
    filesystem are required up front, and a local input off that filesystem is named."""
    from flat_ray.launch.cluster import check_sweep
    from flat_ray.storage import Place

    monkeypatch.chdir(tmp_path)  # the space's paths.workdir, flat_ray_work, is relative to here
    monkeypatch.setenv("FLAT_RAY_CLUSTER_CONFIG", str(ROOT / "cluster.yaml"))
    shared = Place.of(tmp_path / "shared")
    space = load_space("tofu", check_files=False)  # each trial 2 x (8 CPU, 1 GPU) on one node; llama 2 x 78.3 GiB of host memory
    with pytest.raises(FlatRayError, match="cell llama2-7b-tofu_forget01-flat waits for nodes the autoscaler adds: "
                                           "pass --storage-path on shared storage"):
        check_sweep(space, "auto", None, "sqlite:///x.db")
    with pytest.raises(FlatRayError, match="waits for nodes the autoscaler adds but MLflow is a local SQLite file"):
        check_sweep(space, "auto", shared, "sqlite:///x.db")
    # llama: 3 per A10G node (RAM binds) x 3 nodes + 4 per A100 node x 2; phi: 4 per node (GPUs bind) x 5 nodes
    want = {c.name: 17 if c.name.startswith("llama") else 20 for c in space.cells}
    assert check_sweep(space, "auto", shared, "http://head:5000") == want
    elsewhere = Place.of("/dev/shm/flat-ray-shared")  # another filesystem (tmpfs) than the work folder's
    if Path("/dev/shm").is_dir() and Path("/dev/shm").stat().st_dev != tmp_path.stat().st_dev:
        with pytest.raises(FlatRayError, match=rf"the work folder {tmp_path / 'flat_ray_work'} \(sweep state, trial "
                                               rf"outputs, exports\) is not on the filesystem of --storage-path "
                                               rf"{elsewhere}.*set paths.workdir on the shared mount"):
            check_sweep(space, "auto", elsewhere, "http://head:5000")
        # a template file on this machine's own disk (here: another filesystem than the shared one) is named, once,
        # as an input the trials' nodes must hold at that path; a missing one (the dry run's case) is not listed
        template = Path(tempfile.mkstemp(suffix=".jsonl", dir="/dev/shm")[1])
        try:
            template.write_text('{"text": "I cannot say."}\n')
            local = load_space("tofu", [f"data.template_file={template}"], check_files=False)
            with caplog.at_level(logging.WARNING, logger="flat_ray"):
                assert check_sweep(local, "auto", shared, "http://head:5000") == want
        finally:
            template.unlink()
        assert [r.getMessage() for r in caplog.records if "data.template_file" in r.getMessage()] == [
            f"data.template_file {template} is not on the filesystem of --storage-path {shared}: workers on other "
            "nodes read it there at the same path (baked into their image) or fail; put it on the shared mount"]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flat_ray"):  # the same space, the file now on the shared mount
            (tmp_path / "shared").mkdir(exist_ok=True)
            (tmp_path / "shared" / "t.jsonl").write_text('{"text": "I cannot say."}\n')
            check_sweep(load_space("tofu", [f"data.template_file={tmp_path / 'shared' / 't.jsonl'}"],
                                   check_files=False), "auto", shared, "http://head:5000")
        assert not [r for r in caplog.records if "filesystem of --storage-path" in r.getMessage()]
    monkeypatch.delenv("FLAT_RAY_CLUSTER_CONFIG")  # this Ray alone: one node, 2 CPUs, no GPU, never grows
    with pytest.raises(FlatRayError, match=r"cell llama2-7b-tofu_forget01-flat: one trial asks for 2 workers x "
                                           r"\(CPU 8, GPU 1, memory 78.3 GiB\) on one node \(STRICT_PACK\) but no "
                                           r"node type can ever hold it: node [\d.]+ \(CPU 2, memory"):
        check_sweep(space, None, shared, "http://head:5000")
    demo = load_space("demo")  # fits here: a local sweep runs what fits, with no multi-node requirement
    assert check_sweep(demo, None, None, "sqlite:///x.db") == {c.name: 1 for c in demo.cells}
    # joined to a cluster without an autoscaler (this Ray, 2 CPUs) where a trial fits: what fits, not every trial
    assert check_sweep(demo, "auto", None, "sqlite:///x.db") == {c.name: 1 for c in demo.cells}


def test_on_a_cluster_whose_autoscaler_names_its_node_types_concurrency_is_what_fits_its_largest_size(ray_local, tmp_path,
                                                                                                      monkeypatch):
    """Where the autoscaler has told Ray its node types (autoscaler v2, KubeRay), a cell runs as many trials as
    fit the cluster at its largest, and a trial that could never fit is refused before anything starts. The
    cluster config is written to this Ray's GCS as such an autoscaler would, and removed afterwards."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from flat_ray.launch.cluster import check_sweep
    from flat_ray.storage import Place

    monkeypatch.chdir(tmp_path)  # the work folder and the storage path on one filesystem
    shared = Place.of(tmp_path / "shared")

    config = autoscaler_pb2.ClusterConfig()
    head = config.node_group_configs.add(name="head", max_count=1)
    head.resources["CPU"], head.resources["memory"] = 8, 16 * GIB
    gpu = config.node_group_configs.add(name="gpu", max_count=3)  # 3 nodes of 16 CPUs, 2 GPUs, 200 GiB at most
    gpu.resources["CPU"], gpu.resources["GPU"], gpu.resources["memory"] = 16, 2, 200 * GIB
    key = (ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode(), ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode())
    internal_kv._internal_kv_put(key[1], config.SerializeToString(), namespace=key[0])
    try:
        tofu = load_space("tofu", check_files=False)  # each trial 2 x (8 CPU, 1 GPU) on one node: one per gpu node
        assert check_sweep(tofu, "auto", shared, "http://head:5000") == {c.name: 3 for c in tofu.cells}
        demo = load_space("demo")  # 2 x (0.99 CPU, 2 GiB) anywhere: 8 + 3 x 16 workers make 28 trials, though
        with pytest.raises(FlatRayError, match="cell demo-demo_forget10-flat waits for nodes the autoscaler adds"):
            check_sweep(demo, "auto", None, "sqlite:///x.db")  # only 1 fits this Ray now
        assert check_sweep(demo, "auto", shared, "http://head:5000") == {c.name: 28 for c in demo.cells}
        big = load_space("tofu", ["launch.num_workers=4"], check_files=False)  # 4 x (8 CPU, 1 GPU) on one node: never fits
        with pytest.raises(FlatRayError, match=r"one trial asks for 4 workers x \(CPU 8, GPU 1, memory 40.7 GiB\) "
                                               r"on one node \(STRICT_PACK\) but no node type can ever hold it: head "
                                               r"\(CPU 8, memory 16.0 GiB\); gpu \(CPU 16, GPU 2, memory 200.0 GiB\)"):
            check_sweep(big, "auto", shared, "http://head:5000")
    finally:
        internal_kv._internal_kv_del(key[1], namespace=key[0])
    assert check_sweep(demo, "auto", None, "sqlite:///x.db") == {c.name: 1 for c in demo.cells}


def test_trial_functions_are_pinned_to_the_head_node(ray_local):
    """The per-trial function asks for a sliver of the head-only resource, so it (and Ray Train's controller on its
    node) never lands on a GPU node; the resource name is one Ray really gives its head."""
    import ray

    from flat_ray.launch.tune import TRIAL_FN_RESOURCES

    assert TRIAL_FN_RESOURCES["node:__internal_head__"] > 0
    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])

    @ray.remote(num_cpus=TRIAL_FN_RESOURCES["CPU"],
                resources={k: v for k, v in TRIAL_FN_RESOURCES.items() if k != "CPU"})
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    assert ray.get(where.remote(), timeout=60) == head
