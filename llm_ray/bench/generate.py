"""``llm-ray bench generate``: our generation (KV cache on and off) against ``transformers`` generate.

One run, one model (SmolLM2 by default, the same weights on both sides), one dtype, greedy,
``new_tokens`` tokens per prompt with eos ignored (so every configuration does the same work),
batch 1 and batch ``batch`` of left-padded prompts of different lengths. Each configuration is
timed ``repeats`` times, the runs of ours and transformers' interleaved so that load from other
processes hits both alike; the best run counts. tokens/s = generated tokens / wall seconds,
prefill included. Also reported: whether our greedy tokens equal transformers' and whether
cached and uncached generation agree. A benchmark, not a test: nothing here asserts a speed. The last line printed is JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Callable

import torch

TOPICS = ["the ocean", "a lighthouse", "bread baking", "the moon", "a bicycle trip", "winter", "a robot", "a library"]
FORMS = [
    "Write a short story about {}.",
    "Explain {} to a child in simple words, with one example from everyday life.",
    "List three facts about {}",
    "Describe {} in a poem of four lines, rhyming, in the style of an old sea shanty sung by sailors.",
]


def bench_prompts(n: int) -> list[str]:
    """``n`` distinct prompts of different lengths (about 8 to 30 tokens)."""
    return [FORMS[i % len(FORMS)].format(TOPICS[(i // len(FORMS) + i) % len(TOPICS)]) for i in range(n)]


def load_hf_model(model: str, dtype: torch.dtype, device: torch.device | None = None):
    """The same weights as a ``transformers`` model: the packaged GGUF, else our folder exported."""
    return _load_hf_model(model).to(device=device or torch.device("cpu"), dtype=dtype).eval()


def _load_hf_model(model: str):
    from transformers import AutoModelForCausalLM

    from llm_ray.bundle import resolve_model_path

    try:
        from llm_ray.bundle.packaged import PACKAGES, packaged_source

        if model in PACKAGES:
            src = packaged_source(model)
            kwargs = {"gguf_file": os.path.basename(src)} if src.endswith(".gguf") else {}
            folder = os.path.dirname(src) if kwargs else src
            return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except ImportError:
        pass
    from llm_ray.bundle import export_hf

    out = tempfile.mkdtemp(prefix="bench-generate-hf-")
    export_hf(resolve_model_path(model), out, verify=False)
    return AutoModelForCausalLM.from_pretrained(out)


def _best_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out



def bench_generate(model: str = "smollm2", new_tokens: int = 64, batch: int = 16, repeats: int = 3, dtype: str = "fp32") -> dict:
    from rich.console import Console
    from rich.table import Table

    from llm_ray.bundle import load_bundle
    from llm_ray.generation.api import encode_batch, pad_id_for
    from llm_ray.generation.config import SamplingParams
    from llm_ray.generation.sampling import decode
    from llm_ray.train.device import local_device

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    device = local_device()  # both sides on the GPU when there is one, as serving would
    bundle = load_bundle(model, device=device, dtype=torch_dtype if dtype != "fp32" else None)
    hf = load_hf_model(model, torch_dtype, device)
    pad = pad_id_for(bundle)
    params = SamplingParams(max_new_tokens=new_tokens)
    # eos off on both sides: every row generates exactly new_tokens, and the tokens can be compared.
    hf_kwargs = dict(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=pad)

    def ours(ids, mask, use_cache):
        return decode(bundle.model, ids, params, mask, eos_ids=(), use_cache=use_cache).tokens

    def theirs(ids, mask):
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, **hf_kwargs)
        return out[:, ids.shape[1] :].tolist()

    rows, figures = [], {}
    for b in (1, batch):
        ids, mask = (t.to(device) for t in encode_batch(bundle, bench_prompts(b)))
        ours(ids[:, -4:], mask[:, -4:], True)  # warm-up: first calls pay one-off allocation costs
        theirs(ids[:, -4:], mask[:, -4:])
        t_ours, t_hf = float("inf"), float("inf")
        for _ in range(repeats):  # interleaved: a busy moment slows both sides, not one
            s, ours_tokens = _best_seconds(lambda: ours(ids, mask, True), 1)
            t_ours = min(t_ours, s)
            s, hf_tokens = _best_seconds(lambda: theirs(ids, mask), 1)
            t_hf = min(t_hf, s)
        # Recomputing every step is quadratic: one timed run is enough to show what the cache buys.
        t_nocache, nocache_tokens = _best_seconds(lambda: ours(ids, mask, False), 1)
        n = b * new_tokens
        same = ours_tokens == hf_tokens
        agree = nocache_tokens == ours_tokens
        figures.update(
            {
                f"ours_cached_tokens_per_s_b{b}": round(n / t_ours, 2),
                f"ours_uncached_tokens_per_s_b{b}": round(n / t_nocache, 2),
                f"hf_tokens_per_s_b{b}": round(n / t_hf, 2),
                f"ours_over_hf_b{b}": round(t_hf / t_ours, 3),
                f"cache_speedup_b{b}": round(t_nocache / t_ours, 3),
                f"same_tokens_as_hf_b{b}": same,
                f"cached_equals_uncached_b{b}": agree,
            }
        )
        rows.append((b, n / t_ours, n / t_nocache, n / t_hf, t_hf / t_ours, same))
        print(f"batch {b}: ours {n / t_ours:.1f} tok/s, uncached {n / t_nocache:.1f}, transformers {n / t_hf:.1f}", file=sys.stderr)

    table = Table(title=f"bench generate: {os.path.basename(bundle.path)}, {dtype}, greedy, {new_tokens} new tokens/prompt (same run)")
    for col in ("batch", "ours cached tok/s", "ours uncached tok/s", "transformers tok/s", "ours / transformers", "same tokens"):
        table.add_column(col, justify="right")
    for b, c, u, h, r, same in rows:
        table.add_row(str(b), f"{c:.1f}", f"{u:.1f}", f"{h:.1f}", f"{r:.2f}x", str(same))
    Console().print(table)
    figures.update({"model": bundle.path, "dtype": dtype, "device": device.type, "new_tokens": new_tokens, "threads": torch.get_num_threads()})
    print(json.dumps(figures), flush=True)
    return figures
