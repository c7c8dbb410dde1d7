"""``llm-ray compress`` (no Ray): a quantized model folder from the command line, its summary's
figures before and after, and bad specs refused by key before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llm_ray.config import RecipeError
from tests.conftest import REPO

HELDOUT = str(REPO / "jobs/data/eval/heldout.txt")


def test_compress_command_writes_a_quantized_folder_with_before_and_after(tiny_model_dir, tmp_path):
    out = tmp_path / "int8"
    proc = subprocess.run([sys.executable, "-m", "llm_ray.cli", "compress", str(REPO / "jobs/recipes/compress-smollm2.yaml"),
                           "--set", f"model={tiny_model_dir}", "--set", f"eval_text={HELDOUT}", "--set", "eval_tokens=512",
                           "--set", "window=32", "--set", "speed_batches=[1,4]", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    s = json.loads((out / "summary.json").read_text())
    before, after = s["before"], s["after"]
    assert s["method"] == "int8" and s["tensors_compressed"] > 0
    assert after["bytes"] == os.path.getsize(out / "model.safetensors") and s["size_ratio"] >= 3.5
    assert after["params"] == before["params"] and after["tokens_scored"] == before["tokens_scored"] > 400
    assert s["perplexity_ratio"] == pytest.approx(after["perplexity"] / before["perplexity"], rel=1e-3)
    assert abs(s["perplexity_ratio"] - 1) < 0.02  # int8 per row barely moves the tiny model
    assert {"tokens_per_s_b1", "tokens_per_s_b4"} <= set(after) and s["tokens_per_s_b4_ratio"] > 0


@pytest.mark.parametrize("override,key", [("method=int3", "method"), ("group_size=7", "group_size"),
                                          ("eval_text=/no/such.txt", "eval_text"), ("model=/no/such/model", "model")])
def test_bad_compress_specs_name_the_key(tiny_model_dir, tmp_path, override, key):
    from llm_ray.compress.stage import compress_stage
    from llm_ray.config.compress import load_compress_spec

    with pytest.raises(RecipeError) as e:
        spec = load_compress_spec(str(REPO / "jobs/recipes/compress-smollm2.yaml"), [f"model={tiny_model_dir}", override])
        compress_stage(spec, str(tmp_path / "out"))
    assert e.value.key == key, str(e.value)
    assert not (tmp_path / "out").exists()
