"""eval.reference=auto beyond the demo: a TOFU-format benchmark (TOFU's own rows from ../shared/data/tofu_mini laid
out as a data.data_dir), the retain model built from the base model by the recipe named in config
(eval.retain_recipe), on the forget split's complement, in one Ray Train run of its own, evaluated at its end with
the unlearning run's settings, cached, and forget quality in every evaluation of the run that asked for it."""

from __future__ import annotations

import json

import pytest

from flat_ray import tracking
from tests.eval.test_tofu import SHARED

pytestmark = pytest.mark.slow


def _perturbed(rows: list[dict], k: int = 3) -> list[dict]:
    """TOFU's evaluation fields for rows that lack them: the answer as its own paraphrase, other answers as the
    perturbed ones."""
    return [{**r, "paraphrased_answer": r["answer"],
             "perturbed_answer": [rows[(i + j) % len(rows)]["answer"] for j in range(1, k + 1)]}
            for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def tofu_dir(tmp_path_factory):
    src = SHARED / "tofu_mini"
    if not (src / "forget.jsonl").is_file():
        pytest.skip(f"TOFU excerpts not found at {src} (../shared/data is absent on this checkout)")
    rows = {name: [json.loads(x) for x in (src / f"{name}.jsonl").read_text().splitlines() if x.strip()]
            for name in ("forget", "retain", "real_authors_perturbed", "world_facts_perturbed")}
    out = tmp_path_factory.mktemp("tofu")
    files = {"forget01": rows["forget"], "retain99": rows["retain"], "forget01_perturbed": _perturbed(rows["forget"]),
             "retain_perturbed": _perturbed(rows["retain"][:40]),
             "real_authors_perturbed": rows["real_authors_perturbed"],
             "world_facts_perturbed": rows["world_facts_perturbed"]}
    for name, content in files.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in content))
    return out


def test_a_tofu_format_retain_model_is_built_by_the_recipe_in_config(ray_local, tiny_model_dir, tofu_dir, tmp_path,
                                                                      monkeypatch, capsys):
    from cli.main import main
    from flat_ray.assets import recipe_retain_path
    from flat_ray.config import load_config
    from flat_ray.eval.run import auto_reference

    recipe = tmp_path / "recipe.yaml"  # the base model and how the original was fine-tuned
    recipe.write_text(f"model: {{name_or_path: {tiny_model_dir}}}\n"
                      "optim: {lr: 1.0e-3, epochs: 1, micro_batch_size: 8, weight_decay: 0.01, warmup_ratio: 0.2}\n")
    work = tmp_path / "work"
    args = [f"paths.workdir={work}", f"model.name_or_path={tiny_model_dir}", "data.benchmark=tofu",
            "data.split=forget01", f"data.data_dir={tofu_dir}", "data.max_length=128", "optim.epochs=1",
            "optim.micro_batch_size=4", "eval.max_examples=6", "eval.max_new_tokens=4", "eval.batch_size=6",
            "eval.reference=auto", f"eval.retain_recipe={recipe}", "tracking.run_name=unlearn"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--address", ray_local, *args])
    out = capsys.readouterr().out
    assert exc.value.code == 0, out[-3000:]

    cfg = load_config(None, args)
    target = recipe_retain_path(cfg)
    assert target.parent == work / "models" and target.name.startswith("recipe-retain-")
    assert (target / "model" / "config.json").is_file()
    uri = tracking.default_uri(work)
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    built = runs[target.name]  # the retain model: one Ray Train run of its own
    p = built.data.params
    assert built.info.status == "FINISHED" and p["data.split"] == "retain99" and p["method.name"] == "sft"
    assert (p["model.name_or_path"], p["optim.lr"], p["optim.weight_decay"]) == (str(tiny_model_dir), "0.001", "0.01")
    assert p["data.data_dir"] == str(tofu_dir) and p["eval.max_examples"] == "6" and p["data.max_length"] == "128"
    # it was evaluated on forget01, the split it is the complement of, with the run's settings
    reference = target / "reference"
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["split"] == "retain99" and len(json.loads((reference / "eval_log_forget.json").read_text())[
        "avg_gt_loss"]) == 6
    # the unlearning run measured forget quality against it at every evaluation
    run = runs["unlearn"]
    assert run.data.params["eval.reference"] == str(reference)
    assert [s for s, _ in tracking.metric_history(uri, run.info.run_id, "eval/forget_quality")] == [0, 1]
    # cached: asked again, nothing is trained
    assert auto_reference(cfg, lambda ft: pytest.fail("trained again")).eval.reference == str(reference)
    # forget01's question 0 in the retain model's log is the run's question 0
    log = json.loads((reference / "eval_log_forget.json").read_text())
    assert log["generated_text"]["0"][2] == json.loads((tofu_dir / "forget01_perturbed.jsonl").read_text()
                                                      .splitlines()[0])["answer"]
