"""MUSE-News and Harry-Potter-style text benchmarks: loaders on fixtures written here in each schema, chunking,
the metrics by hand (Min-k%, AUC, PrivLeak, KnowMem post-processing, BLEU/ROUGE), evaluation on the tiny model,
and a 2-worker ZeRO-3 NPO training run on MUSE-News with per-epoch MUSE metrics."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from flat_ray.config import load_config
from flat_ray.data import BENCHMARKS, load_split
from flat_ray.data.text import chunk_rows, completion_rows, read_text_rows
from flat_ray.errors import FlatRayError
from flat_ray.eval import hp, muse
from flat_ray.metrics import METRICS, add_derived
from flat_ray.preflight import check_inputs

TOWNS = ["Harlow", "Brennick", "Ostend Vale", "Marrowby", "Quillton", "Fenwick Cross"]
EVENTS = ["opened a new library", "approved a bridge repair", "held a harvest fair", "elected a new mayor",
          "closed the old mill", "started a night market"]


def _news(rng: random.Random, n: int) -> list[str]:
    out = []
    for i in range(n):
        town, event = rng.choice(TOWNS), rng.choice(EVENTS)
        out.append(f"Report {i}: the town of {town} {event} on day {rng.randint(1, 28)}. Residents said the change "
                   f"would help local families, and the council promised a review in {rng.randint(2, 9)} months.")
    return out


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def muse_dir(tmp_path_factory) -> Path:
    """A MUSE-News-shaped directory: raw/, verbmem/, knowmem/, privleak/ with the hub's field names."""
    d = tmp_path_factory.mktemp("muse")
    rng = random.Random(0)
    forget, retain, holdout = _news(rng, 12), _news(rng, 12), _news(rng, 12)
    for name, texts in (("forget", forget), ("retain1", retain), ("retain2", retain[:4]), ("holdout", holdout)):
        _jsonl(d / "raw" / f"{name}.jsonl", [{"text": t} for t in texts])
    _jsonl(d / "verbmem" / "forget.jsonl", [{"prompt": t[:60], "gt": t[60:]} for t in forget[:6]])
    qa = [{"question": f"What did the town in report {i} do?", "answer": t.split(" on day")[0].split(" the town of ")[1]}
          for i, t in enumerate(forget)]
    _jsonl(d / "knowmem" / "forget_qa.jsonl", qa[:6])
    _jsonl(d / "knowmem" / "retain_qa.jsonl", qa[6:])
    _jsonl(d / "knowmem" / "forget_qa_icl.jsonl", qa[:3])
    _jsonl(d / "knowmem" / "retain_qa_icl.jsonl", qa[6:9])
    for name, texts in (("forget", forget), ("retain", retain), ("holdout", holdout)):
        _jsonl(d / "privleak" / f"{name}.jsonl", [{"text": t} for t in texts[:6]])
    return d


@pytest.fixture(scope="module")
def book_dir(tmp_path_factory) -> Path:
    """A self-written 'book' (forget.txt, paragraphs) and a retain.txt."""
    d = tmp_path_factory.mktemp("book")
    rng = random.Random(1)
    paragraphs = [" ".join(f"The lighthouse keeper counted {rng.randint(2, 40)} gulls and wrote the number in his "
                           f"logbook before the tide turned{'.' if k % 3 else ', then slept.'}" for k in range(8))
                  for _ in range(6)]
    (d / "forget.txt").write_text("\n\n".join(paragraphs))
    (d / "retain.txt").write_text("\n\n".join(_news(rng, 6)))
    return d


