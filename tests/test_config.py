"""Config: defaults, YAML + overrides, canonicalisation, validation, the generated reference doc."""

from __future__ import annotations

from pathlib import Path

import pytest

from flat_ray.config import all_keys, config_from_dict, load_config, reference_markdown
from flat_ray.errors import FlatRayError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_the_demo():
    cfg = load_config()
    assert cfg.data.benchmark == "demo" and cfg.data.split == "forget10"
    assert cfg.method.name == "flat" and cfg.method.divergence == "total_variation" and cfg.method.normalize == "paper"
    assert cfg.model.name_or_path == "tiny" and cfg.model.trust_remote_code is False


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 1e-5\n  epochs: 3\nmethod:\n  divergence: Jenson-Shannon\ndata:\n  benchmark: tofu\n")
    cfg = load_config(f, ["optim.epochs=7", "deepspeed.stage=3", "deepspeed.offload_params=true", "tracking.run_name=null"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-5 as a string
    assert cfg.optim.epochs == 7 and cfg.deepspeed.stage == 3 and cfg.deepspeed.offload_params is True
    assert cfg.method.divergence == "jensen_shannon"  # aliases are stored canonical, so logs compare
    assert cfg.data.split == "forget01"  # the benchmark's default
    assert cfg.tracking.run_name is None


def test_flat_round_trip_and_every_key_documented():
    cfg = load_config(None, ["optim.lr=3e-6"])
    flat = cfg.flat()
    assert set(flat) == set(all_keys()) and flat["optim.lr"] == 3e-6
    assert config_from_dict(cfg.to_dict()) == cfg
    assert len(all_keys()) >= 30


def test_docs_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown(), (
        "docs/config.md is stale: run `python -m flat_ray.config > docs/config.md`")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
        (["lr=1"], r"did you mean 'optim.lr'"),
        (["method.divergence=tvv"], r"Did you mean 'total_variation'.*Valid choices: kl, reverse_kl"),
        (["optim.lr=-1e-5"], r"optim.lr must be > 0"),
        (["optim.lr=0"], r"optim.lr must be > 0"),
        (["optim.micro_batch_size=0"], r"optim.micro_batch_size must be >= 1"),
        (["launch.checkpoint_every_epochs=0"], r"launch.checkpoint_every_epochs must be >= 1, got 0"),
        (["optim.epochs=2.5"], r"optim.epochs must be int"),
        (["deepspeed.stage=4"], r"Valid choices: 0, 1, 2, 3"),
        (["deepspeed.stage=0", "deepspeed.offload_optimizer=true"], r"needs deepspeed.stage >= 1"),
        (["data.benchmark=tofu", "data.split=forget02"], r"data.split='forget02' is not valid.*forget01"),
        (["data.template_source=column"], r"needs data.template_column"),
        (["method.name=npoo"], r"unknown method 'npoo'.*Valid choices: flat"),
        (["optim.schedule=cosin"], r"Did you mean 'cosine'"),
        (["model.profile=llama3"], r"unknown model profile 'llama3'"),
        (["eval.enabled=maybe"], r"eval.enabled must be bool"),
    ],
)
def test_invalid_values_are_rejected_at_load_time(overrides, message):
    with pytest.raises(FlatRayError, match=message):
        load_config(None, overrides)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(FlatRayError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(FlatRayError, match=r"not valid YAML at line \d+"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(FlatRayError, match="must hold a mapping of sections"):
        load_config(lst)
    sec = tmp_path / "sec.yaml"
    sec.write_text("optim: 3\n")
    with pytest.raises(FlatRayError, match="section 'optim' must be a mapping"):
        load_config(sec)
    unk = tmp_path / "unk.yaml"
    unk.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(FlatRayError, match="unknown config key 'optimizer'"):
        load_config(unk)


def test_changing_the_benchmark_resets_an_inherited_split():
    from flat_ray.config import load_config

    cfg = load_config(None, ["data.benchmark=tofu"], presets=["demo"])  # the demo preset says forget10
    assert cfg.data.split == "forget01"
    assert load_config(None, ["data.benchmark=tofu", "data.split=forget05"], presets=["demo"]).data.split == "forget05"
    assert load_config(None, ["data.benchmark=demo"], presets=["demo"]).data.split == "forget10"


def test_files_are_checked_where_a_config_enters_never_when_a_worker_rebuilds_it(tmp_path):
    """preflight.check_inputs checks the files a config names; config only checks values (load_config and
    config_from_dict, as in a Ray worker on a node that lacks the head's paths, touch no file it names)."""
    from flat_ray.config import config_from_dict
    from flat_ray.preflight import check_inputs

    cfg = load_config(None, [], presets=["demo"])
    data = cfg.to_dict()
    data["data"] = {**data["data"], "template_source": "file", "template_file": str(tmp_path / "head-only.jsonl")}
    data["eval"] = {**data["eval"], "reference": str(tmp_path / "head-only-logs")}
    rebuilt = config_from_dict(data)  # no file is touched
    assert rebuilt.data.template_file.endswith("head-only.jsonl")
    with pytest.raises(FlatRayError, match="data.template_file .* does not exist"):
        check_inputs(rebuilt)
    (tmp_path / "head-only.jsonl").write_text('{"text": "I cannot say."}\n')
    with pytest.raises(FlatRayError, match="eval.reference .* does not exist"):
        check_inputs(rebuilt)
    loaded = load_config(None, [f"eval.reference={tmp_path}/head-only-logs"], presets=["demo"])
    with pytest.raises(FlatRayError, match="eval.reference .* does not exist"):
        check_inputs(loaded)
