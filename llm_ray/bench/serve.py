"""``llm-ray bench serve``: the OpenAI endpoint under 1, 8 and 32 concurrent clients, against
``transformers`` ``generate`` on the same model, in the same run, on the same machine.

Two workloads, the same requests on every side (greedy, distinct prompts, eos ignored so each
request generates exactly its own length; HF: ``min_new_tokens``):

- ``uniform``: every request asks for ``max_tokens``. The best case for a static batch: no row
  finishes early, so no padding is wasted.
- ``mixed``: request lengths drawn (seeded) uniformly from ``[max_tokens/8, 2*max_tokens -
  max_tokens/8]`` (mean ``max_tokens``), as in vLLM's ``benchmark_serving`` random dataset.
  A static batch runs until its longest request is done and only the requested tokens count;
  continuous batching refills a finished row at once.

Rows of the table:
(a) HF ``generate`` one request at a time (sequential) and in static batches of 8/16/32 taken in
    request order, fp32 and bf16 (``mixed``: see ``hf_baselines``); the best of each kind is
    the baseline;
(b) our ``ContinuousBatchingEngine`` in this process, no HTTP or Serve, the same requests as the
    largest client count: what the endpoint could reach on this machine without serving costs;
(c) the endpoint (``llm-ray serve``'s application on a local Ray cluster) over real HTTP: N client
    threads taking ``N * rounds`` streamed requests from one queue (at most N in flight);
    throughput (generated tokens, as reported by the usage chunk, over wall time), p50/p99
    latency and time to first token.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
import statistics
import time
import urllib.request
from dataclasses import dataclass
from typing import Optional

PROMPT_TOPICS = [
    "the ocean", "a lighthouse", "bread baking", "the moon", "a bicycle trip", "winter", "a robot", "a library",
    "volcanoes", "the first computer", "a garden", "honey bees", "a train station", "chess", "rain", "a violin",
]
WORKLOADS = ("uniform", "mixed")


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
    if workload == "uniform":
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


def _summary(results: list[dict], wall: float, clients: int) -> dict:
    lat, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
    return {
        "clients": clients,
        "requests": len(results),
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "p50_latency_s": statistics.median(lat),
        "p99_latency_s": _percentile(lat, 0.99),
        "p50_ttft_s": statistics.median(ttft),
        "p99_ttft_s": _percentile(ttft, 0.99),
    }


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


def hf_baselines(model: str, workloads: dict[str, list[BenchRequest]], pad_id: int, batch_sizes=(8, 16, 32), device=None) -> dict:
    """Per workload: ``{"sequential": {dtype: tok/s}, "static_batch": {"fp32_b32": tok/s, ...}}``.

    ``uniform``: one batch per size (every batch is alike), fp32 and bf16. ``mixed``: every
    request, at the dtype and batch size that were fastest on ``uniform`` (a smaller batch
    wastes less on unequal lengths, but is slower per step by more than it saves; running every
    size over every request would make this baseline take minutes).
    """
    import torch

    from llm_ray.bench.generate import load_hf_model

    hf = load_hf_model(model, torch.float32, device)
    out = {w: {"sequential": {}, "static_batch": {}} for w in workloads}
    uniform = workloads["uniform"]
    with torch.inference_mode():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
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


def engine_in_process(model: str, dtype_name: str, requests: list[BenchRequest], clients: int, max_batch_size: int, prefill_tokens_per_step: int, device=None) -> dict:
    """``requests`` straight into a ``ContinuousBatchingEngine``, at most ``clients`` at a time
    (no HTTP, no Serve)."""
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
    )

    async def one(r: BenchRequest) -> dict:
        t0, ttft, n = time.perf_counter(), None, 0
        seq = engine.submit(list(r.prompt_ids), SamplingParams(max_new_tokens=r.max_tokens), ignore_eos=True)
        async for _ in engine.tokens(seq):
            n += 1
            ttft = ttft if ttft is not None else time.perf_counter() - t0
        return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": n}

    async def main() -> dict:
        await one(requests[0])  # warm-up
        slots = asyncio.Semaphore(clients)  # at most ``clients`` in flight, as ``drive``

        async def limited(r: BenchRequest) -> dict:
            async with slots:
                return await one(r)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(r) for r in requests))
        return _summary(list(results), time.perf_counter() - t0, clients)

    try:
        return {**asyncio.run(main()), "dtype": str(dtype).removeprefix("torch.")}
    finally:
        engine.shutdown()


# -- (c) the endpoint -----------------------------------------------------------------------------
def _stream_one(url: str, r: BenchRequest, key: Optional[str]) -> dict:
    body = {
        "prompt": r.prompt,
        "max_tokens": r.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(), headers=headers)
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": ttft if ttft is not None else float("nan"), "tokens": tokens}


def drive(url: str, requests: list[BenchRequest], clients: int, key: Optional[str] = None) -> dict:
    """``requests`` over HTTP, at most ``clients`` in flight: each client thread takes the next
    request of one shared queue when its previous one is done (vLLM's ``--max-concurrency``)."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda r: _stream_one(url, r, key), requests))
    return _summary(results, time.perf_counter() - t0, clients)


def bench_serve(
    recipe: Optional[str],
    overrides: list[str],
    clients: str = "1,8,32",
    max_tokens: int = 64,
    rounds: int = 4,
    workloads: str = "uniform,mixed",
) -> dict:
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
    with socket.socket() as s:  # a free port: the bench must not collide with a running server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_serve_config(recipe, list(overrides) + [f"serve.port={port}", "serve.host=127.0.0.1"])
    n = levels[-1] * rounds  # the top level's requests; a level of c clients sends the first c*rounds
    prompts = bench_prompts(n)
    bundle = load_bundle(cfg.model)
    ids = [tuple(bundle.tokenizer.encode(p).ids) for p in prompts]
    pad_id = pad_id_for(bundle)
    del bundle
    reqs = {w: [BenchRequest(p, i, L) for p, i, L in zip(prompts, ids, request_lengths(w, n, max_tokens))] for w in kinds}

    # Baselines and the in-process engine on the device a replica would use (its GPU if any).
    device = local_device() if cfg.use_gpu is not False else None
    hf = hf_baselines(cfg.model, reqs, pad_id, batch_sizes=tuple(b for b in (8, 16, 32) if b <= n), device=device)
    engine = {w: engine_in_process(cfg.model, cfg.dtype, reqs[w], levels[-1], cfg.max_batch_size, cfg.prefill_tokens_per_step, device) for w in kinds}

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

    table = Table(title=f"bench serve: {cfg.served_name}, greedy, mean {max_tokens} tokens/request, same run")
    for col in ("workload", "what", "tokens/s", "p50 latency s", "p99 latency s", "p50 TTFT s", "p99 TTFT s"):
        table.add_column(col, justify="left" if col in ("workload", "what") else "right")
    figures: dict = {"model": cfg.served_name, "dtype": cfg.dtype, "device": str(device or "cpu"), "max_tokens": max_tokens, "rounds": rounds, "workloads": {}}
    top = levels[-1]
    for w in kinds:
        base_seq = max(hf[w]["sequential"].values())
        best_key = max(hf[w]["static_batch"], key=hf[w]["static_batch"].get)
        base_static = hf[w]["static_batch"][best_key]
        for k, v in hf[w]["sequential"].items():
            table.add_row(w, f"HF generate, sequential, {k}", f"{v:.1f}", "", "", "", "")
        for k, v in hf[w]["static_batch"].items():
            table.add_row(w, f"HF generate, static batch {k}", f"{v:.1f}", "", "", "", "")
        e = engine[w]
        rows = [(f"engine in-process ({e['dtype']}), {top} streams, no HTTP", e)] + [(f"llm-ray serve, {r['clients']} clients", r) for r in ours[w]]
        for label, r in rows:
            table.add_row(w, label, f"{r['tokens_per_s']:.1f}", f"{r['p50_latency_s']:.2f}", f"{r['p99_latency_s']:.2f}", f"{r['p50_ttft_s']:.3f}", f"{r['p99_ttft_s']:.3f}")
        serve_top = ours[w][-1]["tokens_per_s"]
        suffix = "" if w == "uniform" else f"_{w}"
        figures["workloads"][w] = {
            "serve": {str(r["clients"]): {k: round(v, 4) for k, v in r.items() if k != "clients"} for r in ours[w]},
            "engine_in_process": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()},
            "hf_sequential_tokens_per_s": {k: round(v, 2) for k, v in hf[w]["sequential"].items()},
            "hf_static_batch_tokens_per_s": {k: round(v, 2) for k, v in hf[w]["static_batch"].items()},
            "hf_best_static_batch": best_key,
        }
        figures[f"serve_{top}_over_hf_sequential{suffix}"] = round(serve_top / base_seq, 2)
        figures[f"serve_{top}_over_hf_best_static_batch{suffix}"] = round(serve_top / base_static, 2)
        figures[f"engine_{top}_over_hf_sequential{suffix}"] = round(e["tokens_per_s"] / base_seq, 2)
        figures[f"engine_{top}_over_hf_best_static_batch{suffix}"] = round(e["tokens_per_s"] / base_static, 2)
        figures[f"serve_{top}_over_engine_{top}{suffix}"] = round(serve_top / e["tokens_per_s"], 2)
    Console(width=160).print(table)
    print(json.dumps(figures), flush=True)
    return figures