def test_muse_splits_load_from_a_local_directory_in_musees_layout(muse_dir):
    assert len(load_split("muse_news", "forget", str(muse_dir))) == 12
    assert set(load_split("muse_news", "verbmem_forget", str(muse_dir))[0]) == {"prompt", "gt"}
    assert set(load_split("muse", "knowmem_retain_qa", str(muse_dir))[0]) == {"question", "answer"}
    cfg = load_config(None, ["data.benchmark=muse_news", f"data.data_dir={muse_dir}", "method.name=grad_diff"])
    assert cfg.data.split == "forget" and cfg.retain_split() == "retain1"
    with pytest.raises(FlatRayError, match="no knowmem/nothing.jsonl|unknown MUSE-News split 'nothing'"):
        check_inputs(load_config(None, ["data.benchmark=muse_news", f"data.data_dir={muse_dir}", "data.split=nothing"]))
    (muse_dir / "raw" / "retain2.jsonl").rename(muse_dir / "raw" / "retain2.bak")
    try:
        with pytest.raises(FlatRayError, match=r"no raw/retain2.jsonl or .json under data.data_dir"):
            check_inputs(load_config(None, ["data.benchmark=muse_news", f"data.data_dir={muse_dir}", "data.split=retain2"]))
    finally:
        (muse_dir / "raw" / "retain2.bak").rename(muse_dir / "raw" / "retain2.jsonl")
    _jsonl(muse_dir.parent / "bad" / "raw" / "forget.jsonl", [{"body": "no text field"}])
    with pytest.raises(FlatRayError, match="lacks field.*text"):
        load_split("muse_news", "forget", str(muse_dir.parent / "bad"))


def test_hp_reads_user_text_and_never_downloads_the_book(book_dir, tmp_path):
    rows = load_split("hp", "forget", str(book_dir))
    assert len(rows) == 6 and all("lighthouse" in r["text"] for r in rows)
    assert len(load_split("hp", "retain", str(book_dir))) == 6
    with pytest.raises(FlatRayError, match="benchmark hp needs data.data_dir"):
        load_split("hp", "forget", None)
    with pytest.raises(FlatRayError, match="no forget.txt, forget.jsonl or forget.json"):
        check_inputs(load_config(None, ["data.benchmark=hp", f"data.data_dir={tmp_path}"]))
    (tmp_path / "forget.jsonl").write_text('{"text": "one passage"}\n')
    assert read_text_rows(tmp_path / "forget.jsonl") == [{"text": "one passage"}]


