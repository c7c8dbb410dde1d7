"""``llm-ray bench compress TEXT``: every compression method on one model and one held-out
text, in one run: bytes, perplexity and greedy tokens/s at batch 1 and 16, each as a ratio to
the original measured in the same run (the named baseline: ``original``).

What limits each (printed under the table): stored int8/int4/bf16 weights are dequantized at
load, so they cut bytes on disk and in transfer but not memory or decode time (torchao's int8
kernels were slower than fp32 on these CPUs), except int8_dynamic, which runs int8 matmuls; unstructured zeros cut neither bytes nor time
without a sparse format or kernel; FFN channel and attention-head pruning shrink the matrices
and so the forward, at a perplexity cost that calibration keeps moderate.
"""

from __future__ import annotations

import json
import sys
import tempfile

DEFAULT_METHODS = ["int8", "int8_dynamic", "int4", "bf16", "prune_ffn", "prune_heads", "magnitude", "wanda"]
# a third of the query heads: one per GQA group of 2 to 4 (SmolLM2: 9 -> 6 heads)
METHOD_SETTINGS = {"prune_heads": ["sparsity=0.34", "head_unit=query"]}
LIMITS = {
    "int8": "dequantized at load: bytes fall, memory and speed do not",
    "int8_dynamic": "the int8 folder on int8 matmuls (torch._int_mm): speed follows the kernel; activations rounded too",
    "int4": "as int8; 4 bits per weight cost more perplexity",
    "bf16": "cast back to fp32 at load (this CPU's bf16 matmul is slow)",
    "fp16": "cast back to fp32 at load",
    "prune_ffn": "smaller matrices: bytes and time fall; no fine-tuning after",
    "prune_heads": "smaller q/o matrices; attention is a small share of the bytes; no fine-tuning after",
    "magnitude": "zeros in a dense file: neither bytes nor time fall",
    "magnitude_global": "zeros in a dense file: neither bytes nor time fall",
    "wanda": "zeros in a dense file: neither bytes nor time fall",
}


def bench_compress(text: str, model: str = "smollm2", methods: list[str] | None = None, overrides: list[str] | None = None,
                   calibration_text: str = "jobs/data/tiny_corpus.txt") -> dict:
    from rich.console import Console
    from rich.table import Table

    from llm_ray.compress.stage import compress_stage
    from llm_ray.config.compress import load_compress_spec

    methods = methods or DEFAULT_METHODS
    rows, baseline = {}, None
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        for method in methods:
            base = [f"model={model}", f"eval_text={text}", f"method={method}", "speed_batches=[1,16]"]
            if method in ("prune_ffn", "prune_heads", "wanda"):
                base.append(f"calibration_text={calibration_text}")
            base += METHOD_SETTINGS.get(method, [])
            spec = load_compress_spec(None, base + list(overrides or []))
            s = compress_stage(spec, f"{tmp}/{method}").summary
            baseline = baseline or s["before"]  # the original, measured in the first method's run
            rows[method] = s
    table = Table(title=f"bench compress: {model} on {text} ({baseline['tokens_scored']} tokens scored)")
    for col in ("method", "bytes", "size x", "perplexity", "ppl x", "tok/s b1", "x", "tok/s b16", "x"):
        table.add_column(col, justify="left" if col == "method" else "right")
    table.add_row("original", f"{baseline['bytes']:,}", "1", f"{baseline['perplexity']:.2f}", "1",
                  f"{baseline['tokens_per_s_b1']:.1f}", "1", f"{baseline['tokens_per_s_b16']:.1f}", "1")
    for method, s in rows.items():
        a = s["after"]
        table.add_row(method, f"{a['bytes']:,}", f"{s['size_ratio']:.2f}", f"{a['perplexity']:.2f}", f"{s['perplexity_ratio']:.3f}",
                      f"{a['tokens_per_s_b1']:.1f}", f"{s['tokens_per_s_b1_ratio']:.2f}", f"{a['tokens_per_s_b16']:.1f}",
                      f"{s['tokens_per_s_b16_ratio']:.2f}")
    console = Console(file=sys.stdout, width=120)
    console.print(table)
    console.print("Ratios pair each method with the original measured just before it (timings move +-15% here).")
    for method in rows:
        console.print(f"  {method}: {LIMITS.get(method, '')}")
    figures = {"model": model, "text": text, "baseline": "original", "original": baseline,
               **{m: {"bytes": s["after"]["bytes"], "perplexity": s["after"]["perplexity"],
                      "size_over_original": s["size_ratio"], "perplexity_over_original": s["perplexity_ratio"],
                      "tokens_per_s_b1_over_original": s["tokens_per_s_b1_ratio"],
                      "tokens_per_s_b16_over_original": s["tokens_per_s_b16_ratio"]} for m, s in rows.items()}}
    print(json.dumps(figures))
    return figures
