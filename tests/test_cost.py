"""The dry run's cost estimate: counted FLOPs by hand, GPU-hours at the stated MFU, prices per node type."""

from __future__ import annotations

import pytest

from cli.main import main
from flat_ray.config import load_config
from flat_ray.cost import MFU, PEAK_TFLOPS, estimate, read_prices, trial_cost
from flat_ray.errors import FlatRayError
from flat_ray.placement import node_types_from_yaml
from tests.test_sweep import ROOT

BASE = ["optim.epochs=2", "eval.every_epochs=1", "eval.interim_examples=null", "eval.max_new_tokens=10",
        "model.gradient_checkpointing=false"]


def test_flat_trial_by_hand():
    """10 forget examples of 20 tokens, 1000 parameters, 2 epochs, evaluations before and after each epoch."""
    cfg = load_config(None, BASE)
    got = trial_cost(cfg, params=1000, examples=10, tokens=20, exact=True, eval_questions={"forget": 4, "retain": 6})
    # training: FLAT runs the forget and the template sequence of each example, forward and backward (6 N per token)
    assert got.train_flops == 10 * 2 * 20 * 2 * 6 * 1000
    # each of 3 evaluations: per question the answer, the paraphrase and 5 perturbed answers scored, then the prompt
    # and 10 new tokens generated, 2 N per token
    per_eval = (4 * 7 * 20 + 4 * (20 + 10)) + (6 * 7 * 20 + 6 * (20 + 10))
    assert got.original_flops == per_eval * 2 * 1000 and got.eval_flops == 2 * per_eval * 2 * 1000
    total = got.train_flops + 3 * per_eval * 2 * 1000
    assert got.gpu_hours("A100") == pytest.approx(total / (312e12 * MFU) / 3600)
    # a cell of 4 trials that shares its original's evaluation pays for it once
    shared = 4 * (got.train_flops + 2 * per_eval * 2 * 1000) + per_eval * 2 * 1000
    assert got.cell_gpu_hours(4, "A100", True) == pytest.approx(shared / (312e12 * MFU) / 3600)
    assert got.cell_gpu_hours(4, "A100", False) == pytest.approx(4 * got.gpu_hours("A100"))
    with pytest.raises(FlatRayError, match="no peak FLOP/s known for GPU type V100; known: H100"):
        got.gpu_hours("V100")


def test_recomputation_reference_models_and_interim_evaluations():
    ckpt = trial_cost(load_config(None, [*BASE, "model.gradient_checkpointing=true"]), 1000, 10, 20, True, {})
    assert ckpt.train_flops == 10 * 2 * 20 * 2 * 8 * 1000  # the forward again in backward: 8 N per token
    # NPO trains on forget and retain sequences and runs the frozen reference on the forget ones
    npo = trial_cost(load_config(None, [*BASE, "method.name=npo"]), 1000, 10, 20, True, {})
    assert npo.train_flops == 10 * 2 * 20 * 2 * 6 * 1000 + 10 * 1 * 20 * 2 * 2 * 1000
    alone = trial_cost(load_config(None, [*BASE, "method.name=npo", "method.retain_weight=0"]), 1000, 10, 20, True, {})
    assert alone.train_flops == 10 * 1 * 20 * 2 * 6 * 1000 + 10 * 1 * 20 * 2 * 2 * 1000  # no retain batch at 0
    # DPO: forget, template and retain trained; the reference on both answers
    dpo = trial_cost(load_config(None, [*BASE, "method.name=dpo"]), 1000, 10, 20, True, {})
    assert dpo.train_flops == 10 * 3 * 20 * 2 * 6 * 1000 + 10 * 2 * 20 * 2 * 2 * 1000
    cheap = trial_cost(load_config(None, [*BASE, "optim.epochs=3", "eval.interim_examples=1"]), 1000, 10, 20, True,
                       {"forget": 4})
    # 4 questions before and after the last epoch, 1 after epochs 1 and 2
    assert cheap.original_flops + cheap.eval_flops == (4 + 1 + 1 + 4) * (7 * 20 + 30) * 2 * 1000


def test_tofu_without_its_data_here_is_an_upper_bound_at_max_length():
    cfg = load_config(None, ["data.benchmark=tofu", "data.split=forget05", "model.name_or_path=locuslab/tofu_ft_phi-1.5",
                             "eval.max_examples=300", "data.max_length=500"])
    got = estimate(cfg)
    assert got is not None and not got.exact and got.tokens_per_sequence == 500
    # 200 forget examples (TOFU's forget05); evaluation on 200 forget, 300 of 400 retain, 100 and 117 questions
    from flat_ray.memory import arch_for

    n = arch_for("locuslab/tofu_ft_phi-1.5").params
    assert got.train_flops == trial_cost(cfg, n, 200, 500, False, {}).train_flops
    expected = trial_cost(cfg, n, 200, 500, False, {"forget": 200, "retain": 300, "real_authors": 100,
                                                    "world_facts": 117})
    assert (got.eval_flops, got.original_flops) == (expected.eval_flops, expected.original_flops)
    assert estimate(load_config(None, ["model.name_or_path=tiny"])) is None  # no size known for it


