"""Smoke test of ``bench train``: it runs both sides and reports its figures.

A benchmark, not a test of speed: nothing here compares timings.
"""

from __future__ import annotations

import json

import pytest

from llm_ray.bench.train import bench_train
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

KEYS = {
    "bench", "params", "seq_len", "global_batch", "precision", "peak_tflops",
    "engine_tokens_per_s", "bare_tokens_per_s", "engine_mfu", "bare_mfu", "engine_over_bare",
    "engine_step_s", "bare_step_s",
}


def test_bench_train_reports_both_sides(ray_cluster, tokenizer_paths, tmp_path, capsys):
    # fp32 pinned: the loss comparison below is for fp32 math (the bench's own default is auto)
    overrides = tiny_overrides(tmp_path, "bench", tokenizer_paths["bpe"]) + ["model.vocab_size=0", "train.precision=fp32"]
    result = bench_train(None, overrides, steps=2)

    assert KEYS <= result.keys()
    assert result["bench"] == "train" and result["seq_len"] == 32 and result["global_batch"] == 8
    assert result["precision"] == result["precision_requested"] == "fp32" and result["precision_decided_by_tflops"] is None
    for key in ("engine_tokens_per_s", "bare_tokens_per_s", "engine_mfu", "bare_mfu", "engine_over_bare"):
        assert result[key] > 0, key
    # Not a speed check: same weights, data, schedule and fp32 math give the same loss, which is
    # what makes the two timings comparable.
    assert result["engine_final_loss"] == pytest.approx(result["bare_final_loss"], rel=1e-4)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == result


def test_bench_precision_is_measured_not_assumed():
    """The bench recipe says auto; auto picks by the matmul rates it measured (here, for real)
    and reports them. The rule itself on the rates of two CPUs of this machine kind."""
    from llm_ray.bench import train as bench
    from llm_ray.config import load_recipe
    from llm_ray.train.device import cpu_precision_for

    assert load_recipe(str(bench.DEFAULT_RECIPE)).train.precision == "auto"
    assert cpu_precision_for({"bf16": 0.51, "fp32": 0.15}) == "bf16"  # AMD EPYC with avx512_bf16
    assert cpu_precision_for({"bf16": 0.16, "fp32": 0.31}) == "fp32"  # Intel without AMX
    pick, rates = bench._resolve_precision("auto", 1)
    assert set(rates) == {"bf16", "fp32"} and all(r > 0 for r in rates.values())
    assert pick == cpu_precision_for(rates)
    assert bench._resolve_precision("fp32", 1) == ("fp32", None)
