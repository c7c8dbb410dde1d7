"""``llm-ray bench serve``: the OpenAI endpoint under 1, 8 and 32 concurrent clients, against
``transformers`` ``generate`` on the same model, in the same run, on the same machine.

(a) baselines in this process, before the endpoint starts: HF ``generate`` one prompt at a time
    (sequential) and static batches of 8/16/32 left-padded prompts, in fp32 and bf16; the best
    of each kind is the figure we compare with;
(b) the endpoint (``llm-ray serve``'s application on a local Ray cluster) driven over real HTTP
    by N client threads, each sending ``rounds`` streamed requests back to back: throughput
    (generated tokens / wall time), p50/p99 latency and time to first token.
Every request generates exactly ``max_tokens`` tokens (``ignore_eos``; HF: ``min_new_tokens``),
greedy, from distinct prompts, so both sides do the same work. Not a test: nothing is asserted.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import time
import urllib.request
from typing import Optional

PROMPT_TOPICS = [
    "the ocean", "a lighthouse", "bread baking", "the moon", "a bicycle trip", "winter", "a robot", "a library",
    "volcanoes", "the first computer", "a garden", "honey bees", "a train station", "chess", "rain", "a violin",
]


def bench_prompts(n: int) -> list[str]:
    """``n`` distinct short instructions (a few dozen tokens each)."""
    forms = ["Write a short story about {}.", "Explain {} to a child.", "List three facts about {}.", "Describe {} in a poem."]
    return [forms[(i // len(PROMPT_TOPICS)) % len(forms)].format(PROMPT_TOPICS[i % len(PROMPT_TOPICS)]) + f" (#{i})" for i in range(n)]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[k]


# -- (a) transformers generate --------------------------------------------------------------------
def _load_hf(model: str):
    """The same weights as a ``transformers`` model: the packaged GGUF, else our folder exported."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from llm_ray.models.bundle import resolve_model_path

    try:
        from llm_ray.interop.packaged import PACKAGES, packaged_source

        if model in PACKAGES:
            src = packaged_source(model)
            if src.endswith(".gguf"):
                return AutoModelForCausalLM.from_pretrained(os.path.dirname(src), gguf_file=os.path.basename(src))
            return AutoModelForCausalLM.from_pretrained(src)
    except ImportError:
        pass
    from llm_ray.interop.hf_export import export_hf

    out = tempfile.mkdtemp(prefix="bench-serve-hf-")
    export_hf(resolve_model_path(model), out, verify=False)
    return AutoModelForCausalLM.from_pretrained(out)


def hf_baselines(model: str, prompt_ids: list[list[int]], max_tokens: int, pad_id: int, batch_sizes=(8, 16, 32)) -> dict:
    import torch

    hf = _load_hf(model).eval()
    out: dict = {"sequential": {}, "static_batch": {}}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        hf = hf.to(dtype)
        gen = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id)
        with torch.inference_mode():
            hf.generate(torch.tensor([prompt_ids[0]]), **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            t0, tokens = time.perf_counter(), 0
            for ids in prompt_ids[:3]:
                res = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **gen)
                tokens += res.shape[1] - len(ids)
            out["sequential"][dtype_name] = tokens / (time.perf_counter() - t0)
            for b in batch_sizes:
                rows = prompt_ids[:b]
                width = max(len(r) for r in rows)
                ids = torch.full((b, width), pad_id, dtype=torch.long)
                mask = torch.zeros(b, width, dtype=torch.long)
                for i, r in enumerate(rows):  # left padding, as generation needs
                    ids[i, width - len(r) :] = torch.tensor(r)
                    mask[i, width - len(r) :] = 1
                t0 = time.perf_counter()
                res = hf.generate(ids, attention_mask=mask, **gen)
                out["static_batch"][f"{dtype_name}_b{b}"] = b * (res.shape[1] - width) / (time.perf_counter() - t0)
    del hf
    return out


# -- (b) the endpoint -----------------------------------------------------------------------------
def _stream_one(url: str, prompt: str, max_tokens: int, key: Optional[str]) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(), headers=headers)
    t0 = time.perf_counter()
    ttft = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": ttft if ttft is not None else float("nan"), "tokens": max_tokens}


