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
    chat = type("Tok", (), {"chat_template": "{{ messages }}"})()  # Llama-2-chat's tokenizer has one, not TOFU's tags
    for tofu_llama in ("locuslab/tofu_ft_llama2-7b", "open-unlearning/tofu_Llama-2-7b-chat-hf_full"):
        assert resolve_profile("auto", tofu_llama, chat).name == "llama2_chat", tofu_llama
    assert resolve_profile("auto", "meta-llama/Llama-2-7b-hf", tok).name == "generic"  # the base model
    assert resolve_profile("auto", "microsoft/phi-1_5").name == "phi"
    assert resolve_profile("auto", "/models/tiny", tok).name == "generic"
    assert resolve_profile("phi", "anything") is PROFILES["phi"]
    assert resolve_profile("auto", "locuslab/tofu_ft_phi-1.5", tok).name == "phi"  # no chat template
    assert resolve_profile("auto", "cognitivecomputations/dolphin-2.1", tok).name == "generic"  # not a Phi
    assert resolve_profile("auto", "microsoft/Phi-3.5-mini-instruct", chat).name == "chat_template"


def test_a_model_without_tokenizer_files_loads_its_tokenizer_from_model_tokenizer(tiny_model_dir, tmp_path):
    """TOFU's fine-tuned Phi ships no tokenizer: TOFU loads it from the base model. model.tokenizer does that."""
    import shutil

    model_only = tmp_path / "ft"
    shutil.copytree(tiny_model_dir, model_only)
    for f in model_only.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    with pytest.raises(FlatRayError, match="cannot load model"):
        load_model_and_tokenizer(str(model_only), load_model=False)
    model, tok = load_model_and_tokenizer(str(model_only), tokenizer=str(tiny_model_dir))
    _, own = load_model_and_tokenizer(str(tiny_model_dir), load_model=False)
    assert model is not None and tok.get_vocab() == own.get_vocab() and tok.pad_token == own.pad_token
    with pytest.raises(FlatRayError, match=r"^model.tokenizer '/nowhere/tok' does not exist"):
        load_model_and_tokenizer(str(model_only), tokenizer="/nowhere/tok")
    with pytest.raises(FlatRayError, match=r"cannot load tokenizer \(model.tokenizer\) 'org/not-cached': "
                                           "HF_HUB_OFFLINE=1 and it is not in the local cache"):
        load_model_and_tokenizer(str(model_only), tokenizer="org/not-cached")


def test_tofu_spaces_load_tokenizers_from_the_base_models_as_tofu_does():
    from flat_ray.sweep import load_space

    # TOFU's config/model_config.yaml: hf_key of llama2-7b and phi
    want = {"locuslab/tofu_ft_llama2-7b": "NousResearch/Llama-2-7b-chat-hf", "locuslab/tofu_ft_phi-1.5": "microsoft/phi-1_5"}
    for name in ("tofu", "tofu_baselines"):
        cells = load_space(name, check_files=False).cells
        assert cells and all(want[c.config.model.name_or_path] == c.config.model.tokenizer for c in cells)


def test_weights_are_fetched_into_the_hf_cache_once_or_refused_in_one_line(tmp_path, monkeypatch, tiny_model_dir):
    """Offline, the fetch only checks the cache (a hub cache laid out as huggingface_hub lays it out); local paths
    and the built-in models are not the hub's."""
    import shutil

    from flat_ray.config import load_config
    from flat_ray.models import fetch_weights

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text(snapshot.name)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # HF_HUB_CACHE, read at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, ["model.name_or_path=org/tiny"])
    assert fetch_weights(cfg) == [str(snapshot)]
    assert fetch_weights(load_config(None, [f"model.name_or_path={tiny_model_dir}"])) == []
    assert fetch_weights(load_config(None, ["model.name_or_path=tiny"])) == []
    with pytest.raises(FlatRayError, match=r"^cannot fetch 'org/other' into the Hugging Face cache: HF_HUB_OFFLINE=1 "
                                           r"and it is not in the cache \(HF_HOME\)"):
        fetch_weights(load_config(None, ["model.name_or_path=org/tiny", "model.tokenizer=org/other"]))


def test_a_worker_uses_the_cpus_it_reserved_whatever_omp_num_threads_says(monkeypatch):
    from flat_ray.launch.worker import use_reserved_cpus

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as Ray's command runner starts every node
    try:
        assert use_reserved_cpus(2.0) == 2 and torch.get_num_threads() == 2
        import os

        assert os.environ["OMP_NUM_THREADS"] == "2"
        assert use_reserved_cpus(0.99) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
