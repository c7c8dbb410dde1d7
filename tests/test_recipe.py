"""Recipes: typed loading, overrides, validation naming the key, and the generated DeepSpeed JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llm_ray.config import Recipe, RecipeError, load_recipe
from llm_ray.train.ds_config import deepspeed_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "jobs" / "recipes").glob("*.yaml"))


def test_import_config_needs_no_torch_or_ray():
    code = "import sys, llm_ray.config; print(sorted(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def _loader(path: Path):
    """Each shipped YAML by its kind (file-name prefix): eval specs and serve configs are not
    training recipes but must validate just the same."""
    from llm_ray.config.canary import CanarySpec, load_canary_spec
    from llm_ray.config.compress import CompressSpec, load_compress_spec, load_sweep_spec
    from llm_ray.config.eval import EvalSpec, load_eval_spec
    from llm_ray.config.redteam import RedteamSpec, load_redteam_spec
    from llm_ray.config.serve import ServeConfig, load_serve_config

    if path.name.startswith("compress-sweep-"):
        return (lambda p: load_sweep_spec(p)[0]), CompressSpec  # every trial's spec is validated too
    if path.name.startswith("compress-"):
        return load_compress_spec, CompressSpec
    if path.name.startswith("eval-"):
        return load_eval_spec, EvalSpec
    if path.name.startswith("serve-"):
        return load_serve_config, ServeConfig
    if path.name.startswith("canary-"):
        return load_canary_spec, CanarySpec
    if path.name.startswith("redteam-"):
        return load_redteam_spec, RedteamSpec
    return load_recipe, Recipe


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_load(path):
    load, kind = _loader(path)
    assert isinstance(load(str(path)), kind)


def test_overrides_are_typed_and_nested():
    r = load_recipe(None, ["parallel.zero_stage=3", "parallel.num_workers=2", "optim.lr=3e-4", "model.n_kv_heads=2"])
    assert r.parallel.zero_stage == 3 and r.parallel.num_workers == 2
    assert r.optim.lr == pytest.approx(3e-4) and isinstance(r.optim.lr, float)
    assert r.model.kv_heads == 2 and r.model.n_heads == 4
    assert r.grad_accum_steps == 1  # 8 = 4 micro x 1 accumulation x 2 data-parallel
    again = load_recipe(None, [])
    assert again.replace("train.max_steps=7").train.max_steps == 7
    assert again.hash() != again.replace("train.max_steps=7").hash()


INVALID = {
    "unknown key": (["train.max_stepz=3"], "train.max_stepz"),
    "unknown section": (["trainer.max_steps=3"], "trainer"),
    "wrong type": (["parallel.zero_stage=two"], "parallel.zero_stage"),
    "wrong type bool": (["train.activation_checkpointing=maybe"], "train.activation_checkpointing"),
    "zero stage out of range": (["parallel.zero_stage=4"], "parallel.zero_stage"),
    "stages do not divide layers": (
        ["parallel.pipeline_stages=3", "parallel.num_workers=3", "model.n_layers=4", "train.global_batch_size=4"],
        "parallel.pipeline_stages",
    ),
    "zero 2 with pipeline": (["parallel.pipeline_stages=2", "parallel.num_workers=2", "parallel.zero_stage=2"], "parallel.zero_stage"),
    "zero 3 with pipeline": (["parallel.pipeline_stages=2", "parallel.num_workers=2", "parallel.zero_stage=3"], "parallel.zero_stage"),
    "global batch not divisible": (["train.global_batch_size=6", "train.micro_batch_size=4"], "train.global_batch_size"),
    "global batch != micro x accum x dp": (
        ["train.global_batch_size=8", "train.micro_batch_size=4", "train.gradient_accumulation_steps=2", "parallel.num_workers=2"],
        "train.global_batch_size",
    ),
    "offload params without zero 3": (["parallel.offload=params", "parallel.zero_stage=2"], "parallel.offload"),
    "precision choice": (["train.precision=fp8"], "train.precision"),
    "heads do not divide width": (["model.n_heads=3"], "model.n_heads"),
    "kv heads do not divide heads": (["model.n_kv_heads=3"], "model.n_kv_heads"),
    "moe top_k > experts": (["model.moe.num_experts=2", "model.moe.top_k=3"], "model.moe.top_k"),
    "objective vs arch": (["train.objective=masked_lm"], "train.objective"),
    "seq longer than model": (["data.seq_len=1024", "model.max_seq_len=512"], "data.seq_len"),
    "bpe vocab below alphabet": (["data.tokenizer.vocab_size=100"], "data.tokenizer.vocab_size"),
}


@pytest.mark.parametrize("overrides,key", INVALID.values(), ids=list(INVALID))
def test_invalid_recipes_name_the_key(overrides, key):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, overrides)
    assert err.value.key == key
    assert str(err.value).startswith(key + ":")


def test_invalid_yaml_file_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("parallel:\n  num_workers: 2\n  zero_stage: 2\n  pipeline_stages: 2\n")
    with pytest.raises(RecipeError, match=r"^parallel\.zero_stage: ZeRO stage 2 cannot be combined"):
        load_recipe(str(path))


def test_cli_rejects_invalid_recipe_before_ray(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "llm_ray.cli", "pretrain", str(RECIPES[0]), "--set", "parallel.zero_stage=5"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert out.returncode == 2
    assert "parallel.zero_stage" in out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout


def test_deepspeed_config_is_generated_from_the_recipe():
    r = load_recipe(None, ["parallel.num_workers=2", "parallel.zero_stage=3", "parallel.offload=params",
                           "train.global_batch_size=16", "train.micro_batch_size=2", "train.precision=bf16"])
    ds = deepspeed_config(r, on_gpu=False)
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4  # 16 / (2 x 2 workers)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["torch_adam"] is False  # offload: DeepSpeed's CPU Adam
    plain = deepspeed_config(load_recipe(None, ["train.precision=fp32"]), on_gpu=False)
    assert "offload_optimizer" not in plain["zero_optimization"]
    assert plain["optimizer"]["params"]["torch_adam"] is True
    assert not plain["bf16"]["enabled"]
    assert plain["scheduler"]["params"]["total_num_steps"] == 100


def test_sweep_grid_expands_lists_into_trials_but_not_list_valued_fields():
    """A list value is one trial per element; a list-valued field (n_m, train_set) is one value
    unless given a list of lists; unknown keys in the grid are refused by position."""
    from llm_ray.config.compress import SweepConfig

    grid = [{"method": "int4", "group_size": [32, 64]}, {"method": "wanda", "n_m": [2, 4]},
            {"method": "distill", "alpha": [0.0, 0.5], "train_set": ["train.max_steps=5"]},
            {"method": "qat", "train_set": [["train.max_steps=5"], ["train.max_steps=9"]]}]
    trials = SweepConfig(grid=grid).trials()
    assert trials == [{"method": "int4", "group_size": 32}, {"method": "int4", "group_size": 64},
                      {"method": "wanda", "n_m": [2, 4]},
                      {"method": "distill", "alpha": 0.0, "train_set": ["train.max_steps=5"]},
                      {"method": "distill", "alpha": 0.5, "train_set": ["train.max_steps=5"]},
                      {"method": "qat", "train_set": ["train.max_steps=5"]}, {"method": "qat", "train_set": ["train.max_steps=9"]}]
    with pytest.raises(RecipeError) as e:
        SweepConfig(grid=[{"method": "int8"}, {"bits": 3}])
    assert e.value.key == "grid.1"