def test_chunking_cuts_token_windows_into_prompt_and_continuation(tiny):
    _, tokenizer = tiny
    text = " ".join(f"word{i}" for i in range(300))
    rows = chunk_rows([{"text": text}], tokenizer, chunk_tokens=64, prompt_fraction=0.25)
    total = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert len(rows) == -(-total // 64) or len(rows) == total // 64  # the last short window may be dropped
    first = rows[0]
    n_prompt = len(tokenizer(first["question"], add_special_tokens=False)["input_ids"])
    n_answer = len(tokenizer(first["answer"], add_special_tokens=False)["input_ids"])
    assert abs(n_prompt - 16) <= 1 and abs(n_prompt + n_answer - 64) <= 2
    assert (first["question"] + first["answer"]).replace(" ", "") in text.replace(" ", "")
    assert chunk_rows([{"question": "q", "answer": "a"}], tokenizer, 64, 0.5) == [{"question": "q", "answer": "a"}]
    with pytest.raises(FlatRayError, match="too short"):
        chunk_rows([{"text": "tiny"}], tokenizer, 64, 0.5)


def test_prompt_fraction_zero_trains_on_every_token_as_muses_baselines(tiny):
    """MUSE's baselines train each chunk as BOS + its tokens with every token a label (dataset.py: labels =
    input_ids): with data.prompt_fraction=0 only the BOS is masked, so each chunk token is predicted from the ones
    before it, the first one from BOS."""
    from flat_ray.data import encode_qa
    from flat_ray.models import PROFILES

    _, tokenizer = tiny
    text = " ".join(f"word{i}" for i in range(300))
    rows = chunk_rows([{"text": text}], tokenizer, chunk_tokens=64, prompt_fraction=0.0)
    assert all(r["question"] == "" for r in rows)
    window = tokenizer(text, add_special_tokens=False)["input_ids"][:64]
    enc = encode_qa(tokenizer, PROFILES["raw"], rows[0]["question"], rows[0]["answer"], 128)
    assert enc["input_ids"][0] == tokenizer.bos_token_id and enc["labels"][0] == -100
    assert enc["labels"][1:] == enc["input_ids"][1:] and enc["input_ids"][1:65] == window
    cfg = load_config(None, ["data.benchmark=muse_news", "data.prompt_fraction=0"])
    assert cfg.data.prompt_fraction == 0
    with pytest.raises(FlatRayError, match=r"data.prompt_fraction must be in \[0, 1\), got 1"):
        load_config(None, ["data.benchmark=muse_news", "data.prompt_fraction=1"])


def test_completion_rows_split_passages_by_words():
    rows = completion_rows([{"text": " ".join(map(str, range(10)))}, {"text": "a b"}], prompt_words=4, max_rows=None)
    assert rows[0] == {"prompt": "0 1 2 3", "continuation": "4 5 6 7 8 9"}
    assert rows[1] == {"prompt": "a", "continuation": "b"}  # shorter than the prompt: split in half
    assert len(completion_rows([{"text": "x y z"}] * 5, 1, max_rows=2)) == 2


def test_min_k_auc_and_privleak_by_hand():
    assert muse.min_k_score(np.array([-1.0, -5.0, -2.0, -0.5, -3.0]), 0.4) == pytest.approx(4.0)  # mean(5, 3)
    assert muse.min_k_score(np.array([-2.0]), 0.4) == pytest.approx(2.0)
    # holdout above forget in 1 of 4 pairs
    assert muse.roc_auc([0.9, 0.8], [0.1, 0.85]) == pytest.approx(0.25)
    assert muse.roc_auc([0.5], [0.5]) == pytest.approx(0.5)  # ties count half
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(0.5, size=25)
    assert muse.roc_auc(a, b) == pytest.approx(roc_auc_score([0] * 30 + [1] * 25, np.concatenate([a, b])))
    assert muse.privleak(0.25, 0.4772) == pytest.approx(100 * (0.25 - 0.4772) / 0.4772)
    assert muse.privleak(0.4772, 0.4772) == 0.0


def test_knowmem_prompt_and_answer_cut_follow_muse():
    shots = [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
    assert muse.icl_prompt(shots, "Q3?") == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q3?\nAnswer: "
    assert muse.cut_answer(" Paris\n\nQuestion: next?") == "Paris"
    assert muse.cut_answer("Rome Question: x") == "Rome"
    assert muse.rouge_l_f1("the red fox", "the red fox") == 1.0
    assert hp.bleu("the cat sat on the mat today", "the cat sat on the mat today") == pytest.approx(100.0)
    assert hp.bleu("completely different words here now", "the cat sat on the mat today") < 10


def test_muse_rouge_does_not_stem():
    """MUSE's RougeEvalLogger uses rouge_score without the stemmer. Target "the cats jumped over the fences",
    prediction "the cat jumps over the fence": the unstemmed LCS is "the over the", 3 of 6 words each side, so
    P = R = F1 = 0.5 (the Porter stemmer would match all six words: 1.0)."""
    assert muse.rouge_l_f1("the cat jumps over the fence", "the cats jumped over the fences") == pytest.approx(0.5)


def test_knowmem_cuts_only_at_muses_stop_strings():
    """MUSE cuts before the first "\\n\\n", "\\nQuestion" or "Question:"; a bare "Question" in an answer stays."""
    assert muse.cut_answer("The Question Mark Band") == "The Question Mark Band"
    assert muse.cut_answer("Paris\nQuestion 2") == "Paris"
    assert muse.cut_answer("Paris Question: next") == "Paris"
    assert muse.rouge_l_f1(muse.cut_answer("Question Mark Band"), "Question Mark Band") == 1.0


class WordTokenizer:
    """Whitespace tokenizer that prepends BOS (id 0) by default, as Llama's does."""

    def __init__(self):
        self.vocab = {"<s>": 0}

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]
        return {"input_ids": [0] * add_special_tokens + ids}

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids if not (skip_special_tokens and i == 0))


def test_verbmem_reference_keeps_muses_first_128_ids():
    """muse_bench's verbmem.py: tokenizer(gt, add_special_tokens=True).input_ids[:, :128], decoded skipping special
    tokens: with a BOS-adding tokenizer that is BOS + the first 127 words."""
    gt = " ".join(f"w{i}" for i in range(200))
    assert muse.verbmem_reference(WordTokenizer(), gt) == " ".join(f"w{i}" for i in range(127))


