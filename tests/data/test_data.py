"""Data pipeline: formatting and masking, the collator, template answers, the demo generator, TOFU loaders."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from flat_ray.data import (
    BENCHMARKS,
    BUILTIN_TEMPLATES,
    Collator,
    UnlearnDataset,
    encode_qa,
    load_split,
    make_template_source,
)
from flat_ray.data import collator as collator_module
from flat_ray.data.templates import TemplateSource, read_template_file
from flat_ray.errors import FlatRayError
from flat_ray.models import PROFILES


# ------------------------------------------------------------------------------------------------ formatting
def test_encode_masks_exactly_the_prompt_and_appends_eos(tiny):
    _, tok = tiny
    profile = PROFILES["generic"]  # "Q: ...\nA: ": the prompt ends in a space that " Kalo" straddles
    question, answer = "Where was Kalo Vidanso born?", "Kalo Vidanso was born in Osaka, Japan."
    enc = encode_qa(tok, profile, question, answer, 256)
    n_prompt = enc["labels"].count(-100)
    assert enc["labels"][:n_prompt] == [-100] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert enc["input_ids"][-1] == tok.eos_token_id and enc["input_ids"][0] == tok.bos_token_id
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    # the whole answer is supervised (TOFU's prompt-length count would mask " Kalo", the first answer word) ...
    assert tok.decode(enc["labels"][n_prompt:-1]).strip() == answer
    # ... and the masked prefix is the prompt itself
    assert tok.decode(enc["input_ids"][:n_prompt], skip_special_tokens=True) == profile.prompt(question).rstrip()


def test_phi_encodes_the_answer_tag_as_the_answers_as_tofu_does(tiny):
    """TOFU (data_module.py) and FLAT's code mask len(tokenize(start + question + end)) tokens and supervise
    ``answer_tag + answer``; their Phi models learned the tag, and TOFU's published Phi logs score it. Generation
    starts where the labels do, before the tag."""
    from flat_ray.eval.runner import generate

    model, tok = tiny
    question, answer = "Where was Kalo Vidanso born?", "Kalo Vidanso was born in Osaka, Japan."
    enc = encode_qa(tok, PROFILES["phi"], question, answer, 256)
    tofu_masked = len(tok.tokenize("Question: " + question + "\n", add_special_tokens=True))  # TOFU's count
    assert enc["labels"].count(-100) == tofu_masked
    assert enc["labels"][:tofu_masked] == [-100] * tofu_masked
    assert tok.decode(enc["labels"][tofu_masked:-1]) == "Answer: " + answer
    assert enc["input_ids"] == tok("Question: " + question + "\nAnswer: " + answer)["input_ids"] + [tok.eos_token_id]
    prompts, _ = generate(model, tok, PROFILES["phi"], [(question, answer)], max_length=256, max_new_tokens=2,
                          batch_size=1)
    assert prompts == ["Question: " + question + "\n"]
    # open-unlearning's convention (and flat_ray's other profiles): the tag is the prompt's, masked
    generic = encode_qa(tok, PROFILES["generic"], question, answer, 256)
    assert tok.decode(generic["input_ids"][:generic["labels"].count(-100)], skip_special_tokens=True) == \
        "Q: " + question + "\nA:"


def test_encode_truncates_the_answer_end_and_rejects_prompts_that_fill_max_length(tiny):
    _, tok = tiny
    enc = encode_qa(tok, PROFILES["generic"], "Q?", "word " * 200, 32)
    assert len(enc["input_ids"]) == 32 and any(t != -100 for t in enc["labels"])
    with pytest.raises(FlatRayError, match="raise data.max_length"):
        encode_qa(tok, PROFILES["generic"], "a long question " * 20, "yes", 16)


def test_llama2_chat_profile_uses_tofu_tags():
    assert PROFILES["llama2_chat"].prompt("Who?") == "[INST] Who? [/INST]"
    assert PROFILES["phi"].prompt("Who?") == "Question: Who?\nAnswer: "
    assert PROFILES.canonical("llama2-7b") == "llama2_chat"


def test_chat_template_profile_uses_the_tokenizers_template(tiny):
    _, tok = tiny
    with pytest.raises(FlatRayError, match="chat template"):
        PROFILES["chat_template"].prompt("Who?", tok)
    tok2 = type(tok).from_pretrained(tok.name_or_path)
    tok2.chat_template = "{% for m in messages %}<s>[U] {{ m['content'] }} [A]{% endfor %}"
    enc = encode_qa(tok2, PROFILES["chat_template"], "Who?", "Nobody.", 64)
    assert tok2.decode(enc["input_ids"]).startswith("<s>[U] Who? [A]")
    assert enc["input_ids"].count(tok2.bos_token_id) == 1  # the template's BOS, not a second one


# ---------------------------------------------------------------------------------------------------- collator
def test_collator_docstring_example():
    result = doctest.testmod(collator_module)
    assert result.attempted > 0 and result.failed == 0


def test_collator_pads_nested_named_splits_each_to_its_own_length():
    c = Collator(pad_token_id=7)
    feats = [
        {"forget": {"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [-100, 2]},
         "template": {"input_ids": [1, 2, 3, 4], "attention_mask": [1] * 4, "labels": [-100, 2, 3, 4]},
         "index": 0, "meta": {"split": "a"}},
        {"forget": {"input_ids": [1, 2, 3], "attention_mask": [1] * 3, "labels": [-100, -100, 3]},
         "template": {"input_ids": [5], "attention_mask": [1], "labels": [5]},
         "index": 1, "meta": {"split": "b"}},
    ]
    b = c(feats)
    assert b["forget"]["input_ids"].tolist() == [[1, 2, 7], [1, 2, 3]]
    assert b["forget"]["labels"].tolist() == [[-100, 2, -100], [-100, -100, 3]]
    assert b["forget"]["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b["template"]["input_ids"].shape == (2, 4)
    assert b["index"].tolist() == [0, 1] and b["meta"]["split"] == ["a", "b"]
    assert b["forget"]["input_ids"].dtype == torch.long


def test_collator_left_padding_and_multiple():
    c = Collator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)
    b = c([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}, {"input_ids": [4], "attention_mask": [1]}])
    assert b["input_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


# --------------------------------------------------------------------------------------------------- templates
def test_builtin_templates_are_many_and_distinct():
    assert len(BUILTIN_TEMPLATES) >= 30
    assert len(set(BUILTIN_TEMPLATES)) == len(BUILTIN_TEMPLATES)


def test_template_assignment_is_seeded_per_epoch():
    a = TemplateSource(pool=BUILTIN_TEMPLATES, seed=3)
    b = TemplateSource(pool=BUILTIN_TEMPLATES, seed=3)
    assert a.assign(50, epoch=0) == b.assign(50, epoch=0)
    assert a.assign(50, epoch=0) != a.assign(50, epoch=1)
    assert a.assign(50, epoch=0) != TemplateSource(pool=BUILTIN_TEMPLATES, seed=4).assign(50, epoch=0)
    assert set(a.assign(500)) <= set(BUILTIN_TEMPLATES) and len(set(a.assign(500))) > 20


TEMPLATE_FILES = {  # file name: (content, templates read)
    "t.jsonl": ('{"text": "No idea."}\n\n{"text": "Unknown to me."}\n', ["No idea.", "Unknown to me."]),
    "h.csv": ("text\nNo idea.\n\"Can't say, sorry.\"\n", ["No idea.", "Can't say, sorry."]),
    "n.csv": ("No idea.\nPass.\n", ["No idea.", "Pass."]),
    # TOFU's data/idontknow.jsonl (FLAT's templates): one plain refusal per line, whatever its suffix
    "idontknow.jsonl": ("I'm not certain about that.\nThat's beyond my current knowledge base.\n",
                        ["I'm not certain about that.", "That's beyond my current knowledge base."]),
    "t.txt": ("No idea.\n\nPass.\n", ["No idea.", "Pass."]),
}
REFUSED_TEMPLATE_FILES = {  # file name: (content, the refusal's pattern)
    "bad.jsonl": ('{"txt": "x"}\n', r"bad.jsonl:1: expected an object with a string field 'text'"),
    "empty.csv": ("text\n", "contains no templates"),
    "x.yaml": ("a", "use .jsonl, .txt or .csv"),
    "mixed.jsonl": ('No idea.\n{"text": "Pass."}\n', r"mixed.jsonl:2: a JSON object in a file of plain lines"),
    "broken.jsonl": ('{"text": "No idea."\n', r"broken.jsonl:1: not valid JSON"),
}


def test_template_files_jsonl_and_csv_with_and_without_header(tmp_path):
    for name, (content, templates) in TEMPLATE_FILES.items():
        (tmp_path / name).write_text(content)
        assert read_template_file(tmp_path / name) == templates, name
    for name, (content, message) in REFUSED_TEMPLATE_FILES.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(FlatRayError, match=message):
            read_template_file(tmp_path / name)


def test_template_column_source():
    rows = [{"question": "q1", "answer": "a1", "idk": "Nope."}, {"question": "q2", "answer": "a2", "idk": "Pass."}]
    src = make_template_source("column", rows, seed=0, column="idk")
    assert src.assign(2, epoch=5) == ["Nope.", "Pass."]
    with pytest.raises(FlatRayError, match="missing or empty in 2 forget rows"):
        make_template_source("column", rows, seed=0, column="other")


# -------------------------------------------------------------------------------------------------------- demo
def test_demo_set_shape_and_author_split():
    full = load_split("demo", "full")
    authors = {r["author_index"] for r in full}
    assert len(authors) >= 20 and len(full) >= 200
    for r in full:
        assert r["question"] and r["answer"] and r["paraphrased_answer"] and r["paraphrased_answer"] != r["answer"]
        assert len(r["perturbed_answer"]) >= 3 and r["answer"] not in r["perturbed_answer"]
    for forget, retain in (("forget05", "retain95"), ("forget10", "retain90")):
        f = {r["author_index"] for r in load_split("demo", forget)}
        r_ = {r["author_index"] for r in load_split("demo", retain)}
        assert f and not f & r_ and f | r_ == authors
    assert [r["question"] for r in load_split("demo", "forget10_perturbed")] == [r["question"] for r in load_split("demo", "forget10")]
    for split in ("real_authors_perturbed", "world_facts_perturbed"):
        rows = load_split("demo", split)
        assert len(rows) >= 10 and all(len(r["perturbed_answer"]) == 3 for r in rows)
    retain_eval = {r["author_index"] for r in load_split("demo", "retain_perturbed")}
    assert not retain_eval & {r["author_index"] for r in load_split("demo", "forget10")}


def test_demo_perturbed_answers_differ_from_the_paraphrase_only_in_the_fact():
    """A wrong answer is the paraphrase with another fact (city, year, book, ...): the truth ratio compares facts."""
    import difflib

    for r in load_split("demo", "forget10_perturbed") + load_split("demo", "retain_perturbed"):
        for wrong in r["perturbed_answer"]:
            assert wrong != r["paraphrased_answer"]
            blocks = difflib.SequenceMatcher(None, r["paraphrased_answer"], wrong).get_matching_blocks()
            # everything around one changed span is shared (prefix and suffix of the paraphrase's template)
            assert sum(b.size for b in blocks) >= len(r["paraphrased_answer"]) - 40, (r["paraphrased_answer"], wrong)


def test_demo_background_is_other_authors_in_both_phrasings_and_the_retain_models_never_see_the_forget_authors():
    from flat_ray.data.demo import BACKGROUND_AUTHORS, QUESTIONS

    background = load_split("demo", "background")
    full = load_split("demo", "full")
    demo_questions = {r["question"] for r in full}
    general = {r["question"] for s in ("real_authors_perturbed", "world_facts_perturbed") for r in load_split("demo", s)}
    authors = [r for r in background if r["question"] not in general]
    assert len(authors) == 2 * BACKGROUND_AUTHORS * len(QUESTIONS)  # every question twice: answer and paraphrase
    assert not {r["question"] for r in authors} & demo_questions  # other people, not the demo's authors
    assert {r["question"] for r in background} - {r["question"] for r in authors} == general
    assert len({r["answer"] for r in authors}) == len(authors)  # two different phrasings of each fact
    for pct, retain in ((5, "retain95"), (10, "retain90")):
        forget = {r["question"] for r in load_split("demo", f"forget{pct:02d}")}
        rows = load_split("demo", f"{retain}_with_background")
        assert len(rows) == len(background) + len(load_split("demo", retain))
        assert not {r["question"] for r in rows} & forget  # the retain model never sees the authors to forget
    assert len(load_split("demo", "full_with_background")) == len(background) + len(full)


def test_demo_set_is_deterministic_across_processes():
    code = "import json; from flat_ray.data.demo import demo_split; print(json.dumps(demo_split('full')))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1
    assert json.loads(outs.pop()) == load_split("demo", "full")


def test_demo_unknown_split():
    with pytest.raises(FlatRayError, match="unknown demo split 'forget99'.*forget05, forget10"):
        load_split("demo", "forget99")


# -------------------------------------------------------------------------------------------------------- TOFU
def test_tofu_local_dir_json_lines_named_json(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    (tmp_path / "forget01.json").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_split("tofu", "forget01", str(tmp_path)) == rows
    (tmp_path / "forget05.json").write_text(json.dumps(rows))  # a JSON list works too
    assert load_split("tofu", "forget05", str(tmp_path)) == rows


def test_tofu_local_dir_schema_and_missing_split_errors(tmp_path):
    (tmp_path / "forget01.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(FlatRayError, match=r"row 1 lacks field\(s\) answer"):
        load_split("tofu", "forget01", str(tmp_path))
    (tmp_path / "forget05.jsonl").write_text("")
    with pytest.raises(FlatRayError, match="contains no rows"):
        load_split("tofu", "forget05", str(tmp_path))
    with pytest.raises(FlatRayError, match="no forget10.jsonl or forget10.json.*splits there: forget01, forget05"):
        load_split("tofu", "forget10", str(tmp_path))


def test_tofu_hub_offline_fails_fast_with_a_pointer_to_local_files(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(FlatRayError, match=r"cannot load locuslab/TOFU config 'forget01'.*set data.data_dir"):
        load_split("tofu", "forget01")
    assert time.monotonic() - start < 20


def test_benchmarks_registry():
    assert {"tofu", "demo"} <= set(BENCHMARKS.keys())
    assert BENCHMARKS["tofu"].retain_of["forget10"] == "retain90"


def test_real_tofu_excerpt_formats_and_masks(tofu_mini, tiny):
    _, tok = tiny
    rows = load_split("tofu", "forget", str(tofu_mini))
    assert len(rows) == 40 and {"question", "answer", "author_index"} <= set(rows[0])
    src = make_template_source("file", rows, seed=0, path=str(tofu_mini / "idontknow.jsonl"))
    assert len(src.pool) == 100
    ds = UnlearnDataset(rows, tok, PROFILES["llama2_chat"], src, max_length=512)
    lengths = []
    for i in range(len(ds)):
        item = ds[i]
        for part in ("forget", "template"):
            ids, labels = item[part]["input_ids"], item[part]["labels"]
            n_prompt = labels.count(-100)
            assert labels[:n_prompt] == [-100] * n_prompt
            assert tok.decode(ids[:n_prompt], skip_special_tokens=True) == PROFILES["llama2_chat"].prompt(rows[i]["question"])
            assert ids[-1] == tok.eos_token_id and tok.pad_token_id not in ids[:-1]
            if part == "forget":
                assert tok.decode(ids[n_prompt:-1]).strip() == rows[i]["answer"].strip()
            lengths.append(len(ids))
        assert tok.decode(item["template"]["input_ids"][n_prompt:], skip_special_tokens=True).strip() in src.pool
    assert max(lengths) < 512 and len(set(lengths)) > 5  # no fixed-length padding
    batch = Collator(tok.pad_token_id)([ds[i] for i in range(4)])
    assert batch["forget"]["input_ids"].shape[1] == max(len(ds[i]["forget"]["input_ids"]) for i in range(4))
    for split in ("real_authors_perturbed", "world_facts_perturbed"):
        util = load_split("tofu", split, str(tofu_mini))
        assert all(len(r["perturbed_answer"]) == 3 for r in util)


def test_dataset_pairs_each_question_with_its_template_and_reassigns_per_epoch(tiny):
    _, tok = tiny
    rows = load_split("demo", "forget10")
    ds = UnlearnDataset(rows, tok, PROFILES["generic"], TemplateSource(pool=BUILTIN_TEMPLATES, seed=0), max_length=128)
    first = list(ds.assignment)
    item = ds[3]
    prompt = item["forget"]["labels"].count(-100)
    assert item["template"]["labels"].count(-100) == prompt
    assert item["forget"]["input_ids"][:prompt] == item["template"]["input_ids"][:prompt]
    assert tok.decode(item["template"]["input_ids"][prompt:], skip_special_tokens=True).strip() == first[3]
    ds.set_epoch(1)
    assert ds.assignment != first and ds[3]["forget"] == item["forget"]
