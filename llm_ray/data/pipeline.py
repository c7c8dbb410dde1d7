"""``llm-ray data prepare``: raw corpora -> clean, deduplicated, PII-scrubbed, packed shards.

Stages, each a Ray Data operation over the whole corpus:

    list inputs (fail fast) -> read + parse (bad input -> rejects) -> normalise + quality filters
    -> exact dedup -> near dedup (MinHash LSH) -> PII scrub -> tokenize -> pack per shard + write
    -> rejects/, tokenizer.json, summary.json, manifest.json (last)

Files are listed through ``Storage`` and read as raw bytes inside a Ray Data map rather than
with ``ray.data.read_binary_files``: the latter decompresses ``*.gz`` itself and fails the
whole read on a truncated file, which must instead be quarantined and the rest kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import time
from typing import Optional

import numpy as np

from llm_ray.config import Recipe
from llm_ray.data.shards import PackSpec, pack_documents, read_manifest, shard_name, shard_of, shard_table, write_manifest, write_shard
from llm_ray.storage import Storage, StorageError, list_files, resolve_storage

CHARS_PER_TOKEN = 4.0  # rough estimate used only to choose the number of shards
PII_COLUMNS = ("pii_email", "pii_phone", "pii_ip_address", "pii_credit_card")
ROW = {"kind": "", "doc_id": "", "source": "", "line": -1, "text": "", "reason": "", "detail": "", "raw": ""}


def _fingerprint(recipe: Recipe, files: list[dict], tokenizer_hash: Optional[str]) -> str:
    """What the output depends on: inputs (with sizes and mtimes/etags), the recipe sections that
    shape shards, and the tokenizer. The same fingerprint means the same shards."""
    shape = {
        "files": files,
        "prepare": {k: v for k, v in recipe.to_dict()["prepare"].items() if k not in ("inputs", "output")},
        "seq_len": recipe.data.seq_len,
        "objective": recipe.train.objective,
        "tokenizer": tokenizer_hash or recipe.to_dict()["data"]["tokenizer"],
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


class _ParseFiles:
    """path -> records and rejects in one row shape (Ray Data needs one schema per block)."""

    def __init__(self, fmt: str, text_field: str, endpoint: Optional[str]):
        self.fmt, self.text_field, self.endpoint = fmt, text_field, endpoint

    def __call__(self, row: dict) -> list[dict]:
        from llm_ray.data.records import parse_file

        uri = row["uri"]
        store = resolve_storage(posixpath.dirname(uri), self.endpoint)
        try:
            with store.fs.open_input_file(posixpath.join(store.root, posixpath.basename(uri))) as f:
                data = f.readall()
        except OSError as e:  # vanished or unreadable after listing: quarantine, keep going
            return [dict(ROW, kind="reject", source=uri, reason="unreadable_file", detail=str(e)[:300])]
        records, rejects = parse_file(uri, data, self.fmt, self.text_field)
        out = [dict(ROW, kind="record", **r) for r in records]
        for r in rejects:
            row = dict(ROW, kind="reject", **{k: "" if v is None else v for k, v in r.items()})
            row["line"] = -1 if r["line"] is None else r["line"]  # one Arrow type for the column
            out.append(row)
        return out


class _Tokenize:
    def __init__(self, tokenizer_json: str, shards: int):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.shards = shards

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"]]
        encoded = self.tok.encode_batch(texts, add_special_tokens=False)
        batch["tokens"] = [e.ids for e in encoded]  # variable length: Arrow list<int>
        batch["shard"] = np.array([shard_of(str(d), self.shards) for d in batch["doc_id"]], dtype=np.int64)
        return batch


class _PackAndWrite:
    """One group = one shard: sort by doc_id, pack, write (unless already there from a rerun)."""

    def __init__(self, out_uri: str, endpoint: Optional[str], spec: PackSpec, shards: int, prefix: str):
        self.out = resolve_storage(out_uri, endpoint)
        self.spec, self.shards, self.prefix = spec, shards, prefix

    def __call__(self, batch: dict) -> dict:
        order = np.argsort(batch["doc_id"].astype(str), kind="stable")
        tokens = [list(batch["tokens"][i]) for i in order]
        blocks, docs, tail = pack_documents(tokens, self.spec)
        index = int(batch["shard"][0])
        name = f"{self.prefix}-{shard_name(index, self.shards)}"
        written = 0
        if len(blocks) and not self.out.exists("shards", name):
            written = write_shard(self.out, name, shard_table(blocks, docs))
        return {
            "name": np.array([name]),
            "num_sequences": np.array([len(blocks)]),
            "num_tokens": np.array([blocks.size]),
            "documents": np.array([len(tokens)]),
            "tail_tokens_dropped": np.array([tail]),
            "bytes_written": np.array([written]),
        }


def _tally(ds, fn) -> dict[str, int]:
    """Sum per-batch counts ``fn(batch) -> dict[str, int]`` over a dataset.

    A map pass whose one-row-per-block results are added up on the driver: counting needs no
    shuffle (each Ray Data groupby/aggregate costs a hash shuffle with actors, seconds apiece).
    """
    def per_batch(batch):
        counts = fn(batch)
        return {"key": np.array(list(counts), dtype=object), "n": np.array(list(counts.values()), dtype=np.int64)}

    totals: dict[str, int] = {}
    for row in ds.map_batches(per_batch, batch_format="numpy").take_all():
        totals[row["key"]] = totals.get(row["key"], 0) + int(row["n"])
    return totals


def _reasons(batch) -> dict[str, int]:
    keys, counts = np.unique(batch["drop_reason"].astype(str), return_counts=True)
    return {k: int(c) for k, c in zip(keys, counts) if k}


def _pii_and_chars(batch) -> dict[str, int]:
    counts = {c[len("pii_"):]: int(batch[c].sum()) for c in PII_COLUMNS if c in batch}
    counts["chars"] = sum(len(str(t)) for t in batch["text"])
    return counts


def _write_rejects(out: Storage, rejects: list[dict]) -> dict[str, int]:
    """rejects/<reason>.jsonl, sorted by source location. Bad input is expected to be a small
    share of a corpus, so it is gathered on the driver and each file written whole."""
    by_reason: dict[str, list[dict]] = {}
    for r in sorted(rejects, key=lambda r: (r["source"], r["line"], r["reason"])):
        entry = {k: r[k] for k in ("source", "line", "reason", "detail", "raw")}
        entry["line"] = None if entry["line"] == -1 else entry["line"]
        by_reason.setdefault(r["reason"], []).append(entry)
    for reason, rows in by_reason.items():
        out.child("rejects").write_text(f"{reason}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return {reason: len(rows) for reason, rows in sorted(by_reason.items())}


def prepare(recipe: Recipe) -> dict:
    """Run the pipeline; returns the summary (also saved as summary.json in the output)."""
    import ray
    import ray.data

    from llm_ray.data.clean import clean_batch
    from llm_ray.data.dedup import exact_dedup, near_dedup
    from llm_ray.data.pii import scrub_batch
    from llm_ray.data.tokenizer import load_tokenizer, special_ids, tokenizer_hash, train_tokenizer_from_texts
    from llm_ray.train.launcher import ensure_ray

    cfg, endpoint = recipe.prepare, recipe.run.s3_endpoint
    cfg.require_io()
    started = time.time()
    out = resolve_storage(cfg.output, endpoint)
    files = [f for uri in cfg.inputs for f in list_files(uri, endpoint)]  # fails fast, naming bucket/key
    if not files:
        raise StorageError(f"prepare.inputs: no files under {', '.join(cfg.inputs)}")
    tok_path = recipe.data.tokenizer.path
    given = load_tokenizer(tok_path) if tok_path and os.path.exists(tok_path) else None
    fingerprint = _fingerprint(recipe, files, tokenizer_hash(given) if given else None)
    done = read_manifest(out)
    if done and done.get("fingerprint") == fingerprint:
        summary = json.loads(out.read_text("summary.json"))
        return {**summary, "skipped": True}

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Ray's default of 200 hash-shuffle partitions suits big clusters; on a few cores each costs
    # an actor and seconds. Scale it with the cluster instead.
    ctx.default_hash_shuffle_parallelism = max(2, min(200, 2 * int(ray.cluster_resources().get("CPU", 1))))
    paths = ray.data.from_items([{"uri": f["uri"]} for f in files], override_num_blocks=min(len(files), 64))
    parsed = paths.flat_map(_ParseFiles(cfg.format, cfg.text_field, endpoint)).materialize()
    rejects = parsed.filter(expr="kind == 'reject'").take_all()
    records = parsed.filter(expr="kind == 'record'").select_columns(["doc_id", "source", "line", "text"])
    n_read = records.count()

    cleaned = records.map_batches(clean_batch, fn_kwargs={"cfg": cfg.clean}, batch_format="numpy").materialize()
    filtered = _tally(cleaned, _reasons)
    kept = cleaned.filter(expr="drop_reason == ''").drop_columns(["drop_reason"])
    dedup_stats: dict = {}
    if cfg.dedup.exact:
        kept, stats = exact_dedup(kept)
        dedup_stats.update(stats)
    if cfg.dedup.near:
        kept, stats = near_dedup(kept, cfg.dedup)
        dedup_stats.update(stats)
    if cfg.pii.enabled:
        kept = kept.map_batches(scrub_batch, fn_kwargs={"cfg": cfg.pii}, batch_format="numpy")
    kept = kept.materialize()
    n_docs = kept.count()
    if n_docs == 0:
        raise ValueError("prepare: no document survived parsing, filters and dedup; see rejects/ and the filter counts")
    pii_counts = _tally(kept, _pii_and_chars)
    chars = pii_counts.pop("chars")
    if cfg.pii.enabled:
        kept = kept.drop_columns(list(PII_COLUMNS))

    tokenizer = given
    if tokenizer is None:  # trained on the cleaned corpus itself
        t = recipe.data.tokenizer
        texts = (row["text"] for row in kept.select_columns(["text"]).iter_rows())
        tokenizer = train_tokenizer_from_texts(texts, t.kind, t.vocab_size, t.min_frequency)
    special = special_ids(tokenizer)
    sep = special.eos_id if special.eos_id is not None else special.sep_id
    block_len = recipe.data.seq_len + (1 if recipe.train.objective == "causal_lm" else 0)
    n_shards = max(1, math.ceil(chars / CHARS_PER_TOKEN / block_len / cfg.sequences_per_shard))
    spec = PackSpec(block_len, sep, cfg.keep_doc_boundaries)
    shard_rows = (
        kept.map_batches(_Tokenize, fn_constructor_args=(tokenizer.to_str(), n_shards), concurrency=1, batch_format="numpy")
        .groupby("shard")
        .map_groups(_PackAndWrite, fn_constructor_args=(out.uri, endpoint, spec, n_shards, fingerprint), concurrency=1,
                    batch_format="numpy")
        .take_all()
    )
    shards = sorted((r for r in shard_rows if r["num_sequences"] > 0), key=lambda r: r["name"])

    reject_counts = _write_rejects(out, rejects)
    out.write_text("tokenizer.json", tokenizer.to_str())
    summary = {
        "output": out.uri,
        "fingerprint": fingerprint,
        "inputs": len(files),
        "records_read": n_read,
        "rejects": reject_counts,
        "filtered": filtered,
        "dedup": dedup_stats,
        "pii": pii_counts,
        "documents": n_docs,
        "sequences": int(sum(r["num_sequences"] for r in shards)),
        "tokens": int(sum(r["num_tokens"] for r in shards)),
        "tail_tokens_dropped": int(sum(r["tail_tokens_dropped"] for r in shards)),
        "shards": len(shards),
        "seconds": round(time.time() - started, 2),
    }
    out.write_text("summary.json", json.dumps(summary, indent=2))
    write_manifest(out, {
        "fingerprint": fingerprint,
        "recipe_hash": recipe.hash(),
        "sources": files,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "objective": recipe.train.objective,
        "seq_len": recipe.data.seq_len,
        "block_len": block_len,
        "sep_id": sep,
        "keep_doc_boundaries": cfg.keep_doc_boundaries,
        "counts": {k: summary[k] for k in ("records_read", "rejects", "filtered", "dedup", "pii", "documents",
                                           "sequences", "tokens")},
        "shards": [{"name": str(r["name"]), "num_sequences": int(r["num_sequences"]), "num_tokens": int(r["num_tokens"]),
                    "documents": int(r["documents"])} for r in shards],
    })
    return summary


def print_summary(summary: dict) -> None:
    """The readable table of what each stage kept, dropped and why."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"data prepare -> {summary['output']}" + ("  (up to date: nothing done)" if summary.get("skipped") else ""))
    table.add_column("stage")
    table.add_column("count", justify="right")
    table.add_row("input files", str(summary["inputs"]))
    table.add_row("records read", str(summary["records_read"]))
    for group in ("rejects", "filtered", "dedup", "pii"):
        for key, value in summary[group].items():
            table.add_row(f"{group}: {key}", str(value))
    for key in ("documents", "sequences", "tokens", "tail_tokens_dropped", "shards", "seconds"):
        table.add_row(key, str(summary[key]))
    Console(stderr=True).print(table)