def test_hp_bleu_is_flats_corpus_bleu_of_one_pair():
    """FLAT's evaluate.py scores sacrebleu.corpus_bleu([gen], [[truth]]): all four n-gram orders, no effective
    order. "the cat" vs "the cat sat": no 3- or 4-grams in the hypothesis, precision 0 there, BLEU 0
    (sentence_bleu gave 100 * exp(1 - 3/2) = 60.65). From 4 tokens on both agree: "the cat sat on" vs
    "the cat sat on the mat" has all precisions 1 and brevity penalty exp(1 - 6/4)."""
    assert hp.bleu("the cat", "the cat sat") == 0.0
    assert hp.bleu("the cat sat on", "the cat sat on the mat") == pytest.approx(100 * np.exp(1 - 6 / 4))


def test_new_metrics_have_directions_and_scores():
    assert METRICS["verbmem_forget"].mode == "min" and METRICS["knowmem_retain"].mode == "max"
    assert METRICS["privleak_gap"].mode == "min" and METRICS["forget_bleu"].mode == "min"
    s = add_derived({"verbmem_forget": 20.0, "knowmem_retain": 60.0, "privleak": -35.0})
    assert s["privleak_gap"] == 35.0 and s["muse_score"] == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    c = add_derived({"forget_rougeL_recall": 0.25, "retain_rougeL_recall": 0.75})
    assert c["completion_score"] == pytest.approx(0.75)


def test_privleak_is_refused_as_an_objective(tmp_path):
    from flat_ray.sweep import load_space

    path = tmp_path / "s.yaml"
    path.write_text("base: [demo]\nobjective: privleak\n")
    with pytest.raises(FlatRayError, match="no better direction.*use privleak_gap"):
        load_space(str(path))


def test_muse_numbers_by_muses_own_rules_whatever_the_runs_max_length(tiny, muse_dir):
    """MUSE's code written out: PrivLeak scores each text whole (metrics/privleak.py: ``tokenizer.encode(text)``,
    no cut), so a run's data.max_length (16 here, shorter than every text) changes nothing; KnowMem cuts the raw
    decoded generation of each prompt alone at its first stop (metrics/knowmem.py), stripping nothing before."""
    import torch

    from flat_ray.eval.suites import suite_for
    from flat_ray.pipeline import profile_for

    model, tok = tiny
    cfg = load_config(None, ["data.benchmark=muse_news", f"data.data_dir={muse_dir}", "eval.max_examples=4",
                             "eval.batch_size=1", "data.max_length=16", "eval.privleak_auc_retrain=0.5"])
    suite = suite_for(cfg)
    rows = suite.rows(cfg, cfg.eval.max_examples)
    out = suite.run(model, tok, profile_for(cfg, "x", tok), rows, cfg)

    def minus_min_40(text: str) -> float:
        ids = torch.tensor([tok.encode(text)])
        assert ids.shape[1] > 16
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        lp = sorted(logp.gather(-1, ids[0, 1:, None]).squeeze(-1).tolist())
        return float(np.mean(lp[:max(1, int(len(lp) * 0.4))]))

    forget = [minus_min_40(r["text"]) for r in rows["privleak_forget"]]
    holdout = [minus_min_40(r["text"]) for r in rows["privleak_holdout"]]
    pairs = [(h > f) + 0.5 * (h == f) for h in holdout for f in forget]  # AUC: holdout is label 1
    assert out["privleak_auc"] == pytest.approx(np.mean(pairs))
    assert out["privleak"] == pytest.approx(100 * (np.mean(pairs) - 0.5) / 0.5)

    def knowmem(split: str) -> float:
        f1 = []
        for r in rows[f"knowmem_{split}"]:
            prompt = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in rows[f"icl_{split}"])
            ids = tok(prompt + f"Question: {r['question']}\nAnswer: ", return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
            text = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)[0]
            for stop in ("\n\n", "\nQuestion", "Question:"):
                text = text.split(stop)[0]
            f1.append(muse.rouge_l_f1(text, r["answer"]))
        return 100 * float(np.mean(f1))

    assert out["knowmem_forget"] == pytest.approx(knowmem("forget"))
    assert out["knowmem_retain"] == pytest.approx(knowmem("retain"))


