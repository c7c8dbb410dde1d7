"""Tokenizers built on Hugging Face ``tokenizers``: train, save, load, identify, encode.

Two kinds, chosen by ``data.tokenizer.kind``:

- ``bpe``: GPT-2 style byte-level BPE. Every byte is in the base alphabet, so any text
  round-trips exactly; ``<|endoftext|>`` ends (and starts) documents, ``<|pad|>`` pads.
- ``wordpiece``: BERT style, lower-cased, ``[CLS] text [SEP]`` around every encoded text, and a
  ``[MASK]`` token for masked-LM training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from llm_ray.config import RecipeError, TokenizerConfig
from llm_ray.data.text_files import iter_documents, list_text_files

log = logging.getLogger(__name__)

BPE_SPECIALS = ["<|endoftext|>", "<|pad|>"]
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# A byte-level BPE cannot be smaller than its alphabet: 256 bytes plus the special tokens.
BPE_MIN_VOCAB = 256 + len(BPE_SPECIALS)

# Which special token fills each role, first match wins; lets tokenizers from elsewhere
# (``</s>``, ``<pad>``, ``<unk>``) work too. A WordPiece tokenizer ends documents with [SEP].
_ROLES = {
    "eos_id": ("<|endoftext|>", "</s>", "[SEP]"),
    "pad_id": ("<|pad|>", "<pad>", "[PAD]"),
    "mask_id": ("[MASK]", "<mask>"),
    "cls_id": ("[CLS]",),
    "sep_id": ("[SEP]",),
    "unk_id": ("[UNK]", "<unk>"),
}
_MODEL_TYPES = {"bpe": "BPE", "wordpiece": "WordPiece"}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens a tokenizer has; None where it has no such token."""

    eos_id: int | None
    pad_id: int | None
    mask_id: int | None
    cls_id: int | None
    sep_id: int | None
    unk_id: int | None


def _bpe(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    if vocab_size < BPE_MIN_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} is too small for byte-level BPE: needs >= {BPE_MIN_VOCAB}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False as in GPT-2: offsets keep the leading space the token carries.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=BPE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # bytes unseen in training still encode
        show_progress=False,
    )
    return tok, trainer


def _wordpiece(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=WORDPIECE_SPECIALS,
        show_progress=False,
    )
    return tok, trainer


def train_tokenizer(
    files: list[str],
    kind: Literal["bpe", "wordpiece"],
    vocab_size: int,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a tokenizer on the documents of ``files`` (split on blank lines, see text_files)."""
    if not files:
        raise ValueError("train_tokenizer needs at least one file")
    # Train on the same documents that get encoded later (same splitting, same decoding of
    # bad bytes) rather than on raw lines.
    tok = train_tokenizer_from_texts(iter_documents(files), kind, vocab_size, min_frequency)
    log.info("trained %s tokenizer: %d tokens from %d file(s)", kind, tok.get_vocab_size(), len(files))
    return tok


def train_tokenizer_from_texts(
    texts: Iterable[str],
    kind: Literal["bpe", "wordpiece"],
    vocab_size: int,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train on an iterable of documents (e.g. the cleaned output of the corpus pipeline)."""
    builders = {"bpe": _bpe, "wordpiece": _wordpiece}
    if kind not in builders:
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected one of {sorted(builders)}")
    tok, trainer = builders[kind](vocab_size, min_frequency)
    tok.train_from_iterator(texts, trainer=trainer)
    if kind == "wordpiece":
        # The template needs the ids, which exist only after training.
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    return tok


def save_tokenizer(tok: Tokenizer, path: str) -> None:
    """Write ``tok`` to ``path`` atomically: readers see the old file or the whole new one."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the destination so os.replace is a rename, never a cross-device copy.
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tok.to_str(pretty=True))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a tokenizer is meant to be shared
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_tokenizer(path: str) -> Tokenizer:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Tokenizer.from_file(path)


def special_ids(tok: Tokenizer) -> SpecialTokens:
    """Ids of the roles in ``SpecialTokens``, looked up among the tokenizer's special tokens."""
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    found = {role: next((specials[n] for n in names if n in specials), None) for role, names in _ROLES.items()}
    return SpecialTokens(**found)


def tokenizer_hash(tok: Tokenizer) -> str:
    """First 16 hex digits of the sha256 of the tokenizer's canonical JSON (vocab, merges, rules)."""
    # Re-dumped with sorted keys so formatting and key order never change the hash.
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def ensure_tokenizer(cfg: TokenizerConfig, corpus_paths: list[str]) -> Tokenizer:
    """The run's tokenizer: load ``cfg.path``, or train it on ``corpus_paths`` (``data.paths``).

    ``cfg.path == ""`` trains in memory and saves nothing. Call this once (on the driver) and
    hand the tokenizer to workers: byte-level BPE training is reproducible, but WordPiece
    training is not across processes (token ids follow hash-map order, tokenizers#1794).
    """
    if cfg.path and os.path.exists(cfg.path):
        tok = load_tokenizer(cfg.path)
        model_type = json.loads(tok.to_str())["model"]["type"]
        if model_type in _MODEL_TYPES.values() and model_type != _MODEL_TYPES[cfg.kind]:
            raise RecipeError("data.tokenizer.kind", f"{cfg.kind!r}, but {cfg.path} holds a {model_type} tokenizer")
        return tok
    if not cfg.train_if_missing:
        what = f"{cfg.path} does not exist" if cfg.path else "is empty"
        raise RecipeError("data.tokenizer.path", f"{what} and data.tokenizer.train_if_missing is false")
    if cfg.kind == "bpe" and cfg.vocab_size < BPE_MIN_VOCAB:
        need = f"{cfg.vocab_size} is below the {BPE_MIN_VOCAB} a byte-level BPE needs (256 bytes + specials)"
        raise RecipeError("data.tokenizer.vocab_size", need)
    tok = train_tokenizer(list_text_files(corpus_paths), cfg.kind, cfg.vocab_size, cfg.min_frequency)
    if cfg.path:
        save_tokenizer(tok, cfg.path)
        log.info("saved tokenizer to %s", cfg.path)
    return tok


def encode_documents(tok: Tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text; ``encode_batch`` runs in parallel in Rust."""
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=add_special_tokens)]
