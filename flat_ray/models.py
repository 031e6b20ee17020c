"""Models and tokenizers: loading from a hub id or a local path, prompt profiles, and the tiny-model builder.

The tiny builder makes a random-init Llama-architecture causal LM and a byte-level BPE tokenizer trained
locally with ``tokenizers``; tests and the embedded demo use it so that nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flat_ray.errors import FlatRayError
from flat_ray.registry import Registry

log = logging.getLogger(__name__)

TINY = "tiny"
"""Sentinel model name: build (or reuse from the cache) a tiny random-init model for the demo."""
DEMO_ORIGINAL = "demo"
"""Sentinel model name: the tiny model fine-tuned on all demo authors and the background split (built and cached
by the launcher)."""


# --------------------------------------------------------------------------------------------- prompt profiles
@dataclass(frozen=True)
class PromptProfile:
    """How a question is wrapped before the answer, as in TOFU: ``start + question + end + answer_tag``.

    ``tag_in_answer``: the answer tag counts as the first words of the answer, as TOFU and FLAT's code encode
    their models (they mask ``start + question + end`` only): its tokens carry labels, and generation starts
    before it (the model writes the tag). Otherwise the whole prompt is masked and generation starts after the
    tag, as open-unlearning does.

    With ``chat_template=True`` the tokenizer's own chat template formats the question as a user turn and adds
    the generation prompt; the tags are then unused.
    """

    name: str
    question_start: str = ""
    question_end: str = ""
    answer_tag: str = ""
    chat_template: bool = False
    tag_in_answer: bool = False

    def prompt(self, question: str, tokenizer: Any = None) -> str:
        if self.chat_template:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise FlatRayError(
                    "model.profile=chat_template needs a tokenizer with a chat template; "
                    f"choose another profile: {PROFILES.choices()}"
                )
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        return f"{self.question_start}{question}{self.question_end}{self.answer_tag}"

    def context(self, question: str, tokenizer: Any = None) -> str:
        """The start of :meth:`prompt` that carries no labels and that generation continues: the prompt without
        the answer tag where the tag counts as the answer's (``tag_in_answer``), else the whole prompt."""
        prompt = self.prompt(question, tokenizer)
        return prompt[:len(prompt) - len(self.answer_tag)] if self.tag_in_answer else prompt


PROFILES: Registry[PromptProfile] = Registry("model profile")
# Tags as in TOFU's config/model_config.yaml.
PROFILES.register("llama2_chat", PromptProfile("llama2_chat", "[INST] ", " [/INST]", ""), aliases=("llama2-7b", "llama-2-chat"))
# TOFU's (and FLAT's) Phi models learned "Answer: " as part of every answer; TOFU's published Phi logs score it so
PROFILES.register("phi", PromptProfile("phi", "Question: ", "\n", "Answer: ", tag_in_answer=True),
                  aliases=("phi-1.5", "phi15"))
PROFILES.register("generic", PromptProfile("generic", "Q: ", "\n", "A: "))
PROFILES.register("chat_template", PromptProfile("chat_template", chat_template=True))
# raw text (MUSE-News, book text): the prompt is the text itself; text benchmarks always use it
PROFILES.register("raw", PromptProfile("raw"))

AUTO_PROFILE = "auto"


def resolve_profile(profile: str, model_name: str, tokenizer: Any = None) -> PromptProfile:
    """Pick a profile; ``auto`` chooses TOFU's tags for a Llama-2-chat model (TOFU's own fine-tune,
    ``locuslab/tofu_ft_llama2-7b``, is one), then the tokenizer's chat template
    (Phi-3's, a Llama-3-instruct's), then TOFU's Phi tags for a model named phi-something without one (Phi-1.5:
    "phi" at the start of a name part, so "dolphin" is not one), then ``generic``."""
    if profile != AUTO_PROFILE:
        return PROFILES[profile]
    lowered = model_name.lower()
    if re.search(r"llama[-_]?2", lowered) and re.search(r"chat|tofu", lowered):
        return PROFILES["llama2_chat"]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return PROFILES["chat_template"]
    if re.search(r"(?<![a-z0-9])phi", lowered):
        return PROFILES["phi"]
    return PROFILES["generic"]