def test_a_generation_that_opens_with_a_stop_scores_nothing_as_in_muse():
    """MUSE cuts the raw text: an answer that opens with a blank line is empty (F1 0); stripping first would keep
    "Paris"."""
    assert muse.cut_answer("\n\nParis\n\nQuestion: next?") == ""
    assert muse.rouge_l_f1(muse.cut_answer(" \n\nParis"), "Paris") == 0.0


def test_muse_and_hp_evaluation_on_the_tiny_model(tiny, muse_dir, book_dir):
    model, tokenizer = tiny
    cfg = load_config(None, ["data.benchmark=muse_news", f"data.data_dir={muse_dir}", "eval.max_examples=4",
                             "eval.batch_size=4", "data.max_length=64"])
    from flat_ray.eval.suites import suite_for
    from flat_ray.pipeline import profile_for

    suite = suite_for(cfg)
    rows = suite.rows(cfg, cfg.eval.max_examples)
    assert len(rows["verbmem"]) == 4 and len(rows["icl_forget"]) == 3
    out = suite.run(model, tokenizer, profile_for(cfg, "x", tokenizer), rows, cfg)
    for key in ("verbmem_forget", "knowmem_forget", "knowmem_retain"):
        assert 0.0 <= out[key] <= 100.0
    assert 0.0 <= out["privleak_auc"] <= 1.0
    assert out["privleak"] == pytest.approx(100 * (out["privleak_auc"] - 0.4772) / 0.4772)
    assert {"privleak_gap", "muse_score"} <= set(out)
    hp_cfg = load_config(None, ["data.benchmark=hp", f"data.data_dir={book_dir}", "eval.max_examples=3",
                                "eval.prompt_words=20", "eval.max_new_tokens=8"])
    hp_suite = suite_for(hp_cfg)
    hp_rows = hp_suite.rows(hp_cfg, 3)
    assert len(hp_rows["forget"]) == 3 and len(hp_rows["forget"][0]["prompt"].split()) == 20
    res = hp_suite.run(model, tokenizer, None, hp_rows, hp_cfg)
    assert {"forget_bleu", "forget_rougeL_recall", "retain_bleu", "retain_rougeL_recall", "completion_score"} <= set(res)


def test_text_benchmarks_use_the_raw_profile_and_train_on_chunks(tiny_model_dir, muse_dir):
    from flat_ray.pipeline import prepare

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "data.benchmark=muse_news",
                             f"data.data_dir={muse_dir}", "data.chunk_tokens=48", "data.max_length=64",
                             "model.profile=phi"])
    prep = prepare(cfg)
    item = prep.dataset[0]
    assert "template" in item and "forget" in item
    prompt_ids = [t for t, lab in zip(item["forget"]["input_ids"], item["forget"]["labels"], strict=True) if lab == -100]
    assert "Question:" not in prep.tokenizer.decode(prompt_ids)  # raw text, not the model's QA tags
    assert BENCHMARKS["muse_news"].text and BENCHMARKS["hp"].evaluation == "hp"


def test_retain_text_templates_are_whole_retain_texts_as_flats_hp_training(tiny_model_dir, book_dir):
    """data.template_source=retain_text: FLAT's released code on Harry Potter pairs each forget passage with a
    document of other text (C4), a sequence of its own, every token a label, not an answer after the forget
    prompt. Here each template is one of the retain split's texts, drawn per epoch from the seed."""
    from flat_ray.pipeline import prepare

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "data.benchmark=hp", f"data.data_dir={book_dir}",
                             "data.chunk_tokens=48", "data.max_length=400", "data.template_source=retain_text"])
    check_inputs(cfg)
    prep = prepare(cfg)
    tok, retain = prep.tokenizer, [r["text"] for r in load_split("hp", "retain", str(book_dir))]
    for i in range(len(prep.dataset)):
        template, forget = prep.dataset[i]["template"], prep.dataset[i]["forget"]
        assert template["labels"][0] == -100 and template["labels"][1:] == template["input_ids"][1:]  # BOS, all labels
        assert tok.decode(template["input_ids"], skip_special_tokens=True).strip() in retain
        assert forget["labels"].count(-100) > 1  # the forget chunk keeps its prompt
    from flat_ray.dryrun import dry_run

    shown = dry_run(cfg)["first_templates"]  # the dry run shows a long template's start only
    assert len(shown) == 3 and all(len(t) <= 80 and t[:60] in " ".join(retain) for t in shown)
    drawn = [tok.decode(prep.dataset[i]["template"]["input_ids"], skip_special_tokens=True) for i in range(6)]
    prep.dataset.set_epoch(1)
    assert drawn != [tok.decode(prep.dataset[i]["template"]["input_ids"], skip_special_tokens=True) for i in range(6)]
    with pytest.raises(FlatRayError, match="retain_text draws whole texts of the retain split: it needs a text"):
        from flat_ray.preflight import check_loadable

        check_loadable(load_config(None, ["data.template_source=retain_text"]))


