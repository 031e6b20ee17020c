"""Pure pieces of the engine: schedule math, the DeepSpeed config dict, evaluation sharding."""

from __future__ import annotations

import pytest

from flat_ray.config import load_config
from flat_ray.eval.runner import rouge_l_recall, shard
from flat_ray.schedule import lr_multiplier, micro_batches_per_epoch, optimizer_steps, warmup_steps


def test_schedule_warmup_then_decay():
    total, warm = 10, 2
    linear = [lr_multiplier(s, total, warm, "linear") for s in range(total)]
    assert linear[:2] == pytest.approx([0, 1 / 2]) and linear[2] == 1.0
    # transformers' get_linear_schedule_with_warmup (TOFU's, FLAT's Trainer), written out: the LambdaLR factor of
    # the optimizer step that has `s` steps before it
    for n, w in ((6, 1), (31, 6), (62, 12), (12, 1)):  # TOFU forget01/05/10 and the demo's FLAT run
        hf = [s / max(1, w) if s < w else max(0.0, (n - s) / max(1, n - w)) for s in range(n)]
        assert [lr_multiplier(s, n, w, "linear") for s in range(n)] == pytest.approx(hf)
    assert all(a > b for a, b in zip(linear[2:], linear[3:], strict=False)) and linear[-1] == pytest.approx(1 / 8)
    assert [lr_multiplier(s, total, warm, "constant") for s in range(2, total)] == [1.0] * 8
    cosine = [lr_multiplier(s, total, warm, "cosine") for s in range(2, total)]
    assert cosine[0] == 1.0 and cosine[4] == pytest.approx(0.5)
    assert micro_batches_per_epoch(10, 2, 2) == 3 and micro_batches_per_epoch(8, 2, 2) == 2
    # 3 micro-batches per epoch, 2 epochs: windows of 2 carry over the epoch boundary; a last partial one never steps
    assert [optimizer_steps(3, 2, k) for k in (1, 2, 3, 4, 7)] == [6, 3, 2, 1, 0]
    assert warmup_steps(25, 0.2) == 5


def test_deepspeed_config_is_explicit():
    from flat_ray.engine.ds import build_config

    cfg = load_config(None, ["optim.micro_batch_size=3", "optim.grad_accum_steps=4", "deepspeed.stage=3",
                             "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true", "optim.max_grad_norm=0.5"])
    d = build_config(cfg, world_size=2)
    assert d["train_batch_size"] == 24 and d["train_micro_batch_size_per_gpu"] == 3 and d["gradient_accumulation_steps"] == 4
    assert d["zero_optimization"]["stage"] == 3 and d["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert d["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and d["gradient_clipping"] == 0.5
    assert d["bf16"]["enabled"] is False  # auto precision on this CPU machine
    assert d["optimizer"]["params"]["torch_adam"] is False  # offloaded optimizer steps need DeepSpeed's CPU Adam
    assert "auto" not in repr(d)
    plain = build_config(load_config(None, ["deepspeed.stage=2"]), world_size=1)
    assert "offload_optimizer" not in plain["zero_optimization"] and plain["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize(("n", "world"), [(10, 1), (10, 2), (7, 2), (5, 3), (2, 4)])
def test_eval_shards_cover_every_item_once_with_equal_lengths(n, world):
    seen = []
    lengths = set()
    for rank in range(world):
        idx, w = shard(n, rank, world)
        lengths.add(len(idx))
        seen += [i for i, weight in zip(idx, w, strict=True) if weight]
    assert sorted(seen) == list(range(n)) and len(lengths) == 1


def test_rouge_l_recall_uses_the_stemmer():
    assert rouge_l_recall("the authors write novels", "the author writes novels") == pytest.approx(1.0)
    assert rouge_l_recall("nothing", "the author was born in Osaka") == 0.0


def test_the_workers_model_load_passes_the_pinned_revision(tiny_model_dir, monkeypatch):
    """model.revision reaches the training workers' load (a hub model pinned to a revision trains on it)."""
    import transformers

    from flat_ray.engine import ds

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def recording(path, *args, **kwargs):
        seen.append(kwargs.get("revision"))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    config = {"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    ds.load_model(str(tiny_model_dir), config, revision="v1.2")
    assert seen == ["v1.2"]


@pytest.mark.slow
def test_the_dry_runs_step_count_is_what_the_real_run_took(zero3):
    """The dry run's optimizer steps equal the steps a real run logs. Accumulation 1 here (the shared ZeRO-3 run:
    10 questions, micro-batch 2, 2 ranks, 4 epochs: 3 micro-batches an epoch, 12 steps); accumulation 3 in the
    Optuna sweep's trials (1 rank, 2 epochs of 5 micro-batches: 3 steps, where counting per epoch would give 2 and
    rounding up 4) and 4 in the NPO run on MUSE-News (tests/eval/test_text_benchmarks.py)."""
    from flat_ray import tracking
    from flat_ray.dryrun import dry_run

    cfg, res = zero3
    logged = [step for step, _ in tracking.metric_history(res.mlflow_uri, res.run_id, "train/loss")]
    assert dry_run(cfg)["optimizer_steps"] == len(logged) == 12 and logged == list(range(1, 13))
