"""``llm-ray bench serve``: the OpenAI endpoint under 1, 8 and 32 concurrent clients, against
``transformers`` ``generate`` on the same model, in the same run, on the same machine.

Three workloads, the same requests on every side (greedy, distinct prompts, eos ignored so each
request generates exactly its own length; HF: ``min_new_tokens``):

- ``uniform``: every request asks for ``max_tokens``. The best case for a static batch: no row
  finishes early, so no padding is wasted.
- ``mixed``: request lengths drawn (seeded) uniformly from ``[max_tokens/8, 2*max_tokens -
  max_tokens/8]`` (mean ``max_tokens``), as in vLLM's ``benchmark_serving`` random dataset.
  A static batch runs until its longest request is done and only the requested tokens count;
  continuous batching refills a finished row at once.
- ``shared_prefix`` (opt-in: ``--workloads uniform,shared_prefix``): every prompt is one long
  shared system prompt + few-shot examples (``SHARED_PREFIX``, several hundred tokens, built
  from fixed text) followed by a short distinct question; every request asks for
  ``max_tokens``. The in-process engine runs it twice, prefix cache on
  (``serve.prefix_cache_tokens``, or 8192 where that is 0) and off, the same requests and
  client count; the figures give ``ttft_p50_prefix_off_over_on`` (same run) and the cache's
  hit rate over the timed requests (share of prompt tokens served from the cache). The
  endpoint runs it with the served app's own prefix cache (on by default). No HF rows: what
  it measures is prefill reuse, which ``generate`` does not have. The warm-up request of each
  engine run (and of the endpoint) is one of these prompts, so the cache-on run starts with
  the prefix cached: the steady state of a service with one system prompt.

Rows of the table:
(a) HF ``generate`` one request at a time (sequential) and in static batches of 8/16/32 taken in
    request order, fp32 and bf16 (``mixed``: see ``hf_baselines``); the best of each kind is
    the baseline;
(b) our ``ContinuousBatchingEngine`` in this process, no HTTP or Serve, the same requests as the
    largest client count: what the endpoint could reach on this machine without serving costs;
(c) the endpoint (``llm-ray serve``'s application on a local Ray cluster) over real HTTP: one
    asyncio client sending ``N * rounds`` streamed requests, at most N in flight;
    throughput (generated tokens, as reported by the usage chunk, over wall time), p50/p99
    latency and time to first token.

Per row (b) and (c), as vLLM's ``benchmark_serving``: requests/s (requests over wall time);
TTFT; TPOT, per request ``(latency - ttft) / (tokens - 1)`` (requests of one token have none),
mean/p50/p99 over requests; ITL, the gaps between consecutive streamed pieces of all requests
pooled, mean/p50/p99:
- engine in-process: per token. It reads ``engine.token_batches`` with no interval; a batch
  that carries k tokens (already queued when the reader came back) after a gap g counts as k
  gaps of g/k, so the ITLs of a request add up to ``latency - ttft``.
- endpoint: per SSE chunk, as vLLM counts it (a chunk's token count is not in the stream).
  The served app groups tokens that come within ``serve.stream_interval_ms`` (50 ms by
  default) into one chunk, so its ITL is at least about that interval whatever the decode
  step time: compare TPOT across rows, and ``tokens_per_chunk`` (tokens over content chunks)
  says how many tokens a chunk carried. ``--set serve.stream_interval_ms=0`` makes chunks
  per decode step.
The HTTP client is aiohttp on one event loop (``serve_client.py``). On a host with few cores it
still shares them with the proxy and the replica, so each endpoint row also reports the cores
each process used meanwhile (``cpu_cores``: client, replica, proxy, controller, Ray's others and
the host's total busy): where the endpoint falls short of the engine, that says whose CPU it was.
The dtype ``auto`` chose, and the decode-shaped matmul rates it chose by, are printed first.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional

PROMPT_TOPICS = [
    "the ocean", "a lighthouse", "bread baking", "the moon", "a bicycle trip", "winter", "a robot", "a library",
    "volcanoes", "the first computer", "a garden", "honey bees", "a train station", "chess", "rain", "a violin",
]
WORKLOADS = ("uniform", "mixed", "shared_prefix")


def _shared_prefix() -> str:
    """A system prompt and few-shot examples, the same for every ``shared_prefix`` request
    (several hundred tokens, fixed text: the same ids on every run)."""
    lines = [
        "You are a careful assistant for a school library. Answer in two or three plain sentences, "
        "name one concrete detail, and do not invent sources. Below are examples of good answers.",
        "",
    ]
    for t in PROMPT_TOPICS:
        lines.append(f"Question: What is one interesting thing about {t}?")
        lines.append(
            f"Answer: People have written about {t} for a long time, and each account notices something new: "
            f"look closely at {t} and ask how it changes over a year."
        )
        lines.append("")
    return "\n".join(lines) + "\n"


SHARED_PREFIX = _shared_prefix()


def shared_prefix_prompts(n: int) -> list[str]:
    """``n`` prompts: ``SHARED_PREFIX`` + a short distinct question."""
    forms = ["Why does {} matter?", "How would you explain {} to a visitor?", "What should a beginner know about {}?", "What is a common mistake about {}?"]
    return [
        SHARED_PREFIX + "Question: " + forms[(i // len(PROMPT_TOPICS)) % len(forms)].format(PROMPT_TOPICS[i % len(PROMPT_TOPICS)]) + f" (#{i})\nAnswer:"
        for i in range(n)
    ]


def bench_prompts(n: int) -> list[str]:
    """``n`` distinct short instructions (a few dozen tokens each)."""
    forms = ["Write a short story about {}.", "Explain {} to a child.", "List three facts about {}.", "Describe {} in a poem."]
    return [forms[(i // len(PROMPT_TOPICS)) % len(forms)].format(PROMPT_TOPICS[i % len(PROMPT_TOPICS)]) + f" (#{i})" for i in range(n)]


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_ids: tuple[int, ...]
    max_tokens: int


def request_lengths(workload: str, n: int, max_tokens: int, seed: int = 0) -> list[int]:
    """Tokens each of ``n`` requests generates: all ``max_tokens``, or mixed with that mean."""
    if workload in ("uniform", "shared_prefix"):
        return [max_tokens] * n
    if workload == "mixed":
        lo = max(1, max_tokens // 8)
        rng = random.Random(seed)
        return [rng.randint(lo, 2 * max_tokens - lo) for _ in range(n)]
    raise ValueError(f"workload: must be one of {WORKLOADS}, got {workload!r}")


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[k]


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _summary(results: list[dict], wall: float, clients: int) -> dict:
    """Row figures from per-request ``latency``, ``ttft``, ``tokens``, ``itl`` (list of gaps)
    and optionally ``chunks`` (content chunks: the endpoint)."""
    lat, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1 and r["ttft"] == r["ttft"]]
    itl = [g for r in results for g in r["itl"]]
    out = {
        "clients": clients,
        "requests": len(results),
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "p50_latency_s": statistics.median(lat),
        "p99_latency_s": _percentile(lat, 0.99),
        "mean_ttft_s": _mean(ttft),
        "p50_ttft_s": statistics.median(ttft),
        "p99_ttft_s": _percentile(ttft, 0.99),
        "mean_tpot_s": _mean(tpot),
        "p50_tpot_s": _percentile(tpot, 0.5),
        "p99_tpot_s": _percentile(tpot, 0.99),
        "mean_itl_s": _mean(itl),
        "p50_itl_s": _percentile(itl, 0.5),
        "p99_itl_s": _percentile(itl, 0.99),
    }
    if all("chunks" in r for r in results):
        chunks = sum(r["chunks"] for r in results)
        out["tokens_per_chunk"] = sum(r["tokens"] for r in results) / chunks if chunks else float("nan")
    return out


# -- (a) transformers generate --------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_sequential(hf, requests: list[BenchRequest], pad_id: int, n: int = 3) -> float:
    """Tokens/s of ``generate`` on the first ``n`` requests, one at a time."""
    import torch

    t0, tokens = time.perf_counter(), 0
    for r in requests[:n]:
        ids = torch.tensor([r.prompt_ids], device=hf.device)
        res = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.max_tokens, min_new_tokens=r.max_tokens, do_sample=False, pad_token_id=pad_id)
        tokens += res.shape[1] - ids.shape[1]
    _sync(hf.device)
    return tokens / (time.perf_counter() - t0)


def hf_static(hf, requests: list[BenchRequest], pad_id: int, batch: int) -> float:
    """Useful tokens/s of ``generate`` on ``requests`` in static batches of ``batch``, in order.

    A batch generates as many tokens as its longest request asks for (``generate`` has one
    ``max_new_tokens``); only what each request asked for counts.
    """
    from llm_ray.generation.api import left_pad

    t0, useful = time.perf_counter(), 0
    for i in range(0, len(requests), batch):
        group = requests[i : i + batch]
        longest = max(r.max_tokens for r in group)
        ids, mask = (t.to(hf.device) for t in left_pad([list(r.prompt_ids) for r in group], pad_id))
        hf.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False, pad_token_id=pad_id)
        useful += sum(r.max_tokens for r in group)
    _sync(hf.device)
    return useful / (time.perf_counter() - t0)


def hf_baselines(model: str, workloads: dict[str, list[BenchRequest]], pad_id: int, batch_sizes=(8, 16, 32), device=None, dtypes=("fp32", "bf16")) -> dict:
    """Per workload: ``{"sequential": {dtype: tok/s}, "static_batch": {"fp32_b32": tok/s, ...}}``.

    ``uniform``: one batch per size (every batch is alike), fp32 and bf16. ``mixed``: every
    request, at the dtype and batch size that were fastest on ``uniform`` (a smaller batch
    wastes less on unequal lengths, but is slower per step by more than it saves; running every
    size over every request would make this baseline take minutes). ``dtypes``: the bench drops
    bf16 where it multiplies at under half fp32's rate (no contender; on one CPU here 60x slower).
    """
    import torch

    from llm_ray.bench.generate import load_hf_model

    hf = load_hf_model(model, torch.float32, device)
    out = {w: {"sequential": {}, "static_batch": {}} for w in workloads}
    uniform = workloads["uniform"]
    with torch.inference_mode():
        for name, dtype in ((d, {"fp32": torch.float32, "bf16": torch.bfloat16}[d]) for d in dtypes):
            hf = hf.to(dtype)
            warm = uniform[0]
            hf.generate(torch.tensor([warm.prompt_ids], device=hf.device), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=pad_id)
            out["uniform"]["sequential"][name] = hf_sequential(hf, uniform, pad_id)
            for b in batch_sizes:
                out["uniform"]["static_batch"][f"{name}_b{b}"] = hf_static(hf, uniform[:b], pad_id, b)
        if "mixed" in workloads:
            best = max(out["uniform"]["static_batch"], key=out["uniform"]["static_batch"].get)  # e.g. fp32_b32
            dtype_name, b = best.split("_b")
            hf = hf.to(torch.float32 if dtype_name == "fp32" else torch.bfloat16)
            mixed = workloads["mixed"]
            out["mixed"]["sequential"][dtype_name] = hf_sequential(hf, mixed, pad_id)
            out["mixed"]["static_batch"][best] = hf_static(hf, mixed, pad_id, int(b))
    del hf
    return out


# -- (b) the engine in this process ---------------------------------------------------------------
class _InlineExecutor(concurrent.futures.Executor):
    """Runs each step on the caller's thread: the thread that already ran the HF baselines, so
    torch work stays on one thread (see ``llm_ray.serve.engine.torch_executor``)."""

    def submit(self, fn, /, *args, **kwargs):
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:
            future.set_exception(e)
        return future


def engine_in_process(
    model: str,
    dtype_name: str,
    requests: list[BenchRequest],
    clients: int,
    max_batch_size: int,
    prefill_tokens_per_step: int,
    device=None,
    prefix_cache_tokens: int = 0,
) -> dict:
    """``requests`` straight into a ``ContinuousBatchingEngine``, at most ``clients`` at a time
    (no HTTP, no Serve). ``prefix_cache_hit_rate``: share of the timed requests' prompt tokens
    served from the prefix cache (the warm-up request not counted)."""
    import torch

    from llm_ray.bundle import load_bundle
    from llm_ray.generation.config import SamplingParams
    from llm_ray.serve.engine import ContinuousBatchingEngine
    from llm_ray.train.device import pick_inference_dtype

    device = device or torch.device("cpu")
    dtype = pick_inference_dtype(dtype_name, device)
    bundle = load_bundle(model, device=device, dtype=dtype)
    engine = ContinuousBatchingEngine(
        bundle.model,
        bundle.eos_ids,
        bundle.cfg.max_seq_len,
        max_batch_size=max_batch_size,
        max_queue=len(requests),
        prefill_tokens_per_step=prefill_tokens_per_step,
        executor=_InlineExecutor(),
        prefix_cache_tokens=prefix_cache_tokens,
    )

    async def one(r: BenchRequest) -> dict:
        t0, ttft, n, last, itl = time.perf_counter(), None, 0, None, []
        seq = engine.submit(list(r.prompt_ids), SamplingParams(max_new_tokens=r.max_tokens), ignore_eos=True)
        async for batch in engine.token_batches(seq):
            now = time.perf_counter()
            k = len(batch)
            if last is None:  # the first token (TTFT); any others of this batch came with it
                ttft, k = now - t0, k - 1
            if k:
                itl.extend([(now - last) / k] * k if last is not None else [0.0] * k)
            n, last = n + len(batch), now
        return {"latency": time.perf_counter() - t0, "ttft": ttft if ttft is not None else float("nan"), "tokens": n, "itl": itl}

    async def main() -> dict:
        await one(requests[0])  # warm-up
        pc = engine.prefix_cache
        q0, h0 = pc.queried_tokens, pc.hit_tokens
        slots = asyncio.Semaphore(clients)  # at most ``clients`` in flight, as ``drive``

        async def limited(r: BenchRequest) -> dict:
            async with slots:
                return await one(r)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(r) for r in requests))
        out = _summary(list(results), time.perf_counter() - t0, clients)
        q, h = pc.queried_tokens - q0, pc.hit_tokens - h0
        return {**out, "prefix_cache_tokens": prefix_cache_tokens, "prefix_cache_hit_rate": h / q if q else 0.0}

    try:
        return {**asyncio.run(main()), "dtype": str(dtype).removeprefix("torch.")}
    finally:
        engine.shutdown()


# -- (c) the endpoint -----------------------------------------------------------------------------
def drive(url: str, requests: list[BenchRequest], clients: int, key: Optional[str] = None) -> dict:
    """``requests`` over HTTP from one asyncio client, at most ``clients`` in flight (vLLM's
    ``--max-concurrency``); the row figures plus ``cpu_cores``: the cores each process (client,
    replica, proxy, controller, Ray's others) used meanwhile."""
    from llm_ray.bench.serve_client import ProcessCPU, stream_requests

    cpu = ProcessCPU()
    cpu.start()
    results, wall = stream_requests(url, requests, clients, key)
    return {**_summary(results, wall, clients), "cpu_cores": cpu.stop()}


def _dtype_choice(name: str, device) -> tuple[str, tuple[str, ...]]:
    """What ``serve.dtype`` resolves to here and the measurement that decided it; and the dtypes
    worth an HF baseline (bf16 only where it is at least half as fast as fp32)."""
    import torch

    from llm_ray.train.device import decode_matmul_rates, inference_dtype_for, pick_inference_dtype

    device = device or torch.device("cpu")
    if device.type == "cuda":
        return f"dtype: {name} -> {str(pick_inference_dtype(name, device)).removeprefix('torch.')} on {device}", ("fp32", "bf16")
    rates = decode_matmul_rates(device)
    chosen = inference_dtype_for(rates) if name == "auto" else name
    hf = ("fp32", "bf16") if rates["bf16"] >= 0.5 * rates["fp32"] else ("fp32",)
    return (f"dtype: {name} -> {chosen} (decode-shaped matmul here: bf16 {rates['bf16']:.4f}, fp32 {rates['fp32']:.4f} "
            f"TFLOP/s; auto takes bf16 at 1.25x fp32){'' if 'bf16' in hf else '; no bf16 HF baseline (under half of fp32)'}"), hf


def bench_serve(
    recipe: Optional[str],
    overrides: list[str],
    clients: str = "1,8,32",
    max_tokens: int = 64,
    rounds: int = 4,
    workloads: str = "uniform,mixed",
    original: str = "",
) -> dict:
    """``original``: the folder a compressed ``serve.model`` came from (``llm-ray compress``);
    its in-process engine runs the same requests, giving ``engine_<N>_over_original``."""
    import socket

    import ray
    from ray import serve
    from rich.console import Console
    from rich.table import Table

    from llm_ray.bundle import load_bundle
    from llm_ray.config.serve import load_serve_config
    from llm_ray.generation.api import pad_id_for
    from llm_ray.serve.cli import wait_ready
    from llm_ray.train.device import local_device

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    levels = sorted(int(c) for c in clients.split(",") if c.strip())
    kinds = [w.strip() for w in workloads.split(",") if w.strip()]
    bad = [w for w in kinds if w not in WORKLOADS]
    if bad or "uniform" not in kinds:
        raise ValueError(f"--workloads: 'uniform' plus any of {WORKLOADS}, got {workloads!r}")
    std = [w for w in kinds if w != "shared_prefix"]  # the workloads with HF baselines
    with socket.socket() as s:  # a free port: the bench must not collide with a running server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_serve_config(recipe, list(overrides) + [f"serve.port={port}", "serve.host=127.0.0.1"])
    n = levels[-1] * rounds  # the top level's requests; a level of c clients sends the first c*rounds
    prompts = bench_prompts(n)
    bundle = load_bundle(cfg.model)
    ids = [tuple(bundle.tokenizer.encode(p).ids) for p in prompts]
    reqs = {w: [BenchRequest(p, i, L) for p, i, L in zip(prompts, ids, request_lengths(w, n, max_tokens))] for w in std}
    if "shared_prefix" in kinds:
        sp = shared_prefix_prompts(n)
        reqs["shared_prefix"] = [BenchRequest(p, tuple(bundle.tokenizer.encode(p).ids), max_tokens) for p in sp]
        prefix_len = len(bundle.tokenizer.encode(SHARED_PREFIX).ids)
    pad_id = pad_id_for(bundle)
    del bundle

    # Baselines and the in-process engine on the device a replica would use (its GPU if any).
    # The engine has the served app's prefix cache (``serve.prefix_cache_tokens``).
    device = local_device() if cfg.use_gpu is not False else None
    dtype_note, hf_dtypes = _dtype_choice(cfg.dtype, device)
    print(dtype_note, file=sys.stderr, flush=True)
    hf = hf_baselines(cfg.model, {w: reqs[w] for w in std}, pad_id, batch_sizes=tuple(b for b in (8, 16, 32) if b <= n), device=device, dtypes=hf_dtypes)
    args = (cfg.model, cfg.dtype)
    engine = {w: engine_in_process(*args, reqs[w], levels[-1], cfg.max_batch_size, cfg.prefill_tokens_per_step, device, cfg.prefix_cache_tokens) for w in std}
    if "shared_prefix" in kinds:
        on_tokens = cfg.prefix_cache_tokens or 8192
        engine["shared_prefix"] = engine_in_process(*args, reqs["shared_prefix"], levels[-1], cfg.max_batch_size, cfg.prefill_tokens_per_step, device, on_tokens)
        engine_off = engine_in_process(*args, reqs["shared_prefix"], levels[-1], cfg.max_batch_size, cfg.prefill_tokens_per_step, device, 0)
    # the uncompressed model on the same requests (the same tokenizer: compress keeps it)
    engine_original = {w: engine_in_process(original, cfg.dtype, reqs[w], levels[-1], cfg.max_batch_size, cfg.prefill_tokens_per_step,
                                            device, cfg.prefix_cache_tokens) for w in std} if original else {}

    from llm_ray.serve.app import run, url as app_url

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    try:
        run(cfg)
        base = app_url(cfg)
        wait_ready(base)
        key = (cfg.resolved_api_keys() or [None])[0]
        drive(base, reqs["uniform"][:2], 2, key)  # warm-up: first forward passes, kernel selection
        ours = {w: [drive(base, reqs[w][: c * rounds], c, key) for c in levels] for w in kinds}
    finally:
        serve.shutdown()

    table = Table(title=f"bench serve: {cfg.served_name}, greedy, mean {max_tokens} tokens/request, same run; ITL: engine per token, endpoint per SSE chunk")
    cols = ("workload", "what", "tokens/s", "req/s", "p50 lat s", "p99 lat s", "p50 TTFT s", "p99 TTFT s", "mean TPOT ms", "p50 TPOT ms", "p99 TPOT ms", "mean ITL ms", "p50 ITL ms", "p99 ITL ms")
    for col in cols:
        table.add_column(col, justify="left" if col in ("workload", "what") else "right")
    blank = [""] * (len(cols) - 3)

    def ms(x: float) -> str:
        return f"{1000 * x:.1f}"

    def timed_row(w: str, label: str, r: dict) -> None:
        table.add_row(
            w, label, f"{r['tokens_per_s']:.1f}", f"{r['requests_per_s']:.2f}", f"{r['p50_latency_s']:.2f}", f"{r['p99_latency_s']:.2f}",
            f"{r['p50_ttft_s']:.3f}", f"{r['p99_ttft_s']:.3f}",
            ms(r["mean_tpot_s"]), ms(r["p50_tpot_s"]), ms(r["p99_tpot_s"]), ms(r["mean_itl_s"]), ms(r["p50_itl_s"]), ms(r["p99_itl_s"]),
        )

    def rounded(r: dict) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}

    figures: dict = {"model": cfg.served_name, "original": original or None, "dtype": cfg.dtype, "device": str(device or "cpu"), "max_tokens": max_tokens, "rounds": rounds, "workloads": {}}
    top = levels[-1]
    for w in std:
        base_seq = max(hf[w]["sequential"].values())
        best_key = max(hf[w]["static_batch"], key=hf[w]["static_batch"].get)
        base_static = hf[w]["static_batch"][best_key]
        for k, v in hf[w]["sequential"].items():
            table.add_row(w, f"HF generate, sequential, {k}", f"{v:.1f}", *blank)
        for k, v in hf[w]["static_batch"].items():
            table.add_row(w, f"HF generate, static batch {k}", f"{v:.1f}", *blank)
        e = engine[w]
        rows = [(f"engine in-process ({e['dtype']}), {top} streams, no HTTP", e)] + [(f"llm-ray serve, {r['clients']} clients", r) for r in ours[w]]
        if original:
            rows.insert(0, (f"original {os.path.basename(original.rstrip('/'))}: engine in-process ({engine_original[w]['dtype']}), {top} streams",
                            engine_original[w]))
        for label, r in rows:
            timed_row(w, label, r)
        serve_top = ours[w][-1]["tokens_per_s"]
        suffix = "" if w == "uniform" else f"_{w}"
        figures["workloads"][w] = {
            "serve": {str(r["clients"]): rounded({k: v for k, v in r.items() if k != "clients"}) for r in ours[w]},
            "engine_in_process": rounded(e),
            "hf_sequential_tokens_per_s": {k: round(v, 2) for k, v in hf[w]["sequential"].items()},
            "hf_static_batch_tokens_per_s": {k: round(v, 2) for k, v in hf[w]["static_batch"].items()},
            "hf_best_static_batch": best_key,
        }
        figures[f"serve_{top}_over_hf_sequential{suffix}"] = round(serve_top / base_seq, 2)
        figures[f"serve_{top}_over_hf_best_static_batch{suffix}"] = round(serve_top / base_static, 2)
        figures[f"engine_{top}_over_hf_sequential{suffix}"] = round(e["tokens_per_s"] / base_seq, 2)
        figures[f"engine_{top}_over_hf_best_static_batch{suffix}"] = round(e["tokens_per_s"] / base_static, 2)
        figures[f"serve_{top}_over_engine_{top}{suffix}"] = round(serve_top / e["tokens_per_s"], 2)
        if original:
            figures["workloads"][w]["original_engine_in_process"] = rounded(engine_original[w])
            figures[f"engine_{top}_over_original{suffix}"] = round(e["tokens_per_s"] / engine_original[w]["tokens_per_s"], 2)
    if "shared_prefix" in kinds:
        w, on, off = "shared_prefix", engine["shared_prefix"], engine_off
        timed_row(w, f"engine in-process ({on['dtype']}), {top} streams, prefix cache on (hit {on['prefix_cache_hit_rate']:.0%})", on)
        timed_row(w, f"engine in-process ({off['dtype']}), {top} streams, prefix cache off", off)
        for r in ours[w]:
            timed_row(w, f"llm-ray serve, {r['clients']} clients, its prefix cache ({cfg.prefix_cache_tokens} tokens)", r)
        figures["workloads"][w] = {
            "prefix_tokens": prefix_len,
            "prompt_tokens_mean": round(_mean([len(r.prompt_ids) for r in reqs[w]]), 1),
            "serve_prefix_cache_tokens": cfg.prefix_cache_tokens,
            "serve": {str(r["clients"]): rounded({k: v for k, v in r.items() if k != "clients"}) for r in ours[w]},
            "engine_in_process_prefix_on": rounded(on),
            "engine_in_process_prefix_off": rounded(off),
        }
        figures["prefix_cache_hit_rate_shared_prefix"] = round(on["prefix_cache_hit_rate"], 4)
        figures["ttft_p50_prefix_off_over_on"] = round(off["p50_ttft_s"] / on["p50_ttft_s"], 2)
        figures["ttft_p99_prefix_off_over_on"] = round(off["p99_ttft_s"] / on["p99_ttft_s"], 2)
        figures[f"engine_{top}_tokens_per_s_prefix_on_over_off"] = round(on["tokens_per_s"] / off["tokens_per_s"], 2)
        figures[f"serve_{top}_over_engine_{top}_shared_prefix"] = round(ours[w][-1]["tokens_per_s"] / on["tokens_per_s"], 2)
    # Headline row figures of the top level (uniform), flat: the keys a dashboard reads.
    for name, r in ((f"serve_{top}", ours["uniform"][-1]), (f"engine_{top}", engine["uniform"])):
        for k in ("requests_per_s", "mean_tpot_s", "p50_tpot_s", "p99_tpot_s", "mean_itl_s", "p50_itl_s", "p99_itl_s"):
            figures[f"{name}_{k}"] = round(r[k], 4)
    figures["dtype_choice"] = dtype_note
    for w in kinds:  # whose CPU the top level used (the endpoint rows)
        figures[f"serve_{top}_cpu_cores{'' if w == 'uniform' else '_' + w}"] = ours[w][-1]["cpu_cores"]
    Console(width=220).print(table)
    for w in kinds:
        cores = ours[w][-1]["cpu_cores"]
        print(f"{w}, {top} clients, cores used: " + ", ".join(f"{k} {v}" for k, v in cores.items()), flush=True)
    print(dtype_note, flush=True)
    print(json.dumps(figures), flush=True)
    return figures
