"""The per-GPU memory plan: parameter counts, the ZeRO arithmetic by hand, the knobs it names, the cluster's GPU
memory, and the refusal of a run or sweep that cannot fit before anything starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flat_ray.config import load_config
from flat_ray.errors import FlatRayError
from flat_ray.memory import GIB, KNOWN, Arch, arch_for, check_fits, fit_hint, host_plan, plan
from flat_ray.placement import gpu_memory_gib

ROOT = Path(__file__).resolve().parents[1]
LLAMA = KNOWN["locuslab/tofu_ft_llama2-7b"]


def test_parameter_counts_match_the_models():
    assert LLAMA.params == 6_738_415_616  # Llama-2-7b's published count
    # phi-1.5: 1,418,270,720 with its biases, which the plan leaves out (0.03%)
    assert KNOWN["locuslab/tofu_ft_phi-1.5"].params == pytest.approx(1_418_270_720, rel=1e-3)


def test_a_local_models_architecture_comes_from_its_config(tiny, tiny_model_dir):
    arch = arch_for(str(tiny_model_dir))
    assert arch == Arch.from_config(tiny[0].config.to_dict())
    assert arch.params == sum(p.numel() for p in tiny[0].parameters())


def test_model_trainable_counts_the_parameters_it_names(tiny):
    """Llama-style names and sizes are the real model's; the plan's gradients and optimizer state follow
    model.trainable (WMDP's RMU on zephyr-7b: three down_proj matrices), all parameters where it names none."""
    assert dict(arch_for_model(tiny[0]).named_params()) == {n: p.numel() for n, p in tiny[0].named_parameters()}
    zephyr = KNOWN["HuggingFaceH4/zephyr-7b-beta"]
    assert sum(n for _, n in zephyr.named_params()) == zephyr.params
    wmdp = r"model\.layers\.[5-7]\.mlp\.down_proj\.weight"
    got = plan(_cfg("deepspeed.stage=3", "launch.num_workers=2", f"model.trainable={wmdp}"), zephyr).parts
    assert got["optimizer"] == 3 * 4096 * 14336 * 12 / 2 and got["gradients"] == 3 * 4096 * 14336 * 2 / 2
    phi_names = plan(_cfg("deepspeed.stage=3", "launch.num_workers=2", "model.trainable=.*dense.*"), zephyr).parts
    assert phi_names["optimizer"] == zephyr.params * 12 / 2  # no Llama-style name matches: the upper bound


def arch_for_model(model) -> Arch:
    return Arch.from_config(model.config.to_dict())


def _cfg(*overrides: str):
    return load_config(None, ["model.name_or_path=tiny", "launch.gpus_per_worker=1", "data.max_length=500",
                              "optim.micro_batch_size=4", "eval.batch_size=16", "eval.max_new_tokens=200",
                              "deepspeed.precision=bf16", *overrides], presets=["demo"])


def test_zero3_on_two_ranks_by_hand():
    p, h, layers, vocab = LLAMA.params, 4096, 32, 32000
    got = plan(_cfg("deepspeed.stage=3", "launch.num_workers=2"), LLAMA).parts
    assert got["weights"] == p * 2 / 2 and got["gradients"] == p * 2 / 2
    assert got["optimizer"] == p * 12 / 2  # fp32 master + m + v, sharded
    assert got["gathered (ZeRO-3)"] == 1e9 * 2
    tokens = 4 * 2 * 500  # FLAT: forget and template sequences of every example in one forward
    assert got["activations"] == layers * 34 * tokens * h
    assert got["logits"] == 2 * tokens * vocab * 2
    assert got["eval KV cache"] == 2 * layers * 16 * 700 * h * 2
    # about 56 GB of weights, gradients and optimizer state per GPU: what a 24 GB A10G cannot hold
    assert (got["weights"] + got["gradients"] + got["optimizer"]) / 1e9 == pytest.approx(53.9, abs=0.1)


def test_each_knob_moves_its_own_part():
    base = plan(_cfg("deepspeed.stage=3", "launch.num_workers=2"), LLAMA).parts
    off = plan(_cfg("deepspeed.stage=3", "launch.num_workers=2", "deepspeed.offload_optimizer=true",
                    "deepspeed.offload_params=true"), LLAMA).parts
    assert off["optimizer"] == 0 and off["weights"] == 0 and off["gradients"] == base["gradients"]
    ckpt = plan(_cfg("model.gradient_checkpointing=true"), LLAMA).parts
    tokens = 4 * 2 * 500
    assert ckpt["activations"] == 32 * tokens * 4096 * 2 + 34 * tokens * 4096  # layer inputs + one layer
    stage0 = plan(_cfg("deepspeed.stage=0", "launch.num_workers=4"), LLAMA).parts
    assert stage0["optimizer"] == LLAMA.params * 12 and stage0["gathered (ZeRO-3)"] == 0  # nothing sharded
    npo = plan(_cfg("method.name=npo", "deepspeed.stage=3", "launch.num_workers=2"), LLAMA).parts
    assert npo["reference model"] == LLAMA.params * 2 / 2
    assert npo["activations"] == 32 * 34 * (4 * 2 * 500) * 4096  # forget + retain sequences
    # UNDIAL: the reference model too, and its forget logits with the fp32 target built from them; no retain batch
    undial = plan(_cfg("method.name=undial", "deepspeed.stage=3", "launch.num_workers=2"), LLAMA)
    assert undial.parts["reference model"] == npo["reference model"] and "reference logits" not in npo
    assert undial.parts["reference logits"] == 4 * 500 * 32000 * (2 + 4)
    assert undial.parts["activations"] == 32 * 34 * (4 * 1 * 500) * 4096
    assert undial.train == pytest.approx(sum(undial.parts[k] for k in (
        "weights", "gradients", "optimizer", "gathered (ZeRO-3)", "CUDA context", "reference model", "activations",
        "logits", "reference logits")))


def test_the_hint_names_the_cheapest_knobs_that_fit():
    cfg = _cfg("deepspeed.stage=3", "launch.num_workers=2")
    assert fit_hint(cfg, LLAMA, 80 * GIB) is None
    hint = fit_hint(cfg, LLAMA, 24 * GIB)
    assert hint == "set model.gradient_checkpointing=true, deepspeed.offload_optimizer=true"
    fixed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=True),
                                deepspeed=dataclasses.replace(cfg.deepspeed, offload_optimizer=True))
    assert plan(fixed, LLAMA).peak <= 24 * GIB
    assert "does not fit even with every memory knob" in fit_hint(cfg, LLAMA, 4 * GIB)


