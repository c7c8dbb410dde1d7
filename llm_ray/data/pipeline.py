"""``llm-ray data prepare``: raw corpora -> clean, deduplicated, PII-scrubbed, packed shards.

    list inputs (fail fast, naming bucket and key)
    1. one Ray Data pass: read + parse (bad input -> rejects) -> normalise + quality filters
       -> dedup keys (content hash, MinHash, LSH band keys), materialized
    2. dedup over the whole corpus: the keys (not the text) go to the driver, which decides
       exact then near duplicates (``dedup.driver_dedup``); above ``DRIVER_DEDUP_MAX_INPUT_BYTES``
       the Ray Data shuffles of ``exact_dedup``/``near_dedup`` run instead
    3. one Ray Data pass: drop duplicates -> PII scrub -> tokenize (``encode_batch`` per block)
    4. group by shard with plain Ray tasks (or Ray Data's groupby for very many blocks x shards),
       pack, write each shard whole
    -> rejects/, tokenizer.json, summary.json, manifest.json (last)

``prepare.encrypt``: each shard is sealed (AES-256-GCM, ``shards.py``) by the task that packs it,
with the key of that worker's environment, checked against the driver's by fingerprint; the
driver seals rejects/ (it quotes raw input). ``run.s3_sse``: every object written asks S3 for
server-side encryption (``storage.py``).

Fixed costs dominate small jobs on Ray Data: every hash shuffle starts actors (seconds each on a
few cores), every materialization is a pipeline start. Hence two Ray Data passes and no shuffle
at all when the dedup keys fit on the driver. Both paths give byte-identical shards.

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
import pyarrow as pa
import pyarrow.compute as pc

from llm_ray.config import Recipe, RecipeError
from llm_ray.data.shards import (PackSpec, dataset_key, pack_token_lists, read_manifest, shard_name, shard_of, shard_table,
                                 write_manifest, write_shard)
from llm_ray.encryption import EncryptionError, encrypt_bytes, encryption_failure, key_file_env, key_fingerprint, load_key
from llm_ray.stage import StageResult
from llm_ray.storage import ServerSideEncryption, Storage, StorageError, list_files, resolve_storage, sse_of

CHARS_PER_TOKEN = 4.0  # rough estimate used only to choose the number of shards
PII_COLUMNS = ("pii_email", "pii_phone", "pii_ip_address", "pii_credit_card")
ROW = {"kind": "", "doc_id": "", "source": "", "line": -1, "text": "", "reason": "", "detail": "", "raw": ""}

# Dedup decided on the driver from per-document keys (``dedup.driver_dedup``) up to this much
# input, gzip counted 4x as text: ~160 bytes of keys per document, so ~1 GB of keys for 8 GiB
# of 1 KB documents. Above it the cluster-scale Ray Data shuffles (``exact_dedup``,
# ``near_dedup``) run instead. Both keep the same documents.
DRIVER_DEDUP_MAX_INPUT_BYTES = 8 << 30
# Shards are grouped with plain Ray tasks (every block split into one part per shard, then one
# task per shard): blocks x shards objects, milliseconds up to this many. Beyond it Ray Data's
# groupby shuffle, with its seconds of fixed cost, scales better.
TASK_SHUFFLE_MAX_PARTS = 20_000


def _fingerprint(recipe: Recipe, files: list[dict], tokenizer_hash: Optional[str], sealed_with: Optional[str] = None) -> str:
    """What the output depends on: inputs (with sizes and mtimes/etags), the recipe sections that
    shape shards, the tokenizer, and for sealed shards the key's fingerprint (another key: other
    shards). The same fingerprint means the same shards."""
    shape = {
        "files": files,
        "prepare": {k: v for k, v in recipe.to_dict()["prepare"].items() if k not in ("inputs", "output", "encrypt")},
        "seq_len": recipe.data.seq_len,
        "objective": recipe.train.objective,
        "tokenizer": tokenizer_hash or recipe.to_dict()["data"]["tokenizer"],
    }
    if sealed_with:  # only then: plaintext datasets prepared before prepare.encrypt existed stay up to date
        shape["sealed_with"] = sealed_with
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


class _CleanAndKey:
    """Normalise and quality-filter the records of a block, then compute the dedup keys of the
    survivors (content hash, MinHash, LSH band keys). Fused by Ray Data into the parse task:
    the text is read, cleaned and hashed in one pass, and only the keys go to the driver."""

    def __init__(self, clean_cfg, dedup_cfg, with_keys: bool):
        self.clean_cfg, self.dedup_cfg, self.with_keys = clean_cfg, dedup_cfg, with_keys

    def __call__(self, t: pa.Table) -> pa.Table:
        from llm_ray.data.clean import clean_batch
        from llm_ray.data.dedup import dedup_keys

        n = t.num_rows
        texts = t["text"].to_pylist()
        rec = np.flatnonzero(t["kind"].to_numpy(zero_copy_only=False) == "record")
        drop = np.full(n, "", dtype=object)
        if len(rec):
            cleaned = clean_batch({"text": [texts[i] for i in rec]}, self.clean_cfg)
            for j, i in enumerate(rec):
                texts[i] = cleaned["text"][j]
            drop[rec] = cleaned["drop_reason"]
        t = t.set_column(t.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
        t = t.append_column("drop_reason", pa.array(drop.tolist(), pa.string()))
        if self.with_keys:
            keep = rec[drop[rec] == ""]
            for name, col in dedup_keys([texts[i] for i in keep], self.dedup_cfg).items():
                t = t.append_column(name, _scatter_fixed(col, keep, n))
        return t


def _scatter_fixed(col: pa.Array, rows: np.ndarray, n: int) -> pa.Array:
    """A fixed-size binary column of ``n`` rows: ``col`` at ``rows``, zero bytes elsewhere."""
    width = col.type.byte_width
    buf = np.zeros((n, width), np.uint8)
    buf[rows] = np.frombuffer(col.buffers()[1], np.uint8)[col.offset * width : (col.offset + len(col)) * width].reshape(-1, width)
    return pa.FixedSizeBinaryArray.from_buffers(col.type, n, [None, pa.py_buffer(buf.tobytes())])


def _kept_mask(t: pa.Table):
    return pc.and_(pc.equal(t["kind"], "record"), pc.equal(t["drop_reason"], ""))


def _scan_block(t: pa.Table, key_columns: list[str]) -> tuple[dict, pa.Table]:
    """What the driver needs from a scanned block: its rejects (whole), record and filter
    counts, and the dedup keys of its kept records (returned as a second object so the driver
    fetches them only when it decides duplicates itself)."""
    rejects = t.filter(pc.equal(t["kind"], "reject")).select(["source", "line", "reason", "detail", "raw"]).to_pylist()
    records = t.filter(pc.equal(t["kind"], "record"))
    reasons = records["drop_reason"].to_numpy(zero_copy_only=False)
    keys, counts = np.unique(reasons[reasons != ""], return_counts=True)
    kept = t.filter(_kept_mask(t))
    chars = pc.utf8_length(kept["text"]).cast(pa.int64())
    info = {"rejects": rejects, "records": records.num_rows, "filtered": {str(k): int(c) for k, c in zip(keys, counts)},
            "kept": kept.num_rows, "chars": int(pc.sum(chars).as_py() or 0)}
    return info, kept.select(["doc_id", *key_columns]).append_column("chars", chars)


def _signatures_for(t: pa.Table, ids: pa.Array) -> pa.Table:
    from llm_ray.data.dedup import KEY_SIGNATURE

    return t.filter(pc.is_in(t["doc_id"], value_set=ids)).select(["doc_id", KEY_SIGNATURE])


def _select_and_scrub(t: pa.Table, removed, pii_cfg) -> pa.Table:
    """Kept records minus duplicates, PII replaced (with per-row counts), text and id only."""
    import ray

    from llm_ray.data.pii import scrub_batch

    if "kind" in t.column_names:  # a scanned block (the driver-dedup path)
        t = t.filter(_kept_mask(t))
    if removed is not None:
        ids = ray.get(removed) if isinstance(removed, ray.ObjectRef) else removed
        t = t.filter(pc.invert(pc.is_in(t["doc_id"], value_set=ids)))
    t = t.select(["doc_id", "text"])
    if pii_cfg.enabled:
        out = scrub_batch({"text": t["text"].to_pylist()}, pii_cfg)
        t = t.set_column(1, "text", pa.array(list(out["text"]), pa.string()))
        for c in PII_COLUMNS:
            t = t.append_column(c, pa.array(out[c], pa.int64()))
    return t


_TOKENIZERS: dict = {}  # per worker process: parse a tokenizer once, not once per block


def _tokenize(t: pa.Table, tokenizer_json, n_shards: int) -> pa.Table:
    """Token ids (list<int32>) and the shard of each document; text dropped."""
    import ray
    from tokenizers import Tokenizer

    key = tokenizer_json.hex() if isinstance(tokenizer_json, ray.ObjectRef) else hashlib.sha1(tokenizer_json.encode()).hexdigest()
    if key not in _TOKENIZERS:
        text = ray.get(tokenizer_json) if isinstance(tokenizer_json, ray.ObjectRef) else tokenizer_json
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = Tokenizer.from_str(text)
    encoded = _TOKENIZERS[key].encode_batch(t["text"].to_pylist(), add_special_tokens=False)
    tokens = pa.array([e.ids for e in encoded], pa.list_(pa.int32()))
    shard = pa.array([shard_of(d, n_shards) for d in t["doc_id"].to_pylist()], pa.int64())
    return t.drop_columns(["text"]).append_column("shard", shard).append_column("tokens", tokens)


def _split_by_shard(t: pa.Table, n_shards: int):
    """One part (doc_id, tokens) per shard, then this block's counts: the map side of the
    shard grouping."""
    if t.num_rows == 0:  # Ray Data passes an empty block through unmapped, whatever its columns
        return (*[pa.table({})] * n_shards, {"documents": 0})
    shard = t["shard"].to_numpy()
    order = np.argsort(shard, kind="stable")
    bounds = np.searchsorted(shard[order], np.arange(n_shards + 1))
    t = t.take(pa.array(order))
    parts = [t.slice(int(bounds[s]), int(bounds[s + 1] - bounds[s])).select(["doc_id", "tokens"]) for s in range(n_shards)]
    return (*parts, _block_counts(t))


def _block_counts(t: pa.Table) -> dict:
    if t.num_rows == 0:
        return {"documents": 0}
    counts = {c[len("pii_"):]: int(pc.sum(t[c]).as_py() or 0) for c in PII_COLUMNS if c in t.column_names}
    counts["documents"] = t.num_rows
    return counts


def _pack_and_write(out_uri: str, endpoint: Optional[str], spec: PackSpec, name: str, *parts: pa.Table,
                    sse: Optional[ServerSideEncryption] = None, sealed_with: Optional[str] = None) -> dict:
    """One shard: its documents sorted by doc_id, packed, written (unless already there); sealed
    under this worker's key when ``sealed_with`` (the driver's key fingerprint) is given."""
    parts = [p for p in parts if p.num_rows]
    t = pa.concat_tables(parts) if parts else None
    if t is None or t.num_rows == 0:
        return {"name": name, "num_sequences": 0, "num_tokens": 0, "documents": 0, "tail_tokens_dropped": 0, "bytes_written": 0}
    t = t.take(pc.sort_indices(t, [("doc_id", "ascending")]))
    blocks, docs, tail = pack_token_lists(t["tokens"], spec)
    out = resolve_storage(out_uri, endpoint, sse)
    key = dataset_key(sealed_with, out_uri)
    written = 0
    if len(blocks) and not out.exists("shards", name):
        written = write_shard(out, name, shard_table(blocks, docs), key)
    return {"name": name, "num_sequences": len(blocks), "num_tokens": int(blocks.size), "documents": t.num_rows,
            "tail_tokens_dropped": tail, "bytes_written": written}


def _pack_group(t: pa.Table, out_uri, endpoint, spec, n_shards, prefix, sse=None, sealed_with=None) -> pa.Table:
    """``_pack_and_write`` as a Ray Data ``map_groups`` function (the large-job path)."""
    name = f"{prefix}-{shard_name(int(t['shard'][0].as_py()), n_shards)}"
    return pa.Table.from_pylist([_pack_and_write(out_uri, endpoint, spec, name, t.select(["doc_id", "tokens"]),
                                                 sse=sse, sealed_with=sealed_with)])


def _prepare_key(recipe: Recipe) -> Optional[bytes]:
    """The driver's key for ``prepare.encrypt`` (None without it): no usable key is the
    recipe's error, one line, before any Ray work."""
    if not recipe.prepare.encrypt:
        return None
    try:
        return load_key()
    except EncryptionError as e:
        raise RecipeError("prepare.encrypt", str(e)) from None