@pytest.mark.slow
def test_npo_on_muse_news_trains_under_zero3_and_logs_per_epoch_muse_metrics(ray_local, tiny_model_dir, muse_dir,
                                                                              tmp_path):
    """The muse space's NPO cell in miniature, end to end on 2 ZeRO-3 workers: NPO's frozen reference engine
    sharded like the model, the retain batches (raw/retain1 chunks) reaching the loss, gradient checkpointing
    beside the reference engine; MUSE's metrics before and after the epoch; the export; and with accumulation 4,
    the optimizer steps the dry run counts. Every other method's direction is checked in process
    (tests/losses/test_method_steps.py)."""
    import torch
    from safetensors.torch import load_file

    from flat_ray import tracking
    from flat_ray.dryrun import dry_run
    from flat_ray.launch.driver import run_training

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "data.benchmark=muse_news",
                             f"data.data_dir={muse_dir}", "data.chunk_tokens=48", "data.max_length=64",
                             "method.name=npo", "model.gradient_checkpointing=true", "deepspeed.stage=3",
                             "optim.epochs=1", "optim.micro_batch_size=2", "optim.grad_accum_steps=4", "optim.lr=1e-3",
                             "eval.max_examples=4", "eval.batch_size=4", f"paths.workdir={tmp_path}",
                             "tracking.run_name=muse-npo"])
    result = run_training(cfg)
    for key in ("verbmem_forget", "knowmem_retain", "privleak", "muse_score"):
        hist = tracking.metric_history(result.mlflow_uri, result.run_id, f"eval/{key}")
        assert [step for step, _ in hist] == [0, 1], key
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(result.model_dir / "model.safetensors")  # exported, whole
    assert sum(not torch.equal(before[k], after[k]) for k in before) >= len(before) - 2
    steps = dry_run(cfg)["optimizer_steps"]
    losses = tracking.metric_history(result.mlflow_uri, result.run_id, "train/loss")
    assert [s for s, _ in losses] == list(range(1, steps + 1)) and steps >= 1
    assert all(np.isfinite(v) for _, v in losses)
    retain = tracking.metric_history(result.mlflow_uri, result.run_id, "train/ce_retain")  # the retain batches
    assert len(retain) == steps and all(np.isfinite(v) and v > 0 for _, v in retain)
    run = tracking.run_data(result.mlflow_uri, result.run_id)
    assert run.data.tags["method"] == "npo" and run.data.params["method.name"] == "npo"
    assert run.data.params["resolved.model_loads"] == "2"  # its frozen reference is a second load (LoRA's is not)
    assert run.data.params["model.gradient_checkpointing"] == "True"


def test_flat_ray_eval_on_hp_writes_a_summary(tiny_model_dir, book_dir, tmp_path, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(tiny_model_dir), "--benchmark", "hp", "--data-dir", str(book_dir),
              "--max-examples", "2", "eval.prompt_words=20", "eval.max_new_tokens=6", "--json"])
    assert exit_info.value.code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"forget_bleu", "retain_rougeL_recall", "completion_score"} <= set(summary)
    written = json.loads((Path(summary["out_dir"]) / "summary.json").read_text())
    assert written["benchmark"] == "hp" and written["forget_bleu"] == summary["forget_bleu"]


