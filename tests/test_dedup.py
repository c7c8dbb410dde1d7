"""Corpus dedup on a real Ray cluster: exact and near duplicates removed across blocks, the
smallest doc_id kept, distinct documents kept, the threshold honoured, results independent of
partitioning."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from llm_ray.config.prepare import DedupConfig
from llm_ray.data.dedup import exact_dedup, minhash_signatures, near_dedup, optimal_lsh_params, permutations

CORPUS = Path(__file__).resolve().parents[1] / "jobs" / "data" / "tiny_corpus.txt"
DOC_WORDS = 250


def jaccard(x: str, y: str, k: int = 5) -> float:
    """True Jaccard of the k-word shingle sets (lower-cased \\w+ words), written independently."""

    def shingles(t):
        w = re.findall(r"\w+", t.lower())
        return {tuple(w[i : i + k]) for i in range(max(len(w) - k + 1, 1))}

    a, b = shingles(x), shingles(y)
    return len(a & b) / len(a | b)


def edit(text: str, rng: np.random.Generator, subs: int = 0, inserts: int = 0, deletes: int = 0) -> str:
    w = text.split()
    for _ in range(subs):
        w[int(rng.integers(len(w)))] = f"edited{int(rng.integers(10**6))}"
    for _ in range(inserts):
        w.insert(int(rng.integers(len(w))), f"inserted{int(rng.integers(10**6))}")
    for _ in range(deletes):
        del w[int(rng.integers(len(w)))]
    return " ".join(w)


@pytest.fixture(scope="module")
def corpus():
    """30 distinct 250-word windows of the bundled corpus (same topic and length), planted
    exact copies, lightly edited copies (near duplicates), one heavily edited copy and a pair
    of short documents equal up to case and punctuation. Ids are zero-padded so that string
    order is numeric order; some copies get a smaller id than their original, so the copy is
    the survivor."""
    words = CORPUS.read_text(encoding="utf-8").split()
    stride = (len(words) - DOC_WORDS) // 40
    texts: list[str] = []
    for j in range(40):  # the corpus repeats some passages: skip windows that overlap a kept one
        t = " ".join(words[j * stride : j * stride + DOC_WORDS])
        if len(texts) < 30 and all(jaccard(t, u) < 0.1 for u in texts):
            texts.append(t)
    assert len(texts) == 30
    base = {f"d{1000 + 10 * j}": t for j, t in enumerate(texts)}
    ids = sorted(base)

    rng = np.random.default_rng(0)
    exact = {}  # copy id -> original id
    for j in range(0, 4):
        exact[f"d{1000 + 10 * j + 5}"] = ids[j]  # larger id: the copy goes
    exact[f"d{1000 + 10 * 3 + 7}"] = ids[3]  # a third copy of the same text
    for j in range(4, 7):
        exact[f"d{j:04d}"] = ids[j]  # smaller id: the original goes

    near = {}  # copy id -> (original id, edited text)
    plans = [dict(subs=2), dict(subs=1, inserts=1), dict(subs=1, deletes=1), dict(inserts=1, deletes=1), dict(subs=1)]
    for n, j in enumerate(range(10, 20)):
        copy = edit(base[ids[j]], rng, **plans[n % len(plans)])
        cid = f"d{1000 + 10 * j + 5}" if n % 2 == 0 else f"d{j + 100:04d}"
        near[cid] = (ids[j], copy)

    heavy_id = f"d{1000 + 10 * 25 + 5}"
    heavy = edit(base[ids[25]], rng, subs=8)

    short = {"d0050": "Hello, World -- again!", "d0051": "hello world again"}
    return {"base": base, "exact": exact, "near": near, "heavy": (heavy_id, ids[25], heavy), "short": short}


def rows(corpus, *, exact=False, near=False, heavy=False, short=False) -> list[dict]:
    out = dict(corpus["base"])
    if exact:
        out.update({cid: corpus["base"][orig] for cid, orig in corpus["exact"].items()})
    if near:
        out.update({cid: text for cid, (_, text) in corpus["near"].items()})
    if heavy:
        hid, _, text = corpus["heavy"]
        out[hid] = text
    if short:
        out.update(corpus["short"])
    return [{"doc_id": k, "text": v, "source": "test"} for k, v in out.items()]


def dataset(ray, items: list[dict], blocks: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(items))
    return ray.data.from_items([items[i] for i in order]).repartition(blocks)


def ids_of(ds) -> list[str]:
    return sorted(r["doc_id"] for r in ds.select_columns(["doc_id"]).take_all())


@pytest.fixture(scope="module")
def pipeline_runs(ray_cluster, corpus):
    """Exact then near dedup (threshold 0.8) of the full mix, twice: 1 input block and 2
    shuffle partitions, then 4 blocks in another row order and 3 partitions."""
    items = rows(corpus, exact=True, near=True, heavy=True, short=True)
    runs = []
    for blocks, partitions, seed in ((1, 2, 1), (4, 3, 2)):
        exact, exact_stats = exact_dedup(dataset(ray_cluster, items, blocks, seed), num_partitions=partitions)
        exact_rows = exact.take_all()
        near, near_stats = near_dedup(exact, DedupConfig(threshold=0.8), num_partitions=partitions)
        runs.append({"exact_rows": exact_rows, "exact_stats": exact_stats, "kept": ids_of(near), "near_stats": near_stats})
    return items, runs


def test_exact_dedup_across_blocks_keeps_smallest_id(corpus, pipeline_runs):
    items, runs = pipeline_runs
    groups: dict[str, list[str]] = {}
    for r in items:
        groups.setdefault(r["text"], []).append(r["doc_id"])
    expected = sorted(min(g) for g in groups.values())
    for run in runs:
        assert sorted(r["doc_id"] for r in run["exact_rows"]) == expected
        assert run["exact_stats"] == {"exact_duplicates": len(items) - len(expected)} == {"exact_duplicates": 8}
        for r in run["exact_rows"]:
            assert r["content_hash"] == hashlib.sha1(r["text"].encode("utf-8")).hexdigest()
            assert r["source"] == "test"  # other columns pass through
    kept = {r["doc_id"] for r in runs[0]["exact_rows"]}
    assert {"d0004", "d0005", "d0006"} <= kept  # copies with the smaller id won
    assert not kept & {"d1005", "d1015", "d1025", "d1035", "d1037", "d1040", "d1050", "d1060"}


def test_near_dedup_removes_edited_copies_keeps_distinct(corpus, pipeline_runs):
    for cid, (orig, text) in corpus["near"].items():
        assert jaccard(text, corpus["base"][orig]) >= 0.88, cid
    _, orig, heavy = corpus["heavy"]
    assert 0.55 <= jaccard(heavy, corpus["base"][orig]) <= 0.75  # below 0.8: must survive

    _, runs = pipeline_runs
    after_exact = {r["doc_id"] for r in runs[0]["exact_rows"]}
    removed = {max(cid, orig) for cid, (orig, _) in corpus["near"].items()} | {"d0051"}
    assert runs[0]["kept"] == sorted(after_exact - removed)  # distinct docs and the heavy copy survive
    stats = runs[0]["near_stats"]
    assert stats["near_duplicates"] == len(removed) == 11
    assert stats["verified_pairs"] == 11  # one per planted pair: no distinct pair verified
    assert stats["candidate_pairs"] >= stats["verified_pairs"]


def test_results_independent_of_partitioning(pipeline_runs):
    items, (first, second) = pipeline_runs
    assert sorted(r["doc_id"] for r in first["exact_rows"]) == sorted(r["doc_id"] for r in second["exact_rows"])
    assert first["kept"] == second["kept"]
    assert first["exact_stats"] == second["exact_stats"] and first["near_stats"] == second["near_stats"]
    assert len(first["kept"]) == len(items) - first["exact_stats"]["exact_duplicates"] - first["near_stats"]["near_duplicates"]


def test_threshold_decides_a_heavily_edited_copy(ray_cluster, corpus):
    """True Jaccard 0.72 (asserted in [0.55, 0.75] above): a 128-permutation estimate has sd
    ~0.04 there, so 0.5 and 0.9 are both over 4 sd away and the outcome does not hinge on the
    seed."""
    hid, orig, _ = corpus["heavy"]
    items = rows(corpus, heavy=True)
    ds = dataset(ray_cluster, items, 3, seed=3).materialize()
    kept, stats_hi = near_dedup(ds, DedupConfig(threshold=0.9), num_partitions=3)
    assert ids_of(kept) == sorted(r["doc_id"] for r in items)
    assert stats_hi["near_duplicates"] == 0

    dropped, stats_lo = near_dedup(ds, DedupConfig(threshold=0.5), num_partitions=3)
    assert ids_of(dropped) == sorted({r["doc_id"] for r in items} - {hid})
    assert stats_lo["near_duplicates"] == 1 and stats_lo["verified_pairs"] == 1


def test_minhash_estimates_jaccard_without_bias(corpus):
    """The hand-written MinHash: estimate - true Jaccard within 4 sd for every pair, mean error
    near zero; signatures do not depend on how documents are batched."""
    a, b = permutations(128, seed=1)
    rng = np.random.default_rng(7)
    texts = list(corpus["base"].values())
    z = []
    for i in range(60):
        x = texts[i % len(texts)]
        y = edit(x, rng, subs=int(rng.integers(1, 30)))
        j = jaccard(x, y)
        sig = minhash_signatures([x, y], a, b, 5)
        est = float((sig[0] == sig[1]).mean())
        z.append((est - j) / np.sqrt(j * (1 - j) / 128))
    assert max(abs(v) for v in z) < 4 and abs(np.mean(z)) < 0.5

    together = minhash_signatures(texts, a, b, 5)
    alone = np.stack([minhash_signatures([t], a, b, 5)[0] for t in texts])
    assert (together == alone).all()


def test_lsh_params():
    assert optimal_lsh_params(0.8, 128) == (12, 10)
    for t in (0.5, 0.7, 0.8, 0.9):
        bands, rows_ = optimal_lsh_params(t, 128)
        assert bands * rows_ <= 128
        collide = lambda j: 1 - (1 - j**rows_) ** bands  # noqa: E731
        assert collide(t) > 0.5 and collide(min(1.0, t + 0.1)) > 0.98 and collide(t - 0.3) < 0.2


def test_huge_buckets_fall_back_to_greedy_with_the_same_clusters(corpus, monkeypatch):
    """The per-bucket step on one block, without Ray: all-pairs and the greedy fallback for
    oversized buckets link the same documents to the same smallest id."""
    import pyarrow as pa

    from llm_ray.data import dedup

    texts = {cid: text for cid, (_, text) in corpus["near"].items()}
    texts.update({orig: corpus["base"][orig] for orig, _ in corpus["near"].values()})
    texts.update(list(corpus["base"].items())[:5])
    a, b = permutations(128, seed=1)
    ids = sorted(texts)
    sig = minhash_signatures([texts[i] for i in ids], a, b, 5)
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(512), len(ids), [None, pa.py_buffer(sig.tobytes())])
    bands, rows_ = optimal_lsh_params(0.8, 128)
    band_rows = dedup._band_rows(pa.table({"doc_id": ids, "_minhash": col}), bands, rows_)
    # every row into band 0's bucket 0: one bucket holding all documents
    one_bucket = band_rows.filter(pa.compute.equal(band_rows["band"], 0))
    one_bucket = one_bucket.set_column(1, "bucket", pa.array([0] * one_bucket.num_rows, pa.int64()))

    def components(table):
        links = table.filter(pa.compute.is_valid(table["src"]))
        return dedup._non_minimal_members(links["src"].to_pylist(), links["dst"].to_pylist())

    pairwise = components(dedup._verify_buckets(one_bucket, 0.8, bands, rows_))
    monkeypatch.setattr(dedup, "MAX_PAIRWISE_BUCKET", 4)
    greedy = components(dedup._verify_buckets(one_bucket, 0.8, bands, rows_))
    expected = {max(cid, orig) for cid, (orig, _) in corpus["near"].items()}
    assert pairwise == greedy == expected


def test_components_keep_the_smallest_id_of_a_chain():
    from llm_ray.data.dedup import _non_minimal_members

    # b~c, a~b, d~e: a, b, c are one component even though a and c were never compared
    assert _non_minimal_members(["c", "b", "e"], ["b", "a", "d"]) == {"b", "c", "e"}


def test_driver_dedup_matches_the_shuffle_path(pipeline_runs):
    """The pipeline's small-corpus path (keys computed per block, duplicates decided on the
    driver) drops the same documents and counts the same pairs as the two Ray Data shuffles."""
    import pyarrow as pa

    from llm_ray.data.dedup import KEY_SIGNATURE, dedup_keys, driver_dedup

    items, runs = pipeline_runs
    cfg = DedupConfig(threshold=0.8)
    half = len(items) // 2  # keys come from blocks: compute them in two
    keys = pa.concat_tables([
        pa.table({"doc_id": [r["doc_id"] for r in part], **dedup_keys([r["text"] for r in part], cfg)})
        for part in (items[:half], items[half:])
    ])
    fetched = []

    def fetch(ids):
        fetched.append(len(ids))
        return keys.filter(pa.compute.is_in(keys["doc_id"], value_set=pa.array(ids))).select(["doc_id", KEY_SIGNATURE])

    removed, stats = driver_dedup(keys, cfg, fetch)
    assert sorted({r["doc_id"] for r in items} - removed) == runs[0]["kept"]
    assert stats == {**runs[0]["exact_stats"], **runs[0]["near_stats"]}
    assert len(fetched) == 1 and fetched[0] < len(items) // 2  # only documents sharing a bucket