def _key_runtime_env(key: Optional[bytes]) -> dict:
    """Ray remote options for the tasks that seal shards: the key file's path reaches them
    (``encryption.key_file_env``); the key itself never enters a runtime env."""
    env = key_file_env() if key is not None else {}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _write_rejects(out: Storage, rejects: list[dict], key: Optional[bytes] = None) -> dict[str, int]:
    """rejects/<reason>.jsonl, sorted by source location, sealed under ``key`` when given (they
    quote raw input). Bad input is expected to be a small share of a corpus, so it is gathered
    on the driver and each file written whole."""
    by_reason: dict[str, list[dict]] = {}
    for r in sorted(rejects, key=lambda r: (r["source"], r["line"], r["reason"])):
        entry = {k: r[k] for k in ("source", "line", "reason", "detail", "raw")}
        entry["line"] = None if entry["line"] == -1 else entry["line"]
        by_reason.setdefault(r["reason"], []).append(entry)
    for reason, rows in by_reason.items():
        name, text = f"{reason}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()
        out.child("rejects").write_bytes(name, text if key is None else encrypt_bytes(text, name, key))
    return {reason: len(rows) for reason, rows in sorted(by_reason.items())}


def _input_text_bytes(files: list[dict]) -> int:
    return sum((f["size"] or 0) * (4 if f["uri"].endswith(".gz") else 1) for f in files)


