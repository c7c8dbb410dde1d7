"""Packed Parquet shards and the manifest that makes a prepared dataset whole.

Layout under the output prefix::

    manifest.json                      written last: a dataset without it does not exist
    tokenizer.json                     the tokenizer the shards were packed with
    shards/shard-00003-of-00008.parquet
    rejects/<reason>.jsonl             bad input with its source location

Documents are assigned to shards by a stable hash of their ``doc_id`` and sorted inside a
shard, so the same input and recipe give byte-identical shards however Ray splits the work.
Each shard is one PUT on object storage (atomic) or a temp file renamed into place locally: a
shard is either complete or absent.

Sealed datasets (``prepare.encrypt``): each shard's bytes are AES-256-GCM encrypted before they
leave the task that packed them, its name as associated data (``llm_ray.encryption``); the
manifest stays readable and records ``encrypted`` and the key's fingerprint. Readers decide
from the manifest, never from the file: a plaintext shard slipped into a sealed dataset is
refused, and each shard is decrypted in memory and authenticated whole before Parquet sees it.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llm_ray.encryption import EncryptionError, check_fingerprint, decrypt_bytes, encrypt_bytes, load_key
from llm_ray.storage import Storage

MANIFEST = "manifest.json"
SHARDS = "shards"
FORMAT_VERSION = 1


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.parquet"


def shard_of(doc_id: str, count: int) -> int:
    """Stable shard assignment (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little") % count


@dataclass(frozen=True)
class PackSpec:
    block_len: int  # tokens per stored sequence (seq_len + 1 for causal LM)
    sep_id: int  # appended after every document
    keep_doc_boundaries: bool = False


def pack_documents(token_lists: list[list[int]], spec: PackSpec) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Concatenate documents (each followed by ``sep_id``) and cut into full blocks.

    Returns (blocks (N, block_len) int32, per-token document index (N, block_len) or None,
    tokens dropped from the tail that did not fill a block).
    """
    lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
    total = int(lengths.sum())
    flat = np.empty(total, dtype=np.int32)
    doc = np.repeat(np.arange(len(token_lists), dtype=np.int32), lengths) if spec.keep_doc_boundaries else None
    pos = 0
    for tokens in token_lists:
        flat[pos : pos + len(tokens)] = tokens
        flat[pos + len(tokens)] = spec.sep_id
        pos += len(tokens) + 1
    n = total // spec.block_len
    blocks = flat[: n * spec.block_len].reshape(n, spec.block_len)
    docs = doc[: n * spec.block_len].reshape(n, spec.block_len) if doc is not None else None
    return blocks, docs, total - n * spec.block_len


def pack_token_lists(tokens: pa.Array, spec: PackSpec) -> tuple[np.ndarray, np.ndarray | None, int]:
    """``pack_documents`` for an Arrow list<int> column, vectorised (no per-document Python)."""
    tokens = tokens.combine_chunks() if isinstance(tokens, pa.ChunkedArray) else tokens
    values = tokens.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    lengths = np.diff(tokens.offsets.to_numpy()) + 1  # each document plus its separator
    ends = np.cumsum(lengths)  # one past each separator
    total = int(ends[-1]) if len(ends) else 0
    flat = np.full(total, spec.sep_id, dtype=np.int32)
    is_token = np.ones(total, bool)
    is_token[ends - 1] = False
    flat[is_token] = values
    doc = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths) if spec.keep_doc_boundaries else None
    n = total // spec.block_len
    blocks = flat[: n * spec.block_len].reshape(n, spec.block_len)
    docs = doc[: n * spec.block_len].reshape(n, spec.block_len) if doc is not None else None
    return blocks, docs, total - n * spec.block_len


def shard_table(blocks: np.ndarray, docs: np.ndarray | None) -> pa.Table:
    """One row per sequence: ``input_ids`` (fixed-size list of int32), optional ``doc_index``."""
    width = blocks.shape[1]
    columns = {"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1), pa.int32()), width)}
    if docs is not None:
        columns["doc_index"] = pa.FixedSizeListArray.from_arrays(pa.array(docs.reshape(-1), pa.int32()), width)
    return pa.table(columns)


def write_shard(out: Storage, name: str, table: pa.Table, key: bytes | None = None) -> int:
    """Write a shard whole (see module docstring), sealed under ``key`` when given; returns its
    size in bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue() if key is None else encrypt_bytes(buf.getvalue(), name, key)
    out.child(SHARDS).write_bytes(name, data)
    return len(data)


def shard_key(manifest: dict, uri: str) -> bytes | None:
    """The key a dataset's shards need: None for a plaintext dataset, else this process's key
    (``dataset_key``)."""
    return dataset_key(manifest.get("key_fingerprint") if manifest.get("encrypted") else None, uri)


def dataset_key(fingerprint: str | None, uri: str) -> bytes | None:
    """The environment's key once its fingerprint is ``fingerprint`` (None: no key needed);
    EncryptionError, one line, when there is no key or another one."""
    if fingerprint is None:
        return None
    try:
        key = load_key()
    except EncryptionError as e:
        raise EncryptionError(f"{uri} holds encrypted shards: {e}") from None
    return check_fingerprint(key, fingerprint, uri)


def read_shard(out: Storage, name: str, key: bytes | None = None) -> np.ndarray:
    """(N, block_len) int32 sequences of one shard."""
    return read_shard_columns(out, name, ["input_ids"], key)["input_ids"]


def read_shard_columns(out: Storage, name: str, columns: list[str], key: bytes | None = None) -> dict[str, np.ndarray]:
    """(N, block_len) int32 arrays of one shard: ``input_ids`` and/or ``doc_index``; ``key``
    (``shard_key``): the shard is sealed, decrypted in memory and authenticated first."""
    path = posixpath.join(out.root, SHARDS, name)
    if key is None:  # plaintext: Parquet reads only the columns asked for
        with out.fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=columns)
    else:
        table = pq.read_table(pa.BufferReader(_decrypted_shard(out, name, key)), columns=columns)
    arrays = {}
    for c in columns:
        column = table.column(c).combine_chunks()
        arrays[c] = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
    return arrays


def _decrypted_shard(out: Storage, name: str, key: bytes) -> bytes:
    with out.fs.open_input_stream(posixpath.join(out.root, SHARDS, name)) as f:
        blob = f.read()
    try:
        return decrypt_bytes(blob, name, key)
    except EncryptionError as e:  # "<name>: refused ..." / "<name>: not an encrypted file", with the folder
        raise EncryptionError(f"{out.child(SHARDS).uri}/{e}") from None


def read_manifest(out: Storage) -> dict | None:
    if not out.exists(MANIFEST):
        return None
    return json.loads(out.read_text(MANIFEST))


def write_manifest(out: Storage, manifest: dict) -> None:
    out.write_text(MANIFEST, json.dumps({"format_version": FORMAT_VERSION, **manifest}, indent=2, sort_keys=True))