def test_gpu_memory_is_a_number_or_the_smallest_gpu_of_the_cluster(tmp_path):
    assert gpu_memory_gib("40") == 40.0
    assert gpu_memory_gib(str(ROOT / "cluster.yaml")) == 24.0  # A10G nodes next to A100 ones
    bad = tmp_path / "c.yaml"
    bad.write_text("available_node_types:\n  gpu: {resources: {GPU: 1}, node_config: {InstanceType: x9.large}}\n")
    with pytest.raises(FlatRayError, match="x9.large.*pass --gpu-memory GIB"):
        gpu_memory_gib(str(bad))
    with pytest.raises(FlatRayError, match="neither a number of GiB nor a cluster YAML"):
        gpu_memory_gib("lots")


def test_runs_that_cannot_fit_are_refused_with_the_knob():
    from flat_ray.sweep import load_space

    space = load_space("tofu", ["model.gradient_checkpointing=false", "deepspeed.offload_optimizer=false"], check_files=False)
    with pytest.raises(FlatRayError, match=r"cell llama2-7b-tofu_forget01-flat needs about 70.\d GiB per GPU at its "
                                           r"peak of training, the GPUs have 24 GiB: set model.gradient_checkpointing"):
        check_fits([(f"cell {c.name}", c.config) for c in space.cells], 24)
    check_fits([(f"cell {c.name}", c.config) for c in load_space("tofu", check_files=False).cells], 24)  # as shipped: fits
    check_fits([("run", _cfg("launch.gpus_per_worker=0"))], 0.5)  # a CPU run is not a GPU's business


