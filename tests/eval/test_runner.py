"""Batched TOFU evaluation on a real (tiny) model, the lm-eval harness on a local task, and `flat-ray eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flat_ray.data import load_split
from flat_ray.errors import FlatRayError
from flat_ray.eval.harness import PAPER_TASKS, parse_tasks, run_lm_eval
from flat_ray.eval.run import summary_from_logs
from flat_ray.eval.runner import evaluate_split, evaluate_tofu
from flat_ray.eval.tofu import LOG_FILES, read_reference, summarize
from flat_ray.losses import mean_token_nll
from flat_ray.models import PROFILES

PROFILE = PROFILES["generic"]


def one_by_one(model, tok, rows, max_new_tokens=6):
    """The straightforward reference: one question, one candidate, one forward at a time."""
    from flat_ray.data import encode_qa

    gt, para, pert, texts = [], [], [], []
    for r in rows:
        def nll(answer, question=r["question"]):
            enc = encode_qa(tok, PROFILE, question, answer, 96)
            logits = model(torch.tensor([enc["input_ids"]])).logits
            return mean_token_nll(logits, torch.tensor([enc["labels"]])).item()
        gt.append(nll(r["answer"]))
        para.append(nll(r.get("paraphrased_answer") or r["answer"]))
        pert.append([nll(a) for a in r["perturbed_answer"]])
        enc = encode_qa(tok, PROFILE, r["question"], r["answer"], 96)
        prompt = enc["input_ids"][: enc["labels"].count(-100)]
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        texts.append(tok.decode(out[0, len(prompt):], skip_special_tokens=True).strip())
    return np.array(gt), np.array(para), np.array(pert), texts


@torch.no_grad()
def test_batched_evaluation_equals_the_per_question_loop(tiny):
    model, tok = tiny
    model.eval()
    rows = load_split("demo", "forget10_perturbed")[:6] + load_split("demo", "world_facts_perturbed")[:3]
    for part in (rows[:6], rows[6:]):
        v = evaluate_split(model, tok, PROFILE, part, max_length=96, batch_size=4, max_new_tokens=6)
        gt, para, pert, texts = one_by_one(model, tok, part)
        np.testing.assert_allclose(v.avg_gt_loss, gt, rtol=1e-4)
        np.testing.assert_allclose(v.avg_paraphrased_loss, para, rtol=1e-4)
        np.testing.assert_allclose(v.average_perturb_loss, pert, rtol=1e-4)
        assert [t[1] for t in v.generated_text] == texts
        assert [t[2] for t in v.generated_text] == [r["answer"] for r in part]


@torch.no_grad()
def test_demo_splits_give_every_tofu_number(tiny):
    model, tok = tiny
    rows = {"forget": load_split("demo", "forget10_perturbed")[:4], "retain": load_split("demo", "retain_perturbed")[:4],
            "real_authors": load_split("demo", "real_authors_perturbed")[:4],
            "world_facts": load_split("demo", "world_facts_perturbed")[:4]}
    values = evaluate_tofu(model, tok, PROFILE, rows, max_length=96, batch_size=8, max_new_tokens=4)
    s = summarize(values, reference_tr=np.array([0.5, 0.7, 0.9, 1.1]))
    for key in ("model_utility", "forget_quality", "forget_truth_ratio", "world_facts_prob"):
        assert 0 <= s[key] <= 1, key
    assert values["forget"].average_perturb_loss.shape == (4, 5) and values["world_facts"].average_perturb_loss.shape == (4, 3)


LOCAL_TASK = """task: flatray_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    rows = [{"question": f"What is {i} plus one?", "choices": [str(i + 1), str(i + 7)], "label": 0} for i in range(6)]
    (d / "toy.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "toy.yaml").write_text(LOCAL_TASK.format(data=d / "toy.jsonl"))
    return d


def test_lm_eval_on_a_local_task(tiny, local_task):
    model, tok = tiny
    res = run_lm_eval(model, tok, ["flatray_toy"], include_path=str(local_task), batch_size=4)
    assert 0.0 <= res["flatray_toy"]["acc"] <= 1.0


def test_lm_eval_errors_name_the_task(tiny, local_task):
    model, tok = tiny
    with pytest.raises(FlatRayError, match="unknown lm-eval task.*no_such_task"):
        run_lm_eval(model, tok, ["no_such_task"], include_path=str(local_task))
    with pytest.raises(FlatRayError, match=r"could not load the data of task\(s\) boolq.*--tasks-include"):
        run_lm_eval(model, tok, ["boolq"], limit=2)
    assert parse_tasks("default") == list(PAPER_TASKS) and parse_tasks("a, b") == ["a", "b"]
    # lm-eval's task index is built once per process and folder
    from flat_ray.eval.harness import task_manager

    assert task_manager(["flatray_toy"], str(local_task)) is task_manager(["flatray_toy"], f"{local_task}/.")


def test_the_papers_average_is_flats_mean_of_plain_accuracy(monkeypatch):
    """FLAT's evaluate.py (get_average_acc) averages `acc,none` of every zero-shot result, TruthfulQA's mc1 and mc2
    as two tasks, never acc_norm; written out here on lm-eval's own result keys."""
    import torch

    from flat_ray.eval.harness import PAPER_AVERAGE, flatten, with_paper_average
    from flat_ray.eval.run import eval_device

    accs = dict(zip(PAPER_TASKS[:-1], (0.62, 0.55, 0.47, 0.61, 0.30, 0.66, 0.25, 0.71, 0.24, 0.38), strict=True))
    raw = {t: {"alias": t, "acc,none": a, "acc_stderr,none": 0.01, "acc_norm,none": a + 0.05} for t, a in accs.items()}
    raw["wikitext"] = {"alias": "wikitext", "word_perplexity,none": 21.5, "byte_perplexity,none": 1.7}
    out = with_paper_average(flatten(raw))
    assert out[PAPER_AVERAGE] == {"acc": pytest.approx((0.62 + 0.55 + 0.47 + 0.61 + 0.30 + 0.66 + 0.25 + 0.71 + 0.24
                                                        + 0.38) / 10)}
    assert out["hellaswag"] == {"acc": 0.47, "acc_norm": pytest.approx(0.52)} and out["wikitext"]["word_perplexity"] == 21.5
    del raw["piqa"]
    assert PAPER_AVERAGE not in with_paper_average(flatten(raw))  # only where every task ran
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eval_device() == "cuda"  # `flat-ray eval` runs the model on the GPU where there is one


def run_cli(args, capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_flat_ray_eval_end_to_end_reference_and_from_logs(tiny_model_dir, tmp_path, capsys, local_task):
    common = [f"paths.workdir={tmp_path}/wd", "eval.max_new_tokens=4", "--model", str(tiny_model_dir),
              "--benchmark", "demo", "--split", "forget10", "--max-examples", "5"]
    code, out, err = run_cli(["eval", *common, "--out", str(tmp_path / "a"), "--json", "--tasks", "flatray_toy",
                              "--tasks-include", str(local_task), "--limit", "4"], capsys)
    assert code == 0, err
    first = json.loads(out)
    assert 0 <= first["model_utility"] <= 1 and "forget_quality" not in first and "lm_eval/flatray_toy/acc" in first
    assert {p.name for p in (tmp_path / "a").iterdir()} == {*LOG_FILES.values(), "summary.json", "TOFU_EVAL.json",
                                                           "TOFU_SUMMARY.json"}
    # open-unlearning's files of the same evaluation: the same forget ratios (inverted back) and model utility as
    # the geometric truth ratio gives
    ours, _ = read_reference(tmp_path / "a" / "eval_log_forget.json")
    # (their ratio's 1e-10 guard is 1e-7 of an untrained model's answer probability)
    assert read_reference(tmp_path / "a" / "TOFU_EVAL.json")[0] == pytest.approx(ours, rel=1e-6)
    geometric = summary_from_logs(str(tmp_path / "a"), None, "geometric")["model_utility"]
    assert json.loads((tmp_path / "a" / "TOFU_SUMMARY.json").read_text())["model_utility"] == pytest.approx(geometric)
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert saved["lm_eval_version"] and saved["questions"]["forget"] == 5
    # the same model against its own results: forget quality 1, by path and by MLflow run id
    for ref in (str(tmp_path / "a"), first["mlflow_run_id"]):
        code, out, err = run_cli(["eval", *common, "--reference", ref, "--json", "--out", str(tmp_path / "b")], capsys)
        assert code == 0, err
        again = json.loads(out)
        assert again["forget_quality"] == pytest.approx(1.0)
        assert again["model_utility"] == pytest.approx(first["model_utility"])
    assert again["forget_quality_reference"] == f"mlflow-run:{first['mlflow_run_id']}"
    # --from-logs recomputes the same summary from the written logs
    code, out, _ = run_cli(["eval", "--from-logs", str(tmp_path / "a"), "--json"], capsys)
    assert json.loads(out)["model_utility"] == pytest.approx(first["model_utility"])
    # attach to an existing run
    code, out, err = run_cli(["eval", *common, "--run-id", first["mlflow_run_id"], "--out", str(tmp_path / "c")], capsys)
    assert code == 0 and f"MLflow run id: {first['mlflow_run_id']}" in out and "model utility" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--from-logs", "{tmp}/nothing"], "does not exist"),
    (["--reference", "{tmp}/missing", "--model", "tiny"], "not found"),
    (["--run-id", "0123456789abcdef0123456789abcdef", "--model", "tiny"], "no MLflow run"),
    (["--split", "forget77", "--model", "tiny"], "data.split='forget77' is not valid"),
    (["--truth-ratio", "harmonic"], "Invalid value for '--truth-ratio'"),
])
def test_eval_bad_input(args, message, tmp_path, capsys):
    code, out, err = run_cli(["eval", f"paths.workdir={tmp_path}/wd", *[a.format(tmp=tmp_path) for a in args]], capsys)
    assert code == 2 and message in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "wd").exists()  # nothing written


