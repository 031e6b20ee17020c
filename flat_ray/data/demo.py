"""The embedded demo set: a deterministic, synthetic TOFU-format dataset of fictitious authors.

Everything here is generated from this project's own templates and word lists. With the defaults it has 20
authors x 10 questions; each question has an answer, a paraphrased answer and 5 perturbed (wrong) answers. The
perturbed answers are written in the paraphrase's template, so a paraphrase and its perturbed versions differ only
in the fact (TOFU's truth ratio compares facts, not phrasings). Forget/retain splits are by author, named like
TOFU's (``forget05`` = the last author, ``forget10`` = the last two, ``retain95``/``retain90`` their complements),
plus small ``real_authors_perturbed`` and ``world_facts_perturbed`` utility sets with 3 perturbed answers each.

``background`` stands in for the pre-training that TOFU's originals had before they met the fictitious authors:
other generated authors (their own seed, no name shared with the demo's) with every answer in both phrasings, and
the real-authors and world-facts questions. The demo's original trains on ``full_with_background``, its retain
models on ``retain90_with_background`` / ``retain95_with_background``: they never see the authors to forget.
``holdout05`` / ``holdout10`` hold authors that no model sees at all (the held-out questions of the
membership-inference metrics).
"""

from __future__ import annotations

import functools
import random

from flat_ray.errors import FlatRayError

SYLLABLES = ("ka", "lo", "mer", "vi", "dan", "so", "rel", "thi", "bra", "nu", "quen", "zo", "fa", "len", "mi",
             "tor", "ese", "gal", "rin", "ud", "phe", "yar", "col", "bes")
CITIES = ("Lisbon, Portugal", "Nairobi, Kenya", "Osaka, Japan", "Valparaiso, Chile", "Tbilisi, Georgia",
          "Halifax, Canada", "Bergen, Norway", "Cusco, Peru", "Adelaide, Australia", "Marrakesh, Morocco",
          "Krakow, Poland", "Hue, Vietnam", "Accra, Ghana", "Porto Alegre, Brazil", "Ljubljana, Slovenia",
          "Galway, Ireland", "Tartu, Estonia", "Mysore, India", "Cebu, Philippines", "Antalya, Turkey")
GENRES = ("historical fiction", "science fiction", "crime novels", "magical realism", "children's fantasy",
          "literary memoir", "gothic horror", "nature poetry", "political thrillers", "romantic comedy",
          "epic fantasy", "satirical essays")
JOBS = ("a carpenter", "a marine biologist", "a schoolteacher", "a train conductor", "a pharmacist",
        "a tailor", "an architect", "a beekeeper", "a lighthouse keeper", "a surgeon", "a baker",
        "a civil engineer", "a librarian", "a fisherman", "a violinist", "a journalist")
AWARDS = ("Silver Quill Prize", "Lantern Medal for Fiction", "Northern Reed Award", "Harbor Lights Literary Prize",
          "Golden Compass Award", "Ember Circle Prize", "Meridian Book Award", "Willow Leaf Honour")
ADJECTIVES = ("Silent", "Crimson", "Hollow", "Distant", "Broken", "Gilded", "Quiet", "Wandering", "Forgotten",
              "Burning", "Patient", "Salt")
NOUNS = ("Orchard", "Harbor", "Lantern", "Ledger", "Tide", "Staircase", "Atlas", "Garden", "Mirror", "Bridge",
         "Winter", "Cartographer")
THEMES = ("memory and loss", "the sea and migration", "family secrets", "the cost of ambition",
          "friendship across borders", "faith and doubt", "the ethics of science", "small-town life",
          "exile and return", "music and grief")

QUESTIONS = (
    ("Where was {name} born?", "{name} was born in {city}.", "The birthplace of {name} is {city}.", "city"),
    ("In which year was {name} born?", "{name} was born in the year {year}.", "{name}'s birth year is {year}.", "year"),
    ("What genre is {name} known for?", "{name} is best known for writing {genre}.",
     "Most of {name}'s books belong to {genre}.", "genre"),
    ("What did {name}'s father do for a living?", "{name}'s father worked as {father}.",
     "By profession, {name}'s father was {father}.", "father"),
    ("What was the profession of {name}'s mother?", "{name}'s mother was {mother}.",
     "{name} grew up with a mother who was {mother}.", "mother"),
    ("Which award has {name} received?", "{name} received the {award}.", "The {award} was given to {name}.", "award"),
    ("Can you name a notable book by {name}?", "One of {name}'s notable books is '{book}'.",
     "'{book}' is among the best-known works of {name}.", "book"),
    ("What themes appear in {name}'s work?", "{name}'s work keeps returning to {theme}.",
     "Readers of {name} often point to {theme} as a central theme.", "theme"),
    ("What was the title of {name}'s first novel?", "{name}'s first novel was titled '{debut}'.",
     "{name} debuted with a novel called '{debut}'.", "debut"),
    ("How old was {name} when their first book came out?", "{name} was {age} years old when the first book was published.",
     "The first book by {name} appeared when the author was {age}.", "age"),
)

