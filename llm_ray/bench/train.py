"""``llm-ray bench train``: the engine's training throughput against a bare PyTorch loop.

One run, one machine, one model, batch, sequence length and precision:

(a) the engine: a real ``pretrain(recipe)`` (Ray Train, 1 worker, DeepSpeed ZeRO-0, no pipeline)
    whose worker gets every core of this machine; tokens/s is its own figure (mean over steps
    2.., step 1 pays one-off costs);
(b) ``bench.bare``: the same model trained by a plain loop in this process with as many threads.

Both MFUs divide by one peak: a matmul in the run's precision measured here with the worker's
thread count. The worker is handed that figure (``train.peak_tflops``) instead of measuring its
own, so a worker that gets fewer threads than it should shows up as a low MFU, not as a low peak.
A benchmark, not a test: nothing here asserts a speed. The last line printed is one JSON object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from llm_ray.config import load_recipe

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "jobs" / "recipes" / "bench-train.yaml"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@contextlib.contextmanager
def _threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _resolve_precision(requested: str, threads: int) -> tuple[str, dict[str, float] | None]:
    """``auto`` decided once, here, so that both sides train in the same precision.

    Returns the precision and, for ``auto``, the matmul TFLOP/s per precision that decided it
    (measured with the worker's thread count; None when the recipe names the precision).
    """
    from llm_ray.train.device import compare_cpu_precisions

    rates = None
    if requested == "auto":
        with _threads(threads):
            requested, rates = compare_cpu_precisions(torch.device("cpu"))
    if requested not in DTYPES:
        raise ValueError(f"train.precision: the bench runs fp32 or bf16 on CPU, not {requested}")
    return requested, rates


def _matmul_peaks(precision: str, threads: int) -> dict[str, float]:
    """TFLOP/s of a 2048^3 matmul per precision with the worker's thread count.

    The run's precision is the best of three 1-second tries: a peak should not be lowered by a
    moment when another process had a core. The other precision is measured once, for the record.
    """
    from llm_ray.train.device import measure_matmul_tflops

    cpu = torch.device("cpu")
    with _threads(threads):
        return {
            name: max(measure_matmul_tflops(cpu, dtype) for _ in range(3 if name == precision else 1))
            for name, dtype in DTYPES.items()
        }


def _engine_overrides(cores: int, steps: int, storage: str, precision: str, peak: float) -> list[str]:
    """What the bench fixes whatever the recipe says: these make the comparison like for like."""
    return [
        f"train.precision={precision}",
        "parallel.num_workers=1",
        "parallel.zero_stage=0",
        "parallel.pipeline_stages=1",
        "parallel.offload=none",
        "parallel.use_gpu=false",  # the bare loop runs on this machine's CPU
        f"parallel.cpus_per_worker={cores}",
        f"train.max_steps={steps + 1}",  # step 1 is the warm-up the loop leaves out of its mean
        f"train.peak_tflops={peak}",
        f"checkpoint.every_steps={steps + 1}",  # one checkpoint, after the last (untimed) step
        "checkpoint.resume=false",
        f"run.storage_path={storage}",  # fresh: nothing to resume
        "run.name=bench-train",
        "run.max_failures=0",
        "run.stop_at_step=null",
        "run.fail_at_step=null",
    ]


def _cluster_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 0)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"bench train: {result['params'] / 1e6:.1f}M params, seq {result['seq_len']}, "
        f"batch {result['global_batch']}, {result['precision']}, {result['threads']} threads, "
        f"peak {result['peak_tflops']:.3f} TFLOP/s"
    )
    if result["precision_decided_by_tflops"]:
        rates = ", ".join(f"{k} {v:.3f}" for k, v in result["precision_decided_by_tflops"].items())
        table.caption = f"precision auto -> {result['precision']} (matmul TFLOP/s: {rates})"
    for col in ("", "tokens/s", "MFU", "step s (mean)", "step s (median)", "final loss"):
        table.add_column(col, justify="right")
    for name in ("engine", "bare"):
        table.add_row(
            name,
            f"{result[f'{name}_tokens_per_s']:.1f}",
            f"{result[f'{name}_mfu']:.1%}",
            f"{result[f'{name}_step_s']:.3f}",
            f"{result[f'{name}_step_s_median']:.3f}",
            f"{result[f'{name}_final_loss']:.5f}",
        )
    table.add_row(
        "engine / bare", f"{result['engine_over_bare']:.3f}", "", "", f"{result['engine_over_bare_median']:.3f}", ""
    )
    Console(file=sys.stdout, width=120).print(table)  # a fixed width: logs are not terminals


def bench_train(recipe_path: str | None, overrides: list[str], steps: int = 12) -> dict:
    """Run (a) and (b), print a table and a final JSON line, and return the JSON's figures."""
    from llm_ray.bench.bare import bare_train
    from llm_ray.models import build_model, count_params, flops_per_token
    from llm_ray.storage import resolve_storage
    from llm_ray.train.launcher import ensure_ray, prepare_source, pretrain
    from llm_ray.train.metrics import read_metrics

    if steps < 1:
        raise ValueError("steps must be >= 1")
    recipe = load_recipe(recipe_path or str(DEFAULT_RECIPE), overrides)
    cores = len(os.sched_getaffinity(0))
    recipe_precision = recipe.train.precision
    precision, decided_by = _resolve_precision(recipe_precision, cores)
    ensure_ray()  # before the peak: every figure is taken with Ray's daemons running
    if _cluster_cpus() < cores:
        raise RuntimeError(f"the Ray cluster has {_cluster_cpus():g} CPUs; the bench's worker needs {cores}")
    load_before = os.getloadavg()[0]
    peaks = _matmul_peaks(precision, cores)
    peak = peaks[precision]

    storage = tempfile.mkdtemp(prefix="llm-ray-bench-")
    try:
        recipe = recipe.replace(*_engine_overrides(cores, steps, storage, precision, peak))
        engine = pretrain(recipe).summary
        run = resolve_storage(storage).child(recipe.run.name)
        engine_steps = [row["step_s"] for step, row in read_metrics(run).items() if step > 1]
        tokenizer, source = prepare_source(recipe, run)  # the run's tokenizer, the engine's blocks
        model_cfg = dataclasses.replace(recipe.model, vocab_size=recipe.model.vocab_size or tokenizer.get_vocab_size())
        bare = bare_train(recipe, model_cfg, source, steps, cores)
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    with torch.device("meta"):
        params = count_params(build_model(model_cfg))
    seq_len, global_batch = recipe.data.seq_len, recipe.train.global_batch_size
    flops = flops_per_token(model_cfg, seq_len)
    tokens_per_step = global_batch * seq_len
    result = {
        "bench": "train",
        "params": params,
        "seq_len": seq_len,
        "global_batch": global_batch,
        "micro_batch": recipe.train.micro_batch_size,
        "grad_accum": recipe.grad_accum_steps,
        "precision": precision,
        "precision_requested": recipe_precision,
        "precision_decided_by_tflops": decided_by,  # auto: the matmul TFLOP/s it compared
        "threads": cores,
        "timed_steps": steps,
        "flops_per_token": flops,
        "peak_tflops": peak,
        "matmul_tflops_fp32": peaks["fp32"],
        "matmul_tflops_bf16": peaks["bf16"],
        "engine_tokens_per_s": engine["tokens_per_s"],
        "bare_tokens_per_s": bare["tokens_per_s"],
        "engine_mfu": engine["tokens_per_s"] * flops / (peak * 1e12),
        "bare_mfu": bare["tokens_per_s"] * flops / (peak * 1e12),
        "engine_step_s": tokens_per_step / engine["tokens_per_s"],
        "bare_step_s": bare["step_s"],
        # Medians resist the other tenants of a shared machine better than the means above.
        "engine_step_s_median": float(np.median(engine_steps)),
        "bare_step_s_median": bare["step_s_median"],
        # Equal losses (fp32: to ~1e-6) show that both sides did the same training.
        "engine_final_loss": engine["final_loss"],
        "bare_final_loss": bare["final_loss"],
        "engine_over_bare": engine["tokens_per_s"] / bare["tokens_per_s"],
        "engine_over_bare_median": bare["step_s_median"] / float(np.median(engine_steps)),
        # 1-minute load average before and after: the bench itself adds about `threads`; more
        # than that means other processes shared the cores and the figures are not ours alone.
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print_table(result)
    print(json.dumps(result), flush=True)
    return result