def test_text_token_logprobs_are_the_plain_log_softmax_of_each_gold_token(tiny):
    """MUSE's PrivLeak scores come from these: every token after the first, given the ones before it."""
    import torch

    from flat_ray.eval.runner import text_token_logprobs

    model, tok = tiny
    texts = ["The Silent Orchard was written in Lisbon.", "Paris"]
    got = text_token_logprobs(model, tok, texts, max_length=64, batch_size=2)
    for text, values in zip(texts, got, strict=True):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        expected = logp.gather(-1, ids[0, 1:, None]).squeeze(-1).numpy()
        assert values.shape == expected.shape and np.allclose(values, expected, atol=1e-5)


def _counted_lm_eval(model_dir: str, task_dir: str) -> dict:
    """The harness on the local task (indexed alone: no scan of lm-eval's own tasks), with how many sequences the
    model was called on."""
    from lm_eval.tasks import TaskManager

    from flat_ray.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    seen = [0]
    model.register_forward_pre_hook(lambda _m, args, kwargs: seen.__setitem__(0, seen[0] + len(
        (args or [kwargs["input_ids"]])[0])), with_kwargs=True)
    manager = TaskManager(include_path=task_dir, include_defaults=False)
    return {"results": run_lm_eval(model, tok, ["flatray_odd"], batch_size=2, manager=manager), "seen": seen[0]}