@pytest.mark.parametrize("name", ["tofu", "tofu_lora", "tofu_baselines", "muse", "wmdp"])
def test_shipped_gpu_spaces_fit_the_clusters_gpus(name, capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["tune", "--space", name, "--dry-run", "--gpu-memory", str(ROOT / "cluster.yaml")])
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    header, *lines = out.splitlines()[1:]
    assert header.split()[-6:] == ["host", "GiB/trial", "concurrent", "GiB/GPU", "fits", "node", "type"][-6:] or \
        header.split()[-7:] == ["host", "GiB/trial", "concurrent", "GiB/GPU", "fits", "node", "type"], header
    rows = [line.split() for line in lines if line.startswith(("llama", "phi", "news", "zephyr"))]
    # every cell fits the GPUs of the node type it lands on (A10G: the smallest GPU), its host memory included
    assert rows and all(row[-2] == "yes" and row[-1].startswith("gpu_") for row in rows), out
    assert sum(" -> gpu_" in line for line in lines) == len(rows), out
    if name == "tofu_lora":  # LoRA: a 7B trial on one worker with one 24 GB A10G (workers, cpus/trial, gpus/trial)
        llama = [row for row in rows if row[0].startswith("llama2-7b")]
        assert llama and all(row[-9:-6] == ["1", "8.01", "1"] and float(row[-3]) <= 24 for row in llama), out


def test_train_dry_run_prints_the_plan_and_what_would_make_it_fit(tmp_path, capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--dry-run", "--gpu-memory", "0.5", "model.name_or_path=tiny", f"paths.workdir={tmp_path}"])
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    assert "memory plan per GPU" in out and "peak of training" in out
    assert "does not fit in 0.5 GiB: it does not fit even with every memory knob" in out


def test_gradient_checkpointing_changes_memory_not_results(tiny_model_dir):
    """The same run replayed with and without recomputation in backward gives the same numbers."""
    from flat_ray.engine.replica import replay

    common = ["optim.epochs=1", "optim.lr=3e-3", "eval.max_examples=4", "eval.max_new_tokens=4",
              "data.max_length=64"]
    plain = replay(load_config(None, common, presets=["demo"]), str(tiny_model_dir))
    ckpt = replay(load_config(None, [*common, "model.gradient_checkpointing=true"], presets=["demo"]),
                  str(tiny_model_dir))
    assert plain["after"]["forget_prob"] != plain["before"]["forget_prob"]  # it trained
    assert ckpt["after"] == pytest.approx(plain["after"], abs=1e-6)


def test_host_plan_of_an_offloaded_7b_trial_equals_deepspeeds_estimator():
    """Host memory per rank: the process, and with optimizer offload 16 bytes per parameter (fp32 master weights,
    Adam m and v, fp32 gradients) sharded over the ranks, times DeepSpeed's 1.5 allowance for pinned buffers. Over
    a node's ranks that is exactly DeepSpeed's own estimate for ZeRO-3 with the optimizer on CPU."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg = _cfg("deepspeed.offload_optimizer=true", "model.gradient_checkpointing=true")  # 2 GPU ranks, ZeRO-3
    host = host_plan(cfg, LLAMA)
    states = host.parts["offloaded optimizer"] + host.parts["pinned buffers"]
    assert host.parts["offloaded optimizer"] == 16 * LLAMA.params / 2
    cpu, _, _ = estimate_zero3_model_states_mem_needs(LLAMA.params, 0, num_gpus_per_node=2, num_nodes=1,
                                                   cpu_offload=True, cpu_offload_params=False, zero_init=True,
                                                   additional_buffer_factor=1.5)
    assert 2 * states == pytest.approx(cpu, rel=1e-9)
    assert host.parts["process"] == 3 * GIB  # 2 GiB of Python and libraries + 1 GiB of CUDA's host side
    assert host.peak == host.train == host.parts["process"] + states  # loading one 5 GB shard comes before
    assert 2 * host.peak / GIB == pytest.approx(156.6, abs=0.1)  # what one tofu llama2-7b trial asks Ray for
    # no offload, ZeRO-2: every rank loads the whole 16-bit model before DeepSpeed moves it to its GPU
    flat = host_plan(_cfg("deepspeed.stage=2"), LLAMA)
    assert flat.evaluate == flat.parts["process"] + 2 * LLAMA.params and flat.peak == flat.evaluate
    assert host_plan(_cfg(), None).peak == 3 * GIB  # an unknown architecture: the process alone
