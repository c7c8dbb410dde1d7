"""``llm-ray bench data``: the corpus pipeline against a plain read + tokenize, in one run.

(a) ``llm-ray data prepare`` on a JSONL corpus: every stage (parse, clean, global exact and near
    dedup, PII, tokenize, pack, write) on the local Ray cluster, all cores. Both sides get the
    same tokenizer, trained before either is timed (``tokenizer_train_s``), and both start with
    their code imported: the baseline in this process, prepare in Ray workers warmed by a tiny
    Ray Data job (``warmup_s``; a fresh worker imports pyarrow, Ray Data and the pipeline once).
(b) the baseline: ``pyarrow.json.read_json`` of the same files and ``encode_batch`` of the same
    text in this process, tokenizers on one thread, so it is a per-core figure.
Then (c) trains the tiny recipe from the prepared shards and reports the share of step time spent
waiting for data. Benchmarks are not tests: nothing here asserts a figure.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time

from llm_ray.config import DEFAULT_CORPUS, load_recipe


def _write_corpus(folder: str, copies: int, seed: int = 0) -> int:
    """JSONL files of the bundled corpus's paragraphs, each copy with its words shuffled so that
    dedup keeps them (the bench measures work, not how much dedup can drop)."""
    paragraphs = [p.strip() for p in open(DEFAULT_CORPUS, encoding="utf-8").read().split("\n\n") if len(p.strip()) > 200]
    rng = random.Random(seed)
    size = 0
    for c in range(copies):
        path = os.path.join(folder, f"part-{c:03d}.jsonl")
        with open(path, "w") as f:
            for p in paragraphs:
                words = p.split()
                if c:
                    rng.shuffle(words)
                f.write(json.dumps({"text": " ".join(words)}) + "\n")
        size += os.path.getsize(path)
    return size


def _plain(folder: str, tokenizer_json: str) -> tuple[int, float]:
    import pyarrow.json as pj
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core: the baseline is per core
    tok = Tokenizer.from_str(tokenizer_json)
    start = time.perf_counter()
    tokens = 0
    for name in sorted(os.listdir(folder)):
        texts = pj.read_json(os.path.join(folder, name)).column("text").to_pylist()
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts))
    return tokens, time.perf_counter() - start


def _warm_workers(cores: int) -> None:
    """One Ray Data map task per core that imports what prepare's tasks import."""
    import ray.data

    def touch(batch):
        import llm_ray.data.dedup  # noqa: F401
        import llm_ray.data.pipeline  # noqa: F401
        import llm_ray.data.records  # noqa: F401
        import tokenizers  # noqa: F401

        return batch

    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.range(cores * 2, override_num_blocks=cores * 2).map_batches(touch).materialize()


def bench_data(copies: int = 8, steps: int = 30) -> dict:
    import ray
    from rich.console import Console
    from rich.table import Table

    from llm_ray.data.pipeline import prepare
    from llm_ray.data.tokenizer import save_tokenizer, train_tokenizer_from_texts
    from llm_ray.storage import resolve_storage
    from llm_ray.train.launcher import ensure_ray, pretrain
    from llm_ray.train.metrics import read_metrics

    ensure_ray()
    cores = int(ray.cluster_resources().get("CPU", 1))
    with tempfile.TemporaryDirectory(prefix="llm-ray-bench-data-") as tmp:
        raw = os.path.join(tmp, "raw")
        os.makedirs(raw)
        size = _write_corpus(raw, copies)
        start = time.perf_counter()
        texts = (json.loads(line)["text"] for name in sorted(os.listdir(raw)) for line in open(os.path.join(raw, name)))
        tok_path = os.path.join(tmp, "tokenizer.json")
        t = load_recipe("jobs/recipes/tiny-cpu.yaml").data.tokenizer  # what prepare would train
        save_tokenizer(train_tokenizer_from_texts(texts, t.kind, t.vocab_size, t.min_frequency), tok_path)
        tokenizer_train_s = time.perf_counter() - start
        start = time.perf_counter()
        _warm_workers(cores)
        warmup_s = time.perf_counter() - start
        load_before = os.getloadavg()[0]
        recipe = load_recipe("jobs/recipes/tiny-cpu.yaml", [
            f"prepare.inputs=[{raw}]", f"prepare.output={tmp}/prepared", f"data.tokenizer.path={tok_path}",
            f"run.storage_path={tmp}/runs", "run.name=bench-data", "run.progress_bar=false",
            f"train.max_steps={steps}", f"checkpoint.every_steps={steps}",
        ])
        start = time.perf_counter()
        summary = prepare(recipe).summary
        prepare_s = time.perf_counter() - start
        tokenizer_json = resolve_storage(summary["output"]).read_text("tokenizer.json")
        plain_tokens, plain_s = _plain(raw, tokenizer_json)
        load_after = os.getloadavg()[0]

        train = recipe.replace("data.source=shards", f"data.shards={summary['output']}")
        pretrain(train)
        rows = [r for s, r in sorted(read_metrics(resolve_storage(f"{tmp}/runs").child("bench-data")).items()) if s > 1]
        wait = sum(r["data_wait_s"] for r in rows)
        step = sum(r["step_s"] for r in rows)

    prepare_tps = summary["tokens"] / prepare_s
    plain_tps = plain_tokens / plain_s
    figures = {
        "bench": "data",
        "input_bytes": size,
        "documents": summary["documents"],
        "tokens": summary["tokens"],
        "cores": cores,
        "load_average_1m": [round(load_before, 2), round(load_after, 2)],  # before prepare, after the baseline
        "tokenizer_train_s": round(tokenizer_train_s, 2),
        "warmup_s": round(warmup_s, 2),
        "prepare_s": round(prepare_s, 2),
        "prepare_stage_s": summary.get("stage_seconds"),
        "prepare_tokens_per_s": round(prepare_tps, 1),
        "plain_tokens_per_s": round(plain_tps, 1),
        "prepare_over_plain": round(prepare_tps / plain_tps, 3),
        "prepare_over_plain_per_core": round(prepare_tps / cores / plain_tps, 3),
        "train_steps_timed": len(rows),
        "data_wait_share": round(wait / step, 4) if step else None,
    }
    table = Table(title="bench data (same run)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        table.add_row(key, str(value))
    Console(stderr=True).print(table)
    print(json.dumps(figures))
    return figures