# ---------------------------------------------------------------------------------------------------- loading
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    dtype: Any = None,
    revision: str | None = None,
    load_model: bool = True,
    tokenizer: str | None = None,
):
    """Load a causal LM and its tokenizer from a local directory or a hub id; the tokenizer from ``tokenizer``
    (another hub id or directory, ``model.tokenizer``) where given.

    ``trust_remote_code`` stays off unless the config sets it. A tokenizer without a pad token gets its EOS
    token as pad (right padding for training; generation switches to left padding itself).
    Returns ``(model_or_None, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name_or_path).expanduser()
    looks_local = _looks_local(name_or_path)
    if looks_local and not local.is_dir():
        raise FlatRayError(f"model path {name_or_path!r} does not exist; give a directory saved with save_pretrained or a hub id")
    source = str(local) if looks_local else name_or_path
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    tokenizer = load_tokenizer(tokenizer, trust_remote_code) if tokenizer else None
    try:
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(source, **kwargs)
        model = None
        if load_model:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error("model", name_or_path, looks_local, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "right"
    if model is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _looks_local(name_or_path: str) -> bool:
    """A directory (existing, or written as a path) rather than a hub id."""
    local = Path(name_or_path).expanduser()
    return local.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1


def _is_hub_id(name_or_path: str) -> bool:
    return name_or_path not in (TINY, DEMO_ORIGINAL) and not _looks_local(name_or_path)


def fetch_weights(cfg: Any) -> list[str]:
    """Bring a hub model (and a separate ``model.tokenizer``) into the Hugging Face cache once, on the driver, before
    any worker needs it. On a cluster the cache is on the shared mount (cluster.yaml sets ``HF_HOME`` there on
    every node and the driver passes it on), so every node reads what the head fetched instead of each downloading
    the same weights. With HF_HUB_OFFLINE=1 it only checks that they are cached. Local directories and the built-in
    models are left alone. Returns the snapshot folders."""
    from huggingface_hub import snapshot_download

    folders = []
    for repo, revision in ((cfg.model.name_or_path, cfg.model.revision), (cfg.model.tokenizer, None)):
        if not repo or not _is_hub_id(repo):
            continue
        try:
            folders.append(snapshot_download(repo, revision=revision, local_files_only=_offline(),
                                             allow_patterns=None if _offline() else _hub_patterns(repo, revision)))
        except Exception as exc:  # noqa: BLE001 - not cached offline, a gated or missing repo, no network
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            hint = ("HF_HUB_OFFLINE=1 and it is not in the cache (HF_HOME); download it on a connected machine"
                    if _offline() else first)
            raise FlatRayError(f"cannot fetch {repo!r} into the Hugging Face cache: {hint}") from None
    return folders


def _hub_patterns(repo: str, revision: str | None) -> list[str]:
    """The files a model needs: configs, tokenizer files, code, and one weight format (safetensors where the repo
    has them, else PyTorch's .bin)."""
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(repo, revision=revision)
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
    return ["*.json", "*.model", "*.txt", "*.py", "*.tiktoken", weights]


def load_tokenizer(name_or_path: str, trust_remote_code: bool):
    """``model.tokenizer``: a hub id or a local directory of its own."""
    from transformers import AutoTokenizer

    local = Path(name_or_path).expanduser()
    looks_local = _looks_local(name_or_path)
    if looks_local and not local.is_dir():
        raise FlatRayError(f"model.tokenizer {name_or_path!r} does not exist; give a directory holding tokenizer "
                           "files, a hub id, or null for the model's own")
    try:
        return AutoTokenizer.from_pretrained(str(local) if looks_local else name_or_path,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error("tokenizer (model.tokenizer)", name_or_path, looks_local, exc) from exc


def _load_error(what: str, name_or_path: str, looks_local: bool, exc: BaseException) -> FlatRayError:
    if not looks_local and _offline():
        return FlatRayError(f"cannot load {what} {name_or_path!r}: HF_HUB_OFFLINE=1 and it is not in the local "
                            "cache; download it on a connected machine or give a local directory")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return FlatRayError(f"cannot load {what} {name_or_path!r}: {first}")


# ------------------------------------------------------------------------------------------------ tiny models
@dataclass(frozen=True)
class TinySpec:
    """Size of a tiny Llama-style model; the defaults give about 0.2 M parameters."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 512
    seed: int = 0


SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def build_tiny_model(texts: Sequence[str], out_dir: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """Build a random-init Llama-architecture causal LM plus a tokenizer trained on ``texts``; save both with
    ``save_pretrained`` (safetensors) into ``out_dir`` and return it. Reloadable offline with the Auto classes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def cached_tiny_model(texts: Sequence[str], cache_root: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """:func:`build_tiny_model` cached under ``cache_root`` by a hash of its inputs; rebuilt when they change.

    The build goes to a temporary directory that is renamed into place, so a crash never leaves a half-written
    model that a later run would reuse.
    """
    digest = hashlib.sha256(json.dumps([list(texts), asdict(spec)]).encode()).hexdigest()[:16]
    root = Path(cache_root)
    target = root / f"tiny-{digest}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        build_tiny_model(texts, tmp, spec)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built tiny model at %s", target)
    return target


def train_only(model: Any, pattern: str) -> int:
    """Freeze every parameter whose full name does not match ``pattern`` (``model.trainable``); returns how many
    parameter tensors still train. A pattern that matches none is refused, naming a few of the model's names."""
    names, kept = [], 0
    for name, param in model.named_parameters():
        param.requires_grad_(bool(re.fullmatch(pattern, name)))
        names.append(name)
        kept += param.requires_grad
    if not kept:
        middle = names[len(names) // 2] if names else "-"
        raise FlatRayError(f"model.trainable={pattern!r} matches no parameter of the model (its names look like "
                           f"{names[0] if names else '-'}, {middle}); the whole name must match")
    return kept


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
