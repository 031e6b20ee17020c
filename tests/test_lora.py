"""LoRA's own promises, on the tiny model without Ray or DeepSpeed: the merge is PEFT's adapted model, the adapter
file loads with PEFT, bad target modules are refused in one line, and the memory plan, hint and cost count LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from flat_ray import lora
from flat_ray.config import load_config
from flat_ray.errors import FlatRayError
from flat_ray.memory import GIB, Arch, arch_for, fit_hint, host_plan, plan


def _adapted(path, cfg):
    """The tiny model with adapters whose B is not zero (a trained adapter's shape)."""
    model = lora.apply(AutoModelForCausalLM.from_pretrained(path), cfg)
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.05
    return model.eval()


def test_the_merge_and_the_adapter_file_give_pefts_adapted_model(tiny_model_dir, tmp_path):
    cfg = load_config(None, ["model.lora_rank=4", "model.lora_alpha=8"])
    model = _adapted(tiny_model_dir, cfg)
    trainable, total = lora.counts(model)
    arch = Arch.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    assert trainable == arch.adapter_params(4) and total == arch.params + trainable  # the plan's count is PEFT's
    assert all(p.requires_grad == lora.is_adapter_key(n) for n, p in model.named_parameters())
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():  # what NPO's and DPO's reference computes
            off = model(input_ids=ids).logits
        off_again = lora.AdapterOff(model)(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        assert torch.equal(off, base(input_ids=ids).logits) and torch.equal(off_again, off)
        assert not torch.allclose(adapted, off, atol=1e-3)

        # W + (alpha / rank) * B @ A, written by hand: the merged state dict gives the adapted model's logits
        base_state, adapter = lora.split_state(model.state_dict())
        name = next(n for n in adapter if ".lora_A." in n)
        weight_key = name.split(".lora_A.")[0].removeprefix(lora.PREFIX) + ".weight"
        by_hand = base_state[weight_key] + 2.0 * adapter[name.replace("lora_A", "lora_B")] @ adapter[name]
        merged = lora.merge(base_state, adapter, lora.scale_of(model))
        assert torch.equal(merged[weight_key], by_hand)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        assert not plain.load_state_dict(merged, strict=True).missing_keys
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)

        # the adapter alone, in PEFT's layout: PEFT loads it onto the base model and gives the same logits
        out = lora.save_adapter(tmp_path / "adapter", adapter, model.peft_config[lora.ADAPTER])
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
        assert torch.equal(loaded(input_ids=ids).logits, adapted)
        saved = json.loads((out / lora.ADAPTER_CONFIG).read_text())
        assert saved["r"] == 4 and saved["lora_alpha"] == 8 and sorted(saved["target_modules"]) == lora.linear_names(base)


def test_target_modules_the_model_lacks_are_refused_naming_the_ones_it_has(tiny_model_dir):
    cfg = load_config(None, ["model.lora_rank=8", "model.lora_target_modules=q_proj, c_attn"])
    with pytest.raises(FlatRayError) as err:
        lora.check_model(str(tiny_model_dir), cfg)  # the driver's preflight: built on the meta device, no weights
    assert str(err.value) == ("model.lora_target_modules names c_attn, which this model does not have; its linear "
                              "modules: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or all-linear)")
    lora.check_model(str(tiny_model_dir), load_config(None, ["model.lora_rank=8", "model.lora_target_modules=q_proj,v_proj"]))
    for bad, says in (("model.lora_rank=-1", "model.lora_rank must be >= 0"),
                      ("model.lora_dropout=1", "model.lora_dropout must be in [0, 1)"),
                      ("model.lora_target_modules=,", "must name at least one module")):
        with pytest.raises(FlatRayError, match=says.replace("[", r"\[").replace(")", r"\)")):
            load_config(None, [bad])


def _gpu(*extra: str):
    """One GPU, ZeRO-0, TOFU forget10 with the tofu spaces' sequence length and batch sizes."""
    return load_config(None, ["launch.num_workers=1", "launch.gpus_per_worker=1", "deepspeed.stage=0",
                              "data.benchmark=tofu", "data.split=forget10", "data.max_length=500",
                              "optim.micro_batch_size=4", "eval.batch_size=16", *extra])


def test_the_memory_plan_counts_a_frozen_base_and_trainable_adapters():
    """7B Llama-2 (TOFU's), bf16, one GPU: full fine-tuning holds gradients and AdamW state for 6.7B parameters;
    LoRA rank 8 on every linear layer holds them for 20.0M (32 layers x 8 x (4 x 8192 + 3 x 15104)), no NPO
    reference model, and fits a 24 GB A10G with gradient checkpointing, which the hint proposes."""
    arch = arch_for("NousResearch/Llama-2-7b-chat-hf")
    adapters = 32 * 8 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert arch.adapter_params(8) == adapters == 19_988_480
    full, adapted = plan(_gpu("method.name=npo"), arch), plan(_gpu("method.name=npo", "model.lora_rank=8"), arch)
    assert full.parts["gradients"] == 2 * arch.params and adapted.parts["gradients"] == 2 * adapters
    assert adapted.parts["optimizer"] == 12 * adapters and adapted.parts["weights"] == 2 * (arch.params + adapters)
    assert full.parts["reference model"] == 2 * arch.params and not adapted.parts.get("reference model")
    assert full.parts["activations"] == adapted.parts["activations"]  # LoRA does not shrink them
    # stage 0 on one GPU: no offload applies, so no full-fine-tune knob fits 7B in 24 GB; LoRA does
    assert fit_hint(_gpu(), arch, 24 * GIB) == ("set model.lora_rank=8, model.gradient_checkpointing=true (LoRA: "
                                                "the base weights stay frozen)")
    assert fit_hint(_gpu("model.lora_rank=8", "model.gradient_checkpointing=true"), arch, 24 * GIB) is None
    host = host_plan(_gpu("deepspeed.stage=2", "deepspeed.offload_optimizer=true", "model.lora_rank=8"), arch)
    assert host.parts["offloaded optimizer"] == 16 * adapters


def test_the_cost_of_a_lora_step_has_no_weight_gradients():
    from flat_ray.cost import trial_cost

    full = trial_cost(_gpu("eval.enabled=false"), 1000, 10, 100, True, {})
    adapted = trial_cost(_gpu("eval.enabled=false", "model.lora_rank=8"), 1000, 10, 100, True, {})
    assert adapted.train_flops / full.train_flops == pytest.approx(4 / 6)