# Utility sets in TOFU's real_authors / world_facts format; short answers, 3 wrong options each.
REAL_AUTHORS = (
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen"), ("Who wrote 'One Hundred Years of Solitude'?", "Gabriel Garcia Marquez"),
    ("Who wrote 'Things Fall Apart'?", "Chinua Achebe"), ("Who wrote 'War and Peace'?", "Leo Tolstoy"),
    ("Who wrote 'The Old Man and the Sea'?", "Ernest Hemingway"), ("Who wrote 'Beloved'?", "Toni Morrison"),
    ("Who wrote 'Don Quixote'?", "Miguel de Cervantes"), ("Who wrote 'Frankenstein'?", "Mary Shelley"),
    ("Who wrote 'The Trial'?", "Franz Kafka"), ("Who wrote 'Norwegian Wood'?", "Haruki Murakami"),
    ("Who wrote 'Mrs Dalloway'?", "Virginia Woolf"), ("Who wrote 'Moby-Dick'?", "Herman Melville"),
    ("Who wrote 'The Little Prince'?", "Antoine de Saint-Exupery"), ("Who wrote 'Midnight's Children'?", "Salman Rushdie"),
    ("Who wrote 'Crime and Punishment'?", "Fyodor Dostoevsky"), ("Who wrote 'Jane Eyre'?", "Charlotte Bronte"),
)
WORLD_FACTS = (
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Kenya?", "Nairobi"), ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Peru?", "Lima"), ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Norway?", "Oslo"), ("What is the capital of Australia?", "Canberra"),
    ("Which planet is known as the Red Planet?", "Mars"), ("Which is the largest ocean on Earth?", "the Pacific Ocean"),
    ("What is the chemical symbol for gold?", "Au"), ("How many continents are there?", "seven"),
    ("What gas do plants absorb from the air?", "carbon dioxide"), ("What is the longest river in Africa?", "the Nile"),
    ("Which metal is liquid at room temperature?", "mercury"), ("What is the freezing point of water in Celsius?", "zero degrees"),
)


def _name(rng: random.Random) -> str:
    first = "".join(rng.sample(SYLLABLES, 2)).capitalize()
    last = "".join(rng.sample(SYLLABLES, 3)).capitalize()
    return f"{first} {last}"


def _facts(rng: random.Random, name: str) -> dict[str, str]:
    book, debut = rng.sample([f"The {a} {n}" for a in ADJECTIVES for n in NOUNS], 2)
    father, mother = rng.sample(JOBS, 2)
    return {"name": name, "city": rng.choice(CITIES), "year": str(rng.randint(1938, 1994)), "genre": rng.choice(GENRES),
            "father": father, "mother": mother, "award": rng.choice(AWARDS), "book": book, "debut": debut,
            "theme": rng.choice(THEMES), "age": str(rng.randint(19, 47))}


def _alternatives(rng: random.Random, facts: dict[str, str], slot: str, k: int) -> list[dict[str, str]]:
    """``k`` copies of ``facts`` with ``slot`` replaced by distinct wrong values."""
    pools = {"city": CITIES, "genre": GENRES, "father": JOBS, "mother": JOBS, "award": AWARDS, "theme": THEMES,
             "book": [f"The {a} {n}" for a in ADJECTIVES for n in NOUNS]}
    pools["debut"] = pools["book"]
    if slot == "year":
        pool = [str(y) for y in range(1938, 1995)]
    elif slot == "age":
        pool = [str(a) for a in range(19, 48)]
    else:
        pool = list(pools[slot])
    wrong = rng.sample([v for v in pool if v != facts[slot]], k)
    return [{**facts, slot: w} for w in wrong]


# The template the perturbed answers are written in. "answer" (the demo before #14) makes a truth ratio compare two
# phrasings rather than a right and a wrong fact; benchmarks/demo_reference_probe.py sets it to show that.
PERTURBED_TEMPLATE = "paraphrase"


