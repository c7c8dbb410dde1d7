"""Recipe section ``prepare``: the corpus pipeline (``llm-ray data prepare``).

Sequence length and tokenizer come from the ``data`` section, so the shards a recipe prepares
are the shards the same recipe trains on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llm_ray.config.loader import check as _check



@dataclass
class CleanConfig:
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFKC"
    min_chars: int = 32  # after clean-up
    max_chars: int = 1_000_000
    max_repeated_line_ratio: float = 0.3  # share of non-empty lines that repeat an earlier line
    max_symbol_ratio: float = 0.25  # share of characters neither alphanumeric nor whitespace

    def __post_init__(self):
        _check(self.min_chars >= 0, "min_chars", "must be >= 0")
        _check(self.max_chars > self.min_chars, "max_chars", f"must be > min_chars ({self.min_chars})")
        _check(0 <= self.max_repeated_line_ratio <= 1, "max_repeated_line_ratio", "must be in [0, 1]")
        _check(0 <= self.max_symbol_ratio <= 1, "max_symbol_ratio", "must be in [0, 1]")


@dataclass
class DedupConfig:
    exact: bool = True  # content hash of the cleaned text, across the whole corpus
    near: bool = True  # MinHash + LSH over word shingles, across the whole corpus
    threshold: float = 0.8  # Jaccard similarity at or above which two documents are duplicates
    num_perm: int = 128
    shingle_size: int = 5  # words per shingle
    seed: int = 1

    def __post_init__(self):
        _check(0 < self.threshold <= 1, "threshold", "must be in (0, 1]")
        _check(self.num_perm >= 16, "num_perm", "must be >= 16")
        _check(self.shingle_size >= 1, "shingle_size", "must be >= 1")


@dataclass
class PIIConfig:
    """Replace e-mail addresses, phone numbers, IP addresses and Luhn-valid card numbers with
    typed placeholders such as ``<EMAIL>``."""

    enabled: bool = True
    emails: bool = True
    phones: bool = True
    ip_addresses: bool = True
    credit_cards: bool = True


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list)  # s3://bucket/prefix or local files/folders
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"  # auto: by file extension
    text_field: str = "text"  # JSONL / Parquet column holding the document text
    output: str = ""  # s3://bucket/prefix or a local folder: shards/, rejects/, manifest.json
    sequences_per_shard: int = 4096
    keep_doc_boundaries: bool = False  # also store per-token document ids (attention masking)
    # AES-256-GCM on every shard (and rejects/, which quotes raw input), the key from
    # LLM_RAY_ENCRYPTION_KEY(_FILE): never here; the manifest stays readable and names the key's fingerprint
    encrypt: bool = False
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)

    def __post_init__(self):
        _check(self.sequences_per_shard >= 1, "sequences_per_shard", "must be >= 1")
        _check(bool(self.text_field), "text_field", "must not be empty")

    def require_io(self) -> None:
        """A prepare run needs inputs and an output (a pretraining recipe does not)."""
        _check(bool(self.inputs), "prepare.inputs", "needs at least one s3:// prefix or local path")
        _check(bool(self.output), "prepare.output", "needs an s3:// prefix or a local folder")