def _sharded_lm_eval(rank: int, world: int, model_dir: str, task_dir: str, port: int, out: str) -> None:
    """One rank of a gloo process group running the harness; writes what :func:`_counted_lm_eval` returns."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = _counted_lm_eval(model_dir, task_dir)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    # rank 0 holds the group's TCP store: tearing the group down while the other rank still uses it aborted that rank
    # once in CI ("terminate called without an active exception", SIGABRT)
    dist.barrier()
    dist.destroy_process_group()


def test_lm_eval_in_a_process_group_shares_the_questions_and_gives_one_process_numbers(tiny_model_dir, tmp_path):
    """Two gloo ranks share a task's 7 questions (lm-eval pads the shorter share) and both report the numbers one
    process gets; each rank's model sees fewer sequences than the one process's."""
    import socket

    import torch.multiprocessing as mp

    rows = [{"question": f"What comes after {i}?", "choices": [str(i + 1), str(i * 3 + 2), "none"], "label": 0}
            for i in range(7)]
    (tmp_path / "odd.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "odd.yaml").write_text(LOCAL_TASK.replace("flatray_toy", "flatray_odd").format(
        data=tmp_path / "odd.jsonl"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = _counted_lm_eval(str(tiny_model_dir), str(tmp_path))
    out = str(tmp_path / "res")
    mp.spawn(_sharded_lm_eval, args=(2, str(tiny_model_dir), str(tmp_path), port, out), nprocs=2)
    ranks = [json.loads(open(f"{out}.{r}").read()) for r in (0, 1)]
    assert ranks[0]["results"] == ranks[1]["results"] == one["results"]
    assert all(r["seen"] < one["seen"] <= ranks[0]["seen"] + ranks[1]["seen"] for r in ranks), (one, ranks)


WIDTH_PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [6, 7], [9], [14, 15, 16, 17, 18, 19], [20, 21, 22, 23, 24]]
WIDTH_OF = [10, 10, 10, 10, 10, 20, 20]  # rank 0 holds rows 0, 2, 4, 6 (3 batches of 2), rank 1 rows 1, 3, 5 (2)


def _generate_at_width(rank: int, world: int, model_dir: str, port: int, out: str) -> None:
    """One rank of a gloo group running FLAT-style padded generation; writes the gathered texts."""
    import os

    import torch.distributed as dist

    from flat_ray.eval.runner import generate_at_width
    from flat_ray.models import load_model_and_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, tok = load_model_and_tokenizer(model_dir)
    texts = generate_at_width(model, tok, WIDTH_PROMPTS, WIDTH_OF, pad_id=tok.eos_token_id, total_length=30, skip=1,
                              batch_size=2, rank=rank, world_size=world)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(texts, f)
    dist.barrier()
    dist.destroy_process_group()


def test_padded_generation_on_two_ranks_gives_one_process_texts(tiny_model_dir, tiny, tmp_path):
    """eval.completion_file's generation (each prompt at its FLAT width) over two gloo ranks that hold different
    numbers of batches: every rank runs as many `generate` calls as the busiest (synced decoding) and both return
    the one-process texts, in order."""
    import socket

    import torch.multiprocessing as mp

    from flat_ray.eval.runner import generate_at_width

    model, tok = tiny
    one = generate_at_width(model, tok, WIDTH_PROMPTS, WIDTH_OF, pad_id=tok.eos_token_id, total_length=30, skip=1,
                            batch_size=2)
    assert len(one) == 7 and any(one)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_generate_at_width, args=(2, str(tiny_model_dir), port, str(tmp_path / "gen")), nprocs=2)
    assert [json.loads((tmp_path / f"gen.{r}").read_text()) for r in (0, 1)] == [one, one]
