"""Typed recipes. Importing this package must not import torch or ray."""

from llm_ray.config.prepare import CleanConfig, DedupConfig, PIIConfig, PrepareConfig
from llm_ray.config.finetune import FinetuneConfig, LoRAConfig
from llm_ray.config.align import AlignConfig, DPOConfig, RewardConfig
from llm_ray.config.loader import RecipeError, apply_overrides, from_dict, parse_override
from llm_ray.config.recipe import (
    DEFAULT_CORPUS,
    CheckpointConfig,
    DataConfig,
    MoEConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    Recipe,
    RunConfig,
    TokenizerConfig,
    TrainConfig,
    load_recipe,
)

__all__ = [
    "CleanConfig",
    "DedupConfig",
    "PIIConfig",
    "PrepareConfig",
    "AlignConfig",
    "DPOConfig",
    "RewardConfig",
    "FinetuneConfig",
    "LoRAConfig",
    "DEFAULT_CORPUS",
    "CheckpointConfig",
    "DataConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "Recipe",
    "RecipeError",
    "RunConfig",
    "TokenizerConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_recipe",
    "parse_override",
]