def _add(into: dict, counts: dict) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v


def _text_chars(t: pa.Table) -> int:
    return int(pc.sum(pc.utf8_length(t["text"])).as_py() or 0)


def prepare(recipe: Recipe) -> StageResult:
    """Run the pipeline; the result's folder is the prepared dataset (summary.json inside)."""
    summary = _prepare(recipe)
    return StageResult(summary["output"], summary)


def _prepare(recipe: Recipe) -> dict:
    import ray
    import ray.data

    from llm_ray.data import dedup as dd
    from llm_ray.data.tokenizer import load_tokenizer, special_ids, tokenizer_hash, train_tokenizer_from_texts
    from llm_ray.train.launcher import ensure_ray

    cfg, endpoint, sse = recipe.prepare, recipe.run.s3_endpoint, sse_of(recipe.run)
    cfg.require_io()
    key = _prepare_key(recipe)
    sealed_with = key_fingerprint(key) if key is not None else None
    started = time.time()
    out = resolve_storage(cfg.output, endpoint, sse)
    files = [f for uri in cfg.inputs for f in list_files(uri, endpoint)]  # fails fast, naming bucket/key
    if not files:
        raise StorageError(f"prepare.inputs: no files under {', '.join(cfg.inputs)}")
    tok_path = recipe.data.tokenizer.path
    given = load_tokenizer(tok_path) if tok_path and os.path.exists(tok_path) else None
    fingerprint = _fingerprint(recipe, files, tokenizer_hash(given) if given else None, sealed_with)
    done = read_manifest(out)
    if done and done.get("fingerprint") == fingerprint:
        summary = json.loads(out.read_text("summary.json"))
        return {**summary, "skipped": True}

    ensure_ray()
    stages: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        stages[name] = round(now - clock[0], 2)
        clock[0] = now

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Ray's default of 200 hash-shuffle partitions suits big clusters; on a few cores each costs
    # an actor and seconds. Scale it with the cluster instead (used by the large-job paths).
    ctx.default_hash_shuffle_parallelism = max(2, min(200, 2 * int(ray.cluster_resources().get("CPU", 1))))
    # Operator resource reservation keeps half the cluster for operators downstream; our passes
    # are single fused maps, and on 2 CPUs it ran one task at a time (measured: 20 tasks of
    # 0.2 s took 4.2 s with it, 2.2 s without). Restored afterwards for other Ray Data users.
    reservation = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    try:
        dedup_on = cfg.dedup.exact or cfg.dedup.near
        on_driver = dedup_on and _input_text_bytes(files) <= DRIVER_DEDUP_MAX_INPUT_BYTES
        key_columns = [dd.KEY_HASH] + ([dd.KEY_BANDS] if cfg.dedup.near else []) if on_driver else []

        # 1. read + parse + clean + dedup keys: one Ray Data execution, the maps fused into one task
        paths = ray.data.from_items([{"uri": f["uri"]} for f in files], override_num_blocks=min(len(files), 64))
        scanned = (
            paths.flat_map(_ParseFiles(cfg.format, cfg.text_field, endpoint))
            .map_batches(_CleanAndKey(cfg.clean, cfg.dedup, on_driver), batch_size=None, batch_format="pyarrow")
            .materialize()
        )
        refs = scanned.to_arrow_refs()
        scan = ray.remote(_scan_block).options(num_returns=2)
        scans = [scan.remote(ref, key_columns) for ref in refs]
        infos = ray.get([s[0] for s in scans])
        rejects = [r for i in infos for r in i["rejects"]]
        n_read = sum(i["records"] for i in infos)
        filtered: dict[str, int] = {}
        for i in infos:
            _add(filtered, i["filtered"])
        filtered = dict(sorted(filtered.items()))
        lap("read_clean_keys")

        # 2. dedup across the whole corpus
        removed_ref = None
        if on_driver:
            keys = pa.concat_tables(ray.get([s[1] for s in scans]))
            signatures = ray.remote(_signatures_for)

            def fetch(ids: list[str]) -> pa.Table:
                wanted = ray.put(pa.array(ids, pa.string()))
                return pa.concat_tables(ray.get([signatures.remote(ref, wanted) for ref in refs]))

            removed, dedup_stats = dd.driver_dedup(keys, cfg.dedup, fetch)
            survivors = keys.filter(pc.invert(pc.is_in(keys["doc_id"], value_set=pa.array(sorted(removed), pa.string()))))
            n_docs, chars = survivors.num_rows, int(pc.sum(survivors["chars"]).as_py() or 0)
            removed_ref = ray.put(pa.array(sorted(removed), pa.string())) if removed else None
            kept = scanned
        else:
            kept = scanned.filter(expr="kind == 'record' and drop_reason == ''").select_columns(["doc_id", "source", "line", "text"])
            dedup_stats = {}
            if cfg.dedup.exact:
                kept, stats = dd.exact_dedup(kept)
                dedup_stats.update(stats)
            if cfg.dedup.near:
                kept, stats = dd.near_dedup(kept, cfg.dedup)
                dedup_stats.update(stats)
            kept = kept.materialize()
            n_docs = kept.count()
            chars = sum(i["chars"] for i in infos) if not dedup_on else sum(
                ray.get([ray.remote(_text_chars).remote(ref) for ref in kept.to_arrow_refs()]))
        if n_docs == 0:
            raise ValueError("prepare: no document survived parsing, filters and dedup; see rejects/ and the filter counts")
        lap("dedup")

        # 3. PII scrub, tokenize (the tokenizer trained on the scrubbed corpus when none is given)
        scrubbed = kept.map_batches(_select_and_scrub, batch_size=None, batch_format="pyarrow",
                                    fn_kwargs={"removed": removed_ref, "pii_cfg": cfg.pii})
        tokenizer = given
        if tokenizer is None:
            scrubbed = scrubbed.materialize()
            t = recipe.data.tokenizer
            texts = (s for ref in scrubbed.to_arrow_refs() for s in ray.get(ref)["text"].to_pylist())
            tokenizer = train_tokenizer_from_texts(texts, t.kind, t.vocab_size, t.min_frequency)
            lap("scrub_train_tokenizer")
        special = special_ids(tokenizer)
        sep = special.eos_id if special.eos_id is not None else special.sep_id
        block_len = recipe.data.seq_len + (1 if recipe.train.objective == "causal_lm" else 0)
        n_shards = max(1, math.ceil(chars / CHARS_PER_TOKEN / block_len / cfg.sequences_per_shard))
        spec = PackSpec(block_len, sep, cfg.keep_doc_boundaries)
        tokenized = scrubbed.map_batches(_tokenize, batch_size=None, batch_format="pyarrow",
                                         fn_kwargs={"tokenizer_json": ray.put(tokenizer.to_str()), "n_shards": n_shards})
        tokenized_refs = tokenized.materialize().to_arrow_refs()
        lap("scrub_tokenize" if given is not None else "tokenize")

        # 4. group by shard, pack, write
        names = [f"{fingerprint}-{shard_name(s, n_shards)}" for s in range(n_shards)]
        sealing = {"sse": sse, "sealed_with": sealed_with}
        try:
            if len(tokenized_refs) * n_shards <= TASK_SHUFFLE_MAX_PARTS:
                split = ray.remote(_split_by_shard).options(num_returns=n_shards + 1)
                splits = [split.remote(ref, n_shards) for ref in tokenized_refs]
                write = ray.remote(_pack_and_write).options(**_key_runtime_env(key))
                shard_rows = ray.get([write.remote(out.uri, endpoint, spec, names[s], *[p[s] for p in splits], **sealing)
                                      for s in range(n_shards)])
                block_counts = ray.get([p[n_shards] for p in splits])
            else:
                shard_rows = (
                    ray.data.from_arrow_refs(tokenized_refs)
                    .groupby("shard")
                    .map_groups(_pack_group, batch_format="pyarrow",
                                fn_kwargs={"out_uri": out.uri, "endpoint": endpoint, "spec": spec, "n_shards": n_shards,
                                           "prefix": fingerprint, **sealing}, **_key_runtime_env(key))
                    .take_all()
                )
                block_counts = ray.get([ray.remote(_block_counts).remote(ref) for ref in tokenized_refs])
        except Exception as e:  # a worker without the key, or with another: one line, not its traceback
            refused = encryption_failure(e) if key is not None else None
            if refused is None:
                raise
            raise refused from None
        counts: dict[str, int] = {}
        for c in block_counts:
            _add(counts, c)
        assert counts["documents"] == n_docs, (counts, n_docs)
        pii_counts = {k: counts.get(k, 0) for k in ("email", "phone", "ip_address", "credit_card")} if cfg.pii.enabled else {}
        shards = sorted((r for r in shard_rows if r["num_sequences"] > 0), key=lambda r: r["name"])
        lap("pack_write")

        reject_counts = _write_rejects(out, rejects, key)
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
            "stage_seconds": stages,
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
            **({"encrypted": True, "key_fingerprint": sealed_with} if sealed_with else {}),
            "counts": {k: summary[k] for k in ("records_read", "rejects", "filtered", "dedup", "pii", "documents",
                                               "sequences", "tokens")},
            "shards": [{"name": str(r["name"]), "num_sequences": int(r["num_sequences"]), "num_tokens": int(r["num_tokens"]),
                        "documents": int(r["documents"])} for r in shards],
        })
        return summary
    finally:
        ctx.op_resource_reservation_enabled = reservation


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
