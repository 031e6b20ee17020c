"""Model loading and the tiny-model builder (real transformers models, offline)."""

from __future__ import annotations

import time

import pytest
import torch

from flat_ray.errors import FlatRayError
from flat_ray.models import (
    PROFILES,
    TinySpec,
    cached_tiny_model,
    count_parameters,
    load_model_and_tokenizer,
    resolve_profile,
)


def test_tiny_model_is_small_llama_saved_as_safetensors_and_reloads_offline(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in tiny_model_dir.iterdir()}
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    assert {"config.json", "tokenizer.json"} <= files
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert 100_000 <= count_parameters(model) <= 5_000_000
    ids = tok("Where was the author born?", return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0], skip_special_tokens=True) == "Where was the author born?"
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


def test_tiny_builder_is_deterministic_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    texts = ["alpha beta gamma", "delta epsilon"] * 20
    spec = TinySpec(vocab_size=300, hidden_size=32, intermediate_size=64)
    a = cached_tiny_model(texts, tmp_path, spec)
    assert cached_tiny_model(texts, tmp_path, spec) == a  # reused
    b = cached_tiny_model(texts, tmp_path, TinySpec(vocab_size=300, hidden_size=32, intermediate_size=64, seed=1))
    assert b != a
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    from flat_ray.models import build_tiny_model

    c = build_tiny_model(texts, tmp_path / "again", spec)
    wc = load_file(c / "model.safetensors")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    assert not list(tmp_path.glob(".tiny-*"))  # no temporary build left behind


def test_loader_sets_pad_token_and_right_padding(tiny):
    model, tok = tiny
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert model.config.pad_token_id == tok.pad_token_id


def test_loader_errors_are_one_line_and_actionable(tmp_path):
    with pytest.raises(FlatRayError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "nope"))
    start = time.monotonic()
    with pytest.raises(FlatRayError, match=r"HF_HUB_OFFLINE=1 and it is not in the local cache"):
        load_model_and_tokenizer("some-org/some-model-that-is-not-cached")
    assert time.monotonic() - start < 20


def test_trust_remote_code_is_off_by_default():
    import inspect

    assert inspect.signature(load_model_and_tokenizer).parameters["trust_remote_code"].default is False


def test_resolve_profile_auto(tiny):
    _, tok = tiny
    assert resolve_profile("auto", "meta-llama/Llama-2-7b-chat-hf").name == "llama2_chat"
    assert resolve_profile("auto", "microsoft/phi-1_5").name == "phi"
    assert resolve_profile("auto", "/models/tiny", tok).name == "generic"
    assert resolve_profile("phi", "anything") is PROFILES["phi"]