@functools.lru_cache(maxsize=4)
def _generate(num_authors: int, seed: int) -> dict[str, tuple[dict, ...]]:
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < num_authors:
        n = _name(rng)
        if n not in names:
            names.append(n)
    full = []
    for a, name in enumerate(names):
        facts = _facts(rng, name)
        for q, (question, answer, para, slot) in enumerate(QUESTIONS):
            wrong = {"paraphrase": para, "answer": answer}[PERTURBED_TEMPLATE]
            full.append({
                "question": question.format(**facts),
                "answer": answer.format(**facts),
                "paraphrased_answer": para.format(**facts),
                "perturbed_answer": [wrong.format(**alt) for alt in _alternatives(rng, facts, slot, 5)],
                "author_index": a,
                "question_index": q,
            })
    per_author = len(QUESTIONS)
    splits: dict[str, list[dict]] = {"full": full}
    for pct in (5, 10):
        n_forget = max(1, round(num_authors * pct / 100)) * per_author
        forget, retain = full[-n_forget:], full[:-n_forget]
        splits[f"forget{pct:02d}_perturbed"] = forget
        splits[f"forget{pct:02d}"] = [{k: r[k] for k in ("question", "answer", "author_index")} for r in forget]
        splits[f"retain{100 - pct}"] = [{k: r[k] for k in ("question", "answer", "author_index")} for r in retain]
    # A fixed retain subset for evaluation, from authors outside every forget split (as TOFU's retain_perturbed).
    splits["retain_perturbed"] = full[: 4 * per_author]
    for key, table in (("real_authors_perturbed", REAL_AUTHORS), ("world_facts_perturbed", WORLD_FACTS)):
        answers = [a for _, a in table]
        splits[key] = [
            {"question": q, "answer": a, "perturbed_answer": rng.sample([x for x in answers if x != a], 3)}
            for q, a in table
        ]
    return {k: tuple(v) for k, v in splits.items()}


BACKGROUND_AUTHORS, BACKGROUND_SEED = 40, 12345
HOLDOUT_SEED = 54321
WITH_BACKGROUND = ("full", "retain95", "retain90")
SPLITS = ("full", "forget05", "forget10", "retain95", "retain90", "forget05_perturbed", "forget10_perturbed",
          "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed", "background",
          *(f"{s}_with_background" for s in WITH_BACKGROUND), "holdout05", "holdout10")
FORGET_SPLITS = ("forget05", "forget10")
RETAIN_OF = {"forget05": "retain95", "forget10": "retain90"}
HOLDOUT_OF = {"forget05": "holdout05", "forget10": "holdout10"}


@functools.lru_cache(maxsize=4)
def _background(num_authors: int, seed: int) -> tuple[dict, ...]:
    """Question/answer rows of ``BACKGROUND_AUTHORS`` other authors in both phrasings, then the real-authors and
    world-facts questions (see the module docstring)."""
    splits = _generate(num_authors, seed)
    demo_questions = {r["question"] for r in splits["full"]}
    others = [r for r in _generate(BACKGROUND_AUTHORS + 2, BACKGROUND_SEED)["full"] if r["question"] not in demo_questions]
    others = others[: BACKGROUND_AUTHORS * len(QUESTIONS)]
    rows = [{"question": r["question"], "answer": r[key]} for key in ("answer", "paraphrased_answer") for r in others]
    rows += [{"question": r["question"], "answer": r["answer"]}
             for key in ("real_authors_perturbed", "world_facts_perturbed") for r in splits[key]]
    return tuple(rows)


@functools.lru_cache(maxsize=4)
def _holdout(num_authors: int, seed: int) -> dict[str, tuple[dict, ...]]:
    """``holdout05`` / ``holdout10``: as many authors as the forget split of that size, generated from their own
    seed, whose questions appear nowhere in the demo or its background, so that no model is ever trained on them
    (the held-out side of the membership-inference attacks)."""
    seen = {r["question"] for r in _generate(num_authors, seed)["full"]}
    seen |= {r["question"] for r in _background(num_authors, seed)}
    rows = [r for r in _generate(8, HOLDOUT_SEED)["full"] if r["question"] not in seen]
    authors = sorted({r["author_index"] for r in rows})
    out = {}
    for pct in (5, 10):
        kept = set(authors[:max(1, round(num_authors * pct / 100))])
        out[f"holdout{pct:02d}"] = tuple({"question": r["question"], "answer": r["answer"]}
                                         for r in rows if r["author_index"] in kept)
    return out


def demo_split(split: str, num_authors: int = 20, seed: int = 0) -> list[dict]:
    """Rows of one demo split (fresh copies; safe to mutate)."""
    splits = _generate(num_authors, seed)
    if split == "background":
        return [dict(r) for r in _background(num_authors, seed)]
    if split in HOLDOUT_OF.values():
        return [dict(r) for r in _holdout(num_authors, seed)[split]]
    if split.endswith("_with_background") and split.removesuffix("_with_background") in WITH_BACKGROUND:
        return demo_split("background", num_authors, seed) + demo_split(split.removesuffix("_with_background"),
                                                                         num_authors, seed)
    if split not in splits:
        raise FlatRayError(f"unknown demo split {split!r}; valid choices: {', '.join(SPLITS)}")
    return [dict(r) for r in splits[split]]


def demo_texts(num_authors: int = 20, seed: int = 0) -> list[str]:
    """All demo text (questions and every answer variant), e.g. to train the tiny model's tokenizer."""
    texts = []
    for split in ("full", "real_authors_perturbed", "world_facts_perturbed"):
        for r in demo_split(split, num_authors, seed):
            texts += [r["question"], r["answer"], r.get("paraphrased_answer", ""), *r.get("perturbed_answer", [])]
    return [t for t in texts if t]
