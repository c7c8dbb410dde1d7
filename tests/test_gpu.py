"""The same pretraining path on a GPU: nccl, DeepSpeed's CUDA accelerator, bf16 picked by auto.

Skipped where there is no CUDA device (see conftest); nothing here branches on hardware except
what ``llm_ray.train.device`` detects.
"""

from __future__ import annotations

import pytest

from llm_ray.config import load_recipe
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.gpu


def test_pretrain_on_gpu_uses_nccl_and_bf16(ray_cluster, tokenizer_paths, tmp_path):
    from llm_ray.train.launcher import pretrain

    recipe = load_recipe(
        "jobs/recipes/tiny-cpu.yaml",
        tiny_overrides(tmp_path, "gpu", tokenizer_paths["bpe"]) + ["parallel.zero_stage=2", "train.max_steps=20"],
    )
    summary = pretrain(recipe).summary
    assert summary["use_gpu"] is True
    assert summary["precision"] in ("bf16", "fp16")
    assert summary["final_loss"] < summary["initial_loss"] - 0.3
