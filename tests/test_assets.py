"""flat_ray.assets: where the demo's models are cached and what their cache keys follow."""

from __future__ import annotations

from flat_ray.config import load_config


def test_demo_original_cache_key_follows_its_inputs(tmp_path):
    from flat_ray.assets import demo_finetune_config, demo_original_path
    from flat_ray.config import MethodConfig

    a = load_config(None, [f"paths.workdir={tmp_path}"], presets=["demo"])
    b = load_config(None, [f"paths.workdir={tmp_path}", "launch.num_workers=1"], presets=["demo"])
    c = load_config(None, [f"paths.workdir={tmp_path}", "optim.lr=1e-5"], presets=["demo"])
    d = load_config(None, [f"paths.workdir={tmp_path}", "method.divergence=tv", "method.beta=0.5"], presets=["demo"])
    e = load_config(None, [f"paths.workdir={tmp_path}", "deepspeed.stage=2"], presets=["demo"])
    f = load_config(None, [f"paths.workdir={tmp_path}", "deepspeed.precision=bf16"], presets=["demo"])
    assert demo_original_path(a) != demo_original_path(b)  # another world size makes a different original
    assert demo_original_path(a) != demo_original_path(f)  # and another precision
    # the recipe's ZeRO stage is its own (0), whatever stage the unlearning run uses
    assert demo_original_path(a) == demo_original_path(e) and demo_finetune_config(e).deepspeed.stage == 0
    # neither the unlearning lr nor the unlearning method's knobs touch the original (it is fine-tuned, sft)
    assert demo_original_path(a) == demo_original_path(c) == demo_original_path(d)
    assert demo_finetune_config(a).method == MethodConfig(name="sft")  # not the demo preset's divergence


def test_a_recipe_cache_key_reads_only_the_knobs_its_method_reads(tmp_path):
    """A knob added to the method section for another method (as each new baseline adds its own) leaves a cached
    original or retain model where it was: the key holds the fine-tune's method name and the knobs it lists."""
    import dataclasses

    from flat_ray.assets import _recipe_path, demo_finetune_config

    ft = demo_finetune_config(load_config(None, [f"paths.workdir={tmp_path}"], presets=["demo"]))
    other = dataclasses.replace(ft, method=dataclasses.replace(ft.method, wga_beta=3.0, undial_beta=2.0))
    assert _recipe_path(ft, "original") == _recipe_path(other, "original")
    flat = dataclasses.replace(ft, method=dataclasses.replace(ft.method, name="flat"))
    js = dataclasses.replace(flat, method=dataclasses.replace(flat.method, divergence="jensen_shannon"))
    assert _recipe_path(flat, "original") != _recipe_path(js, "original")  # a knob flat reads


def test_a_training_code_change_rebuilds_cached_models(tmp_path, monkeypatch):
    """A model built by older training code (another warm-up, another encoding) is not reused: the cache key holds
    assets.TRAINING_CODE."""
    from flat_ray import assets

    ft = assets.demo_finetune_config(load_config(None, [f"paths.workdir={tmp_path}"], presets=["demo"]))
    now = assets._recipe_path(ft, "original")
    monkeypatch.setattr(assets, "TRAINING_CODE", assets.TRAINING_CODE - 1)
    assert assets._recipe_path(ft, "original") != now and now.parent == assets._recipe_path(ft, "original").parent