def test_raw_prompts_longer_than_the_context_keep_their_end(tiny):
    from flat_ray.eval.runner import generate_texts

    model, tokenizer = tiny
    context = model.config.max_position_embeddings
    long_prompt = " ".join(["Report 3: the town of Harlow opened a new library."] * (context // 4))
    assert len(tokenizer(long_prompt)["input_ids"]) > context
    (text,) = generate_texts(model, tokenizer, [long_prompt], max_new_tokens=4, batch_size=1)
    # by hand: greedy decoding of the prompt's last (context - 4) tokens
    import torch

    ids = tokenizer(long_prompt)["input_ids"][-(context - 4):]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(out[0, len(ids):], skip_special_tokens=True) and text.strip()  # as decoded
    # a different beginning is cut away: the same continuation
    (other,) = generate_texts(model, tokenizer, ["An unrelated opening line. " * 8 + long_prompt], max_new_tokens=4,
                              batch_size=1)
    assert other == text


def _flat_rows(n: int, rng: random.Random, words: tuple[int, int]) -> list[dict]:
    """Rows in FLAT's completion-file schema: an instruction and an opening, the passage's true continuation."""
    vocab = "the keeper counted gulls and wrote the number in his logbook before tide turned then slept".split()
    return [{"prompt": "Finish this text: " + " ".join(rng.choice(vocab) for _ in range(rng.randint(*words))),
             "response": " ".join(rng.choice(vocab) for _ in range(rng.randint(10, 30)))} for _ in range(n)]


def _flats_padding(tokenizer, prompts: list[str], batch: int = 16) -> list[list[int]]:
    """FLAT's evaluate.py, written out: the prompts tokenised by `datasets.map` (batched: blocks of 1,000, each
    padded on the left with the EOS token to its longest), then cut into batches of 16 and each batch left-padded
    again by hand to its longest row. Returns every row's ids as the model sees them."""
    import copy

    from datasets import Dataset

    tok = copy.deepcopy(tokenizer)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    ds = Dataset.from_dict({"prompt": prompts}).map(
        lambda ex: tok(ex["prompt"], padding=True, truncation=True, max_length=1024), batched=True)
    out = []
    for s in range(0, len(ds), batch):
        ids = ds[s:s + batch]["input_ids"]
        width = max(len(x) for x in ids)
        out += [[tok.eos_token_id] * (width - len(x)) + x for x in ids]
    return out


def test_flat_widths_are_the_padding_of_flats_batches(tiny):
    """1,010 prompts: the first block of 1,000 shorter than the next 10, so the batch of rows 992-1007 spans both
    blocks and pads to the second's longest, as FLAT's code pads it."""
    _, tok = tiny
    rng = random.Random(3)
    prompts = [r["prompt"] for r in _flat_rows(1000, rng, (3, 12)) + _flat_rows(10, rng, (20, 25))]
    expected = [len(ids) for ids in _flats_padding(tok, prompts)]
    widths = hp.flat_widths([len(tok(p, truncation=True, max_length=1024)["input_ids"]) for p in prompts])
    assert widths == expected and expected[991] < expected[992] == expected[1009]


def test_hp_completion_file_scores_as_flats_evaluate(tiny, book_dir, tmp_path):
    """eval.completion_file: the forget side of the hp test is FLAT's evaluate.py on its own rows. Its steps written
    out here on the tiny model: `### Question: ` tags, FLAT's padding (above) attended to (generate gets no attention
    mask), 600 tokens in all (the tiny model's 512-token context here), the first generated token dropped, BLEU and
    ROUGE-L recall against `### Answer: ` and the whole response. The first `eval.max_examples` rows are scored,
    padded as among all rows."""
    import sacrebleu
    import torch

    from flat_ray.eval.runner import rouge_l_recall
    from flat_ray.eval.suites import suite_for

    model, tok = tiny
    rows = _flat_rows(40, random.Random(4), (3, 30))
    _jsonl(tmp_path / "hp_train_qa_200.jsonl", rows)
    padded = _flats_padding(tok, [f"### Question: {r['prompt']}\n" for r in rows])
    bleus, recalls = [], []
    for s in range(0, len(rows), 16):
        ids = torch.tensor(padded[s:s + 16])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_length=512, do_sample=False, eos_token_id=tok.eos_token_id)
        gens = tok.batch_decode(out[:, ids.shape[1] + 1:], skip_special_tokens=True)
        for gen, row in zip(gens, rows[s:s + 16], strict=True):
            reference = "### Answer: " + row["response"]
            bleus.append(sacrebleu.corpus_bleu([gen], [[reference]]).score)
            recalls.append(rouge_l_recall(gen, reference))
    for limit in (None, 10):
        cfg = load_config(None, ["data.benchmark=hp", f"data.data_dir={book_dir}", "eval.batch_size=6",
                                 f"eval.completion_file={tmp_path / 'hp_train_qa_200.jsonl'}"])
        check_inputs(cfg)
        got = suite_for(cfg).run(model, tok, None, {"forget": suite_for(cfg).rows(cfg, limit)["forget"]}, cfg)
        n = limit or len(rows)
        assert got["forget_bleu"] == pytest.approx(np.mean(bleus[:n]), abs=1e-6)
        assert got["forget_rougeL_recall"] == pytest.approx(np.mean(recalls[:n]), abs=1e-6)
    assert 0 < np.mean(recalls) < 1


@pytest.mark.parametrize(("args", "message"), [
    (["data.benchmark=tofu", "eval.completion_file={flat}"],
     "eval.completion_file is FLAT's Harry-Potter completion test: it needs data.benchmark hp, not 'tofu'"),
    (["data.benchmark=hp", "data.data_dir={book}", "eval.completion_file={tmp}/none.jsonl"],
     "eval.completion_file '{tmp}/none.jsonl' does not exist; give FLAT's data/hp/hp_train_qa_200.jsonl"),
    (["data.benchmark=hp", "data.data_dir={book}", "eval.completion_file={book}/retain.txt"],
     "retain.txt"),
    (["data.benchmark=hp", "data.data_dir={book}", "eval.completion_file={tmp}/null.jsonl"],
     "eval.completion_file {tmp}/null.jsonl: row 2 has a prompt or response that is not text"),
])
def test_a_bad_completion_file_is_refused_in_one_line(args, message, book_dir, tmp_path):
    flat = tmp_path / "flat.jsonl"
    _jsonl(flat, [{"prompt": "p", "response": "r"}])
    _jsonl(tmp_path / "null.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": None}])
    fill = {"flat": flat, "book": book_dir, "tmp": tmp_path}
    with pytest.raises(FlatRayError) as exc:
        check_inputs(load_config(None, [a.format(**fill) for a in args]))
    assert message.format(**fill) in str(exc.value) and "\n" not in str(exc.value)


