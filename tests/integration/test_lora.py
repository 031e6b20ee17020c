"""A LoRA run for real: NPO (which needs a frozen reference) with LoRA adapters on the tiny model, 2 Ray Train
workers under DeepSpeed ZeRO-3 with gradient checkpointing, checkpoints kept; then `flat-ray export` of its adapter
and its merged model from a checkpoint. One run checks everything the issue promised."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flat_ray import lora, tracking
from flat_ray.config import load_config
from flat_ray.launch.driver import run_training, storage_root
from tests.test_cli import run_main

pytestmark = pytest.mark.slow
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def lora_run(ray_local, base):
    cfg = load_config(None, [*base, "method.name=npo", "deepspeed.stage=3", "launch.num_workers=2",
                             "model.gradient_checkpointing=true", f"model.lora_rank={RANK}", f"model.lora_alpha={ALPHA}",
                             "model.lora_dropout=0", "optim.lr=2e-2", "launch.keep_checkpoints=2",
                             "tracking.run_name=lora"])
    return cfg, run_training(cfg)


def test_a_lora_run_trains_the_adapter_only_and_exports_the_merged_model(lora_run, zero3, tiny_model_dir, tmp_path,
                                                                         capsys):
    cfg, res = lora_run
    run = tracking.run_data(res.mlflow_uri, res.run_id)
    params = run.data.params
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    adapters = sum(p.numel() for n, p in lora.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
                   .named_parameters() if lora.is_adapter_key(n))
    assert run.info.status == "FINISHED"
    assert params["resolved.trainable_params"] == str(adapters) and params["model.lora_rank"] == str(RANK)
    assert int(params["resolved.params"]) == sum(p.numel() for p in original.parameters()) + adapters
    # NPO's reference is the model with its adapter switched off: each rank loaded the weights once
    assert params["resolved.model_loads"] == "1"
    assert "LoRA rank 4 on all-linear" in run.data.tags["mlflow.note.content"]
    # before training B is zero: the evaluation (under ZeRO-3 from a gathered copy with the adapter merged) is the
    # original model's, as the full fine-tune of the shared ZeRO-3 run evaluated it; after training it moved
    _, full = zero3
    for key in ("eval/forget_prob", "eval/retain_prob"):
        ours, theirs = (dict(tracking.metric_history(r.mlflow_uri, r.run_id, key)) for r in (res, full))
        assert ours[0] == pytest.approx(theirs[0], rel=1e-6) and ours[2] != pytest.approx(ours[0], rel=1e-3), key

    # a checkpoint is the adapter and its optimizer state: far less than the model's own fp32 weights
    model_mb = sum(p.numel() * 4 for p in original.parameters()) / 2**20
    written = [v for _, v in tracking.metric_history(res.mlflow_uri, res.run_id, "checkpoint_mb")]
    assert written and all(mb < model_mb / 2 for mb in written), (written, model_mb)

    # the end-of-run export: the base model with the adapter merged, and the adapter alone beside it
    merged = load_file(res.model_dir / "model.safetensors")
    adapter = load_file(res.model_dir / "adapter" / lora.ADAPTER_FILE)
    assert all(t.abs().max() > 0 for n, t in adapter.items() if ".lora_B." in n)  # every B moved from zero
    plain = dict(original.named_parameters())
    adapted = {k for k in merged if any(k == n.split(".lora_A.")[0].removeprefix(lora.PREFIX) + ".weight"
                                        for n in adapter)}
    assert adapted and all(torch.equal(merged[k], plain[k].data) for k in merged if k not in adapted)
    assert all(not torch.equal(merged[k], plain[k].data) for k in adapted)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                 res.model_dir / "adapter").eval()(input_ids=ids).logits
        exported = AutoModelForCausalLM.from_pretrained(res.model_dir).eval()(input_ids=ids).logits
    torch.testing.assert_close(exported, with_adapter, atol=1e-5, rtol=1e-5)

    # from the last checkpoint: the merge onto the base weights read from disk is the workers' merge onto the
    # weights they trained with, bit for bit (every base weight stayed as it was); --adapter writes the adapter only
    work = f"paths.workdir={cfg.paths.workdir}"
    code, out, err = run_main(["export", "lora", work, "--epoch", "last", "--out", str(tmp_path / "merged")], capsys)
    assert code == 0 and "exported epoch 2 of lora" in out, err
    again = load_file(tmp_path / "merged" / "model.safetensors")
    assert again.keys() == merged.keys() and all(torch.equal(again[k], merged[k]) for k in merged)
    assert (tmp_path / "merged" / "adapter" / lora.ADAPTER_CONFIG).is_file()
    code, out, err = run_main(["export", "lora", work, "--epoch", "last", "--adapter"], capsys)
    alone = res.model_dir.parent / "adapter-epoch2"
    assert code == 0 and f"to {alone}" in out, err
    assert sorted(p.name for p in alone.iterdir()) == [lora.ADAPTER_CONFIG, lora.ADAPTER_FILE]
    assert all(torch.equal(t, adapter[k]) for k, t in load_file(alone / lora.ADAPTER_FILE).items())
    config = json.loads((alone / lora.ADAPTER_CONFIG).read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and config["base_model_name_or_path"] == str(tiny_model_dir)
    assert tracking.run_data(res.mlflow_uri, res.run_id).data.tags["adapter_dir"] == str(alone)
    assert storage_root(cfg).local.joinpath("lora").is_dir()


def test_a_lora_run_from_its_checkpoint_ends_where_the_uninterrupted_run_ends(lora_run, base):
    """A new run started from the epoch-1 checkpoint (the adapter and its optimizer state; the base weights come
    from the model, as at any start) trains epoch 2 to the same losses and the same adapter."""
    cfg, res = lora_run
    first = sorted(p for p in (storage_root(cfg).local / "lora").glob("checkpoint_*") if p.is_dir())[0]
    again = load_config(None, [*base, "method.name=npo", "deepspeed.stage=3", "launch.num_workers=2",
                               "model.gradient_checkpointing=true", f"model.lora_rank={RANK}",
                               f"model.lora_alpha={ALPHA}", "model.lora_dropout=0", "optim.lr=2e-2",
                               "eval.enabled=false", "tracking.run_name=lora-from-epoch1"])
    resumed = run_training(again, resume_from=str(first))
    full, part = ([v for _, v in tracking.metric_history(r.mlflow_uri, r.run_id, "train/loss")] for r in (res, resumed))
    assert len(full) == 6 and len(part) == 3 and part == pytest.approx(full[3:], abs=2e-5)
    a, b = (load_file(r.model_dir / "adapter" / lora.ADAPTER_FILE) for r in (res, resumed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