def drive(url: str, prompts: list[str], clients: int, rounds: int, max_tokens: int, key: Optional[str] = None) -> dict:
    """``clients`` threads, each sending ``rounds`` requests back to back; figures over all."""

    def client(c: int) -> list[dict]:
        return [_stream_one(url, prompts[(c * rounds + r) % len(prompts)], max_tokens, key) for r in range(rounds)]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [x for xs in pool.map(client, range(clients)) for x in xs]
    wall = time.perf_counter() - t0
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


def bench_serve(recipe: Optional[str], overrides: list[str], clients: str = "1,8,32", max_tokens: int = 64, rounds: int = 2) -> dict:
    import ray
    from ray import serve
    from rich.console import Console
    from rich.table import Table

    from llm_ray.config.serve import load_serve_config
    from llm_ray.models.bundle import load_bundle
    from llm_ray.serve.cli import wait_ready

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    levels = [int(c) for c in clients.split(",") if c.strip()]
    import socket

    with socket.socket() as s:  # a free port: the bench must not collide with a running server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_serve_config(recipe, list(overrides) + [f"serve.port={port}", "serve.host=127.0.0.1"])
    prompts = bench_prompts(max(64, max(levels) * rounds))
    bundle = load_bundle(cfg.model)
    prompt_ids = [bundle.tokenizer.encode(p).ids for p in prompts]
    pad_id = bundle.pad_id if bundle.pad_id is not None else (bundle.eos_ids[0] if bundle.eos_ids else 0)
    del bundle

    hf = hf_baselines(cfg.model, prompt_ids, max_tokens, pad_id, batch_sizes=tuple(b for b in (8, 16, 32) if b <= len(prompt_ids)))

    from llm_ray.serve.app import run, url as app_url

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    try:
        run(cfg)
        base = app_url(cfg)
        wait_ready(base)
        key = (cfg.resolved_api_keys() or [None])[0]
        drive(base, prompts, 2, 1, 8, key)  # warm-up: first forward passes, kernel selection
        ours = [drive(base, prompts, c, rounds, max_tokens, key) for c in levels]
    finally:
        serve.shutdown()

    seq_best = max(hf["sequential"].values())
    static_best_key = max(hf["static_batch"], key=hf["static_batch"].get)
    static_best = hf["static_batch"][static_best_key]
    top = ours[-1]
    table = Table(title=f"bench serve: {cfg.served_name}, {max_tokens} tokens/request, greedy (same run)")
    for col in ("what", "tokens/s", "p50 latency s", "p99 latency s", "p50 TTFT s", "p99 TTFT s"):
        table.add_column(col, justify="right" if col != "what" else "left")
    for k, v in hf["sequential"].items():
        table.add_row(f"HF generate, sequential, {k}", f"{v:.1f}", "", "", "", "")
    for k, v in hf["static_batch"].items():
        table.add_row(f"HF generate, static batch {k}", f"{v:.1f}", "", "", "", "")
    for r in ours:
        table.add_row(
            f"llm-ray serve, {r['clients']} clients",
            f"{r['tokens_per_s']:.1f}",
            f"{r['p50_latency_s']:.2f}",
            f"{r['p99_latency_s']:.2f}",
            f"{r['p50_ttft_s']:.3f}",
            f"{r['p99_ttft_s']:.3f}",
        )
    Console(width=140).print(table)
    figures = {
        "model": cfg.served_name,
        "dtype": cfg.dtype,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "serve": {str(r["clients"]): {k: round(v, 4) for k, v in r.items() if k != "clients"} for r in ours},
        "hf_sequential_tokens_per_s": {k: round(v, 2) for k, v in hf["sequential"].items()},
        "hf_static_batch_tokens_per_s": {k: round(v, 2) for k, v in hf["static_batch"].items()},
        "hf_best_static_batch": static_best_key,
        f"serve_{top['clients']}_over_hf_sequential": round(top["tokens_per_s"] / seq_best, 2),
        f"serve_{top['clients']}_over_hf_best_static_batch": round(top["tokens_per_s"] / static_best, 2),
    }
    print(json.dumps(figures), flush=True)
    return figures