def test_completion_file_edge_cases(tiny, book_dir, tmp_path, monkeypatch):
    """A `~` path reads as the preflight checked it; a prompt that fills FLAT's 600 tokens (here the tiny model's 512)
    gets an empty continuation instead of failing the evaluation; interim evaluations score the first
    eval.interim_examples rows, still padded as among all of them."""
    from flat_ray.eval.suites import interim_rows, scored, suite_for

    model, tok = tiny
    monkeypatch.setenv("HOME", str(tmp_path))
    rows = _flat_rows(5, random.Random(5), (3, 8))
    _jsonl(tmp_path / "flat.jsonl", rows)
    cfg = load_config(None, ["data.benchmark=hp", f"data.data_dir={book_dir}", "eval.completion_file=~/flat.jsonl"])
    check_inputs(cfg)
    forget = suite_for(cfg).rows(cfg, 3)["forget"]
    assert [r["prompt"] for r in forget] == [r["prompt"] for r in rows] and scored(forget) == 3
    assert scored(interim_rows({"forget": forget}, 2)["forget"]) == 2 and len(interim_rows({"x": rows}, 2)["x"]) == 2
    long = [{"prompt": " ".join(["keeper"] * 600), "response": rows[0]["response"]}, *rows[:2]]
    out = hp.evaluate(model, tok, {"forget": hp.first_rows(long, None)}, max_new_tokens=8, batch_size=4)
    assert out == {"forget_bleu": 0.0, "forget_rougeL_recall": 0.0}  # every prompt padded past the 512 tokens
