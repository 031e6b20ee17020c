"""P1: flat_ray's FLAT training step vs a step built the way the released FLAT code trains, side by side.

    python benchmarks/reference_step.py [--hidden 512 --layers 4 --batch-size 4 --steps 8 --threads 2]

Both steps run in plain torch (no DeepSpeed, no Ray) on copies of the same tiny Llama-style model (fp32, CPU),
the same TOFU-format forget rows (``../shared/data/tofu_mini/forget.jsonl``, else the demo's forget10), the same
prompts (flat_ray's ``encode_qa`` with the profile flat_ray picks for the model) and the same template answers
(flat_ray's built-in refusals), in the same batches of the same size. Only the step differs.

The reference-style step re-creates, in this project's own code, how UCSC-REAL/FLAT@bf2ef07 trains on TOFU:

- every sequence is padded to a fixed length (500, TOFU's ``max_length`` for QA);
- the template answer and the forget answer each get their own forward pass;
- each score is the ``repo`` normalisation, computed with a per-sample Python loop: a full softmax over the
  vocabulary, a gather of the gold token, and a running sum of the probabilities, divided by ``B * (T - 1)``;
- the loss is total variation, ``-tanh(s_e)/2 + tanh(s_f)/2`` (the released code's default divergence);
- an HF-``Trainer``-like step: ``loss.backward()``, clip the gradient norm, AdamW step, ``zero_grad``, and the
  loss read with ``.item()`` every step.

flat_ray's step: the flat_ray ``Collator`` pads each split to its batch's longest sequence,
``flat_ray.engine.step.method_loss`` with ``METHODS["flat"]`` runs one forward over both splits concatenated,
then the same backward, clipping and AdamW step; the metrics are read once per step, as the training loop does.

Before anything is timed, the first batch is padded to 500 for both steps and flat_ray's ``repo`` loss and
gradients must equal the reference's (loss and scores rtol 1e-5, gradients relative error 1e-4). The timed
steps then run interleaved (one step of each path per round, in rotating order), so the background load of the
shared machine falls on all paths alike. A step's time covers collation of pre-tokenised items, forward,
loss, backward, clipping, the optimizer step and the host read of the loss. Tokens count real (non-pad)
tokens of both splits, the same for every path; tokens/s is the median over the timed steps of the step's real
tokens / its time. "vs reference" is the ratio of median step times; "per-round" is the median over rounds of
the reference's step time / the path's, each pair on the same batch and close in time. The defaults (2 warm-up
+ 8 timed rounds of batch 4) go once through the 40 tofu_mini rows: 75-85 s on a 2-core machine under light load,
nearly 4 min while other test suites shared it. ``--threads`` sets torch's intra-op threads (default: all cores).
Two ablation rows say where the time goes: flat_ray's step on batches padded to 500, and flat_ray's loss on two
forward passes, each split padded only to its own longest sequence. Prints one row per path and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from flat_ray.data import BUILTIN_TEMPLATES, Collator, UnlearnDataset, load_split, make_template_source  # noqa: E402
from flat_ray.data.demo import demo_texts  # noqa: E402
from flat_ray.engine.step import method_loss  # noqa: E402
from flat_ray.losses import IGNORE_INDEX, METHODS  # noqa: E402
from flat_ray.models import TinySpec, build_tiny_model, load_model_and_tokenizer, resolve_profile  # noqa: E402

TOFU_MINI = ROOT.parent / "shared" / "data" / "tofu_mini"
REFERENCE_LENGTH = 500  # TOFU's (and the released FLAT code's) max_length for QA


# ------------------------------------------------------------------------------------- reference-style step
def reference_collate(items: Sequence[dict], length: int, pad_id: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """Pad every sequence to ``length`` (not to the batch's longest): ``(input_ids, labels, attention_mask)``
    per split, as a fixed-length QA dataset followed by the default stacking collator gives them."""
    def fixed(enc: dict) -> tuple[list[int], list[int], list[int]]:
        n = len(enc["input_ids"])
        extra = length - n
        return enc["input_ids"] + [pad_id] * extra, enc["labels"] + [IGNORE_INDEX] * extra, [1] * n + [0] * extra

    out = {}
    for split in ("template", "forget"):
        ids, labels, mask = zip(*(fixed(item[split]) for item in items), strict=True)
        out[split] = (torch.tensor(ids), torch.tensor(labels), torch.tensor(mask))
    return out


def reference_score(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``repo`` score with a per-sample loop: sum of gold-token probabilities over the padded batch / B*(T-1)."""
    batch, length, _ = logits.shape
    total = logits.new_zeros(())
    for b in range(batch):
        probs = torch.softmax(logits[b, :-1], dim=-1)  # (T-1, V): the full distribution, kept for backward
        target = labels[b, 1:]
        counts = target != IGNORE_INDEX
        gold = probs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total = total + (gold * counts).sum()
    return total / (batch * (length - 1))


def reference_loss(model: Any, batch: dict[str, tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """Total-variation FLAT loss with two forward passes; returns ``(loss, s_e, s_f)``."""
    e_ids, e_labels, e_mask = batch["template"]
    f_ids, f_labels, f_mask = batch["forget"]
    s_e = reference_score(model(input_ids=e_ids, attention_mask=e_mask).logits, e_labels)
    s_f = reference_score(model(input_ids=f_ids, attention_mask=f_mask).logits, f_labels)
    return -0.5 * torch.tanh(s_e) + 0.5 * torch.tanh(s_f), s_e, s_f


def reference_step(model: Any, opt: torch.optim.Optimizer, items: Sequence[dict], pad_id: int,
                   max_grad_norm: float) -> float:
    batch = reference_collate(items, REFERENCE_LENGTH, pad_id)
    loss, _, _ = reference_loss(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    model.zero_grad()
    return loss.item()  # read every step, as the Trainer's logging of the released code does


# --------------------------------------------------------------------------------------------- flat_ray step
def flat_ray_step(model: Any, opt: torch.optim.Optimizer, items: Sequence[dict], collator: Collator,
                  knobs: dict[str, str], max_grad_norm: float) -> float:
    out = method_loss(model, collator(items), METHODS["flat"], knobs)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    model.zero_grad()
    return out.metrics["loss"]  # one host read per step, as flat_ray.engine.loop does


def separate_forward_step(model: Any, opt: torch.optim.Optimizer, items: Sequence[dict], collator: Collator,
                          knobs: dict[str, str], max_grad_norm: float) -> float:
    """Ablation: flat_ray's collator and loss, but each split forwarded alone at its own padded width."""
    batch = collator(items)
    inputs = {k: (model(input_ids=batch[k]["input_ids"], attention_mask=batch[k]["attention_mask"]).logits,
                  batch[k]["labels"]) for k in METHODS["flat"].batch_keys}
    out = METHODS["flat"].loss(inputs, **knobs)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    model.zero_grad()
    return out.metrics["loss"]


# ------------------------------------------------------------------------------------------------ the checks
def gradients(model: Any) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def check_equal_at_equal_padding(model: Any, items: Sequence[dict], pad_id: int) -> dict[str, float]:
    """flat_ray's ``repo`` loss and gradients on a batch padded to 500 must equal the reference loop's."""
    model.zero_grad()
    ref_loss, ref_e, ref_f = reference_loss(model, reference_collate(items, REFERENCE_LENGTH, pad_id))
    ref_loss.backward()
    ref_grads = gradients(model)
    model.zero_grad()
    padded = Collator(pad_id, pad_to_multiple_of=REFERENCE_LENGTH)(items)
    if padded["forget"]["input_ids"].shape[1] != REFERENCE_LENGTH:
        raise RuntimeError(f"a sequence is longer than {REFERENCE_LENGTH} tokens; the check needs equal padding")
    out = method_loss(model, padded, METHODS["flat"], {"divergence": "tv", "normalize": "repo"})
    out.loss.backward()
    flat_grads = gradients(model)
    model.zero_grad()
    m = out.metrics
    torch.testing.assert_close(torch.tensor([m["score_template"], m["score_forget"]]),
                               torch.tensor([ref_e.item(), ref_f.item()]), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(torch.tensor(m["loss"]), torch.tensor(ref_loss.item()), rtol=1e-5, atol=0.0)
    worst = max(float((f - r).norm() / r.norm().clamp(min=1e-30)) for f, r in zip(flat_grads, ref_grads, strict=True))
    if worst > 1e-4:
        raise AssertionError(f"gradients differ: worst per-parameter relative error {worst:.2e} > 1e-4")
    with torch.no_grad():
        dynamic = method_loss(model, Collator(pad_id)(items), METHODS["flat"], {"divergence": "tv", "normalize": "repo"})
    return {"loss_ref": ref_loss.item(), "loss_flat_ray": m["loss"], "grad_rel_err": worst,
            "loss_repo_dynamic": dynamic.metrics["loss"]}


# ------------------------------------------------------------------------------------------------------ main
def load_rows() -> tuple[list[dict], list[str], str]:
    """Forget rows, the texts to train the tokenizer on, and where the rows came from."""
    if (TOFU_MINI / "forget.jsonl").is_file():
        rows = load_split("tofu", "forget", str(TOFU_MINI))
        corpus = rows + (load_split("tofu", "retain", str(TOFU_MINI)) if (TOFU_MINI / "retain.jsonl").is_file() else [])
        return rows, [f"{r['question']} {r['answer']}" for r in corpus], "tofu_mini/forget.jsonl (TOFU forget10, first 40)"
    return load_split("demo", "forget10"), demo_texts(), "demo forget10 (../shared/data/tofu_mini is absent)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048, help="vocabulary of the BPE tokenizer trained on the TOFU text")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per path")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    ap.add_argument("--no-ablations", action="store_true",
                    help="skip the two ablation rows (flat_ray's step padded to 500; splits forwarded separately)")
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows, texts, source = load_rows()
    spec = TinySpec(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                    num_layers=args.layers, num_heads=max(1, args.hidden // 64))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(texts + list(BUILTIN_TEMPLATES), tmp, spec)

        def fresh() -> tuple[Any, torch.optim.Optimizer]:
            model = load_model_and_tokenizer(str(model_dir))[0].train()
            return model, torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)

        _, tok = load_model_and_tokenizer(str(model_dir), load_model=False)
        profile = resolve_profile("auto", str(model_dir), tok)
        dataset = UnlearnDataset(rows, tok, profile, make_template_source("builtin", rows, seed=0),
                                 max_length=REFERENCE_LENGTH)
        items = [dataset[i] for i in range(len(dataset))]  # tokenised once, outside every timed step
        batches = [items[i:i + args.batch_size] for i in range(0, len(items), args.batch_size)]
        pad_id = tok.pad_token_id

        check = check_equal_at_equal_padding(fresh()[0], batches[0], pad_id)

        clip = 1.0
        paths: dict[str, Callable[..., float]] = {
            "reference-style (pad 500, 2 forwards, per-sample loop, repo)":
                lambda m, o, b: reference_step(m, o, b, pad_id, clip),
        }
        if not args.no_ablations:
            paths["ablation: flat_ray step padded to 500 (repo)"] = lambda m, o, b: flat_ray_step(
                m, o, b, Collator(pad_id, pad_to_multiple_of=REFERENCE_LENGTH), {"divergence": "tv", "normalize": "repo"},
                clip)
            paths["ablation: flat_ray loss, 2 forwards at own widths (paper)"] = lambda m, o, b: separate_forward_step(
                m, o, b, Collator(pad_id), {"divergence": "tv", "normalize": "paper"}, clip)
        paths["flat_ray (dynamic padding, 1 forward, repo)"] = lambda m, o, b: flat_ray_step(
            m, o, b, Collator(pad_id), {"divergence": "tv", "normalize": "repo"}, clip)
        paths["flat_ray (dynamic padding, 1 forward, paper = default)"] = lambda m, o, b: flat_ray_step(
            m, o, b, Collator(pad_id), {"divergence": "tv", "normalize": "paper"}, clip)
        state = {name: fresh() for name in paths}
        times: dict[str, list[float]] = {name: [] for name in paths}
        rates: dict[str, list[float]] = {name: [] for name in paths}
        names = list(paths)
        for r in range(args.warmup + args.steps):
            batch = batches[r % len(batches)]
            real = sum(sum(item[k]["attention_mask"]) for item in batch for k in ("forget", "template"))
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                paths[name](*state[name], batch)
                dt = time.perf_counter() - t0
                if r >= args.warmup:
                    times[name].append(dt)
                    rates[name].append(real / dt)

    n_params = sum(p.numel() for p in state[names[0]][0].parameters())
    lengths = [len(item["forget"]["input_ids"]) for item in items]
    t_lengths = [len(item["template"]["input_ids"]) for item in items]
    print(f"model: Llama-style {n_params / 1e6:.2f} M params (hidden {spec.hidden_size}, {spec.num_layers} layers, "
          f"vocab {len(tok)}), fp32, CPU threads {torch.get_num_threads()}")
    print(f"data: {source}, {len(items)} rows, profile {profile.name}; forget sequences {min(lengths)}-{max(lengths)} "
          f"tokens (mean {statistics.mean(lengths):.0f}), template sequences mean {statistics.mean(t_lengths):.0f}; "
          f"batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps per path")
    print(f"check at padding 500: repo loss reference {check['loss_ref']:.9g}, flat_ray {check['loss_flat_ray']:.9g} "
          f"(rtol 1e-5); gradients worst relative error {check['grad_rel_err']:.1e} (limit 1e-4); flat_ray repo loss at "
          f"dynamic padding {check['loss_repo_dynamic']:.9g} (the repo normalisation depends on padding)")
    real_tokens = [sum(sum(i[k]["attention_mask"]) for i in b for k in ("forget", "template")) for b in batches]
    widths = [(max(len(i["forget"]["input_ids"]) for i in b), max(len(i["template"]["input_ids"]) for i in b), len(b))
              for b in batches]
    concat = [n * 2 * max(f, e) for f, e, n in widths]
    own = [n * (f + e) for f, e, n in widths]
    print(f"positions per batch (mean over the {len(batches)} batches): real tokens {statistics.mean(real_tokens):.0f}; "
          f"reference {2 * args.batch_size * REFERENCE_LENGTH}; flat_ray's concatenated forward "
          f"{statistics.mean(concat):.0f} ({sum(real_tokens) / sum(concat):.0%} real); each split at its own width "
          f"{statistics.mean(own):.0f} ({sum(real_tokens) / sum(own):.0%} real)")
    ref = names[0]
    ref_median = statistics.median(times[ref])
    print(f"{'path':58s} {'median step':>12s} {'tokens/s':>9s} {'vs reference':>13s} {'per-round':>10s}")
    for name in names:
        med = statistics.median(times[name])
        per_round = statistics.median(r / t for r, t in zip(times[ref], times[name], strict=True))
        print(f"{name:58s} {med:10.3f} s {statistics.median(rates[name]):9.0f} {ref_median / med:12.1f}x "
              f"{per_round:9.1f}x")
    default = statistics.median(times[names[-1]])
    print(f"target flat_ray (default step) >= 3x faster than the reference-style step: "
          f"{'met' if ref_median / default >= 3 else 'NOT met'} ({ref_median / default:.1f}x)")


if __name__ == "__main__":
    main()