def test_prices_per_node_type_and_bad_tables(tmp_path, monkeypatch, capsys):
    nodes = node_types_from_yaml(ROOT / "cluster.yaml")
    good = tmp_path / "prices.yaml"
    good.write_text("gpu_a10g_x8: 16.288\n")
    assert read_prices(str(good), nodes) == {"gpu_a10g_x8": 16.288}
    bad = tmp_path / "bad.yaml"
    bad.write_text("p5_48xlarge: 98.3\n")
    with pytest.raises(FlatRayError, match=r"unknown node type 'p5_48xlarge'; the cluster's node types: head_cpu, gpu_a10g_x8"):
        read_prices(str(bad), nodes)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--space", "tofu", "--dry-run", "--gpu-memory", str(ROOT / "cluster.yaml"), "--prices",
              str(good)])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("  cell phi-1.5-tofu_forget01-flat: 8 trials")]
    assert "GPU-h on A10G, the original evaluated once = <= " in line and "at $16.288/h per gpu_a10g_x8 node" in line
    hours = float(line.split(" = <= ")[1].split(" GPU-h")[0])
    dollars = float(line.split(", <= $")[1].split(" at ")[0].replace(",", ""))
    assert dollars == pytest.approx(hours * 16.288 / 8, abs=1)  # a node's price shared by its 8 GPUs
    assert any(x.startswith("  total: <= ") and ", <= $" in x for x in out.splitlines())
    assert PEAK_TFLOPS["A10G"] < PEAK_TFLOPS["A10"]
    for argv, message in ((["--prices", str(bad), "--gpu-memory", str(ROOT / "cluster.yaml")], "unknown node type"),
                          (["--prices", str(good)], "--prices needs --gpu-memory CLUSTER.yaml")):
        with pytest.raises(SystemExit) as exit_info:
            main(["tune", "--space", "tofu", "--dry-run", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "prices.yaml"]  # nothing written


def test_with_the_data_and_tokenizer_here_the_tokens_are_counted(tiny_model_dir):
    from transformers import AutoTokenizer

    from flat_ray.data import load_split
    from flat_ray.pipeline import profile_for

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "data.split=forget05", "data.max_length=64"])
    got = estimate(cfg)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    profile = profile_for(cfg, str(tiny_model_dir), tok)
    rows = load_split("demo", "forget05", None)
    counts = [min(len(tok(profile.prompt(r["question"], tok) + " " + r["answer"])["input_ids"]), 64) for r in rows]
    assert got.exact and got.tokens_per_sequence == pytest.approx(sum(counts) / len(counts))
    assert got.tokens_per_sequence < 64  # the bound would have said 64


def test_a_retain_model_built_by_a_recipe_is_counted_once_per_model_and_split(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--space", "tofu_baselines", "--dry-run", "--gpu-memory", str(ROOT / "cluster.yaml"),
              "eval.reference=auto", "eval.retain_recipe=tofu_finetune_llama2-7b"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    built = [x for x in out.splitlines() if x.startswith("  retain model of cell")]
    # seven method cells, two engine settings (NPO and DPO offload their weights): two retain models
    assert len(built) == 2 and all("NousResearch/Llama-2-7b-chat-hf fine-tuned on retain95 by "
                                   "tofu_finetune_llama2-7b, built once): <= " in x for x in built)
    assert "built: NousResearch/Llama-2-7b-chat-hf fine-tuned on retain95 by tofu_finetune_llama2-7b" in out


def test_a_cell_without_a_cost_says_what_is_unknown(tmp_path, monkeypatch):
    """The muse space's model is a known 7B: what it lacks here is the forget set (MUSE's data is not on this
    machine); a model of unknown size says so."""
    from flat_ray.cost import cost_lines
    from flat_ray.sweep import load_space

    monkeypatch.chdir(tmp_path)
    cluster = node_types_from_yaml(ROOT / "cluster.yaml")
    lines = cost_lines(load_space("muse", check_files=False), cluster, None)
    assert "? GPU-hours (forget-set size unknown here: pass data.data_dir with the benchmark's files)" in lines[1]
    unknown = load_space("muse", ["model.name_or_path=org/unheard-of"], check_files=False)
    assert "? GPU-hours (model size unknown here)" in cost_lines(unknown, cluster, None)[1]
