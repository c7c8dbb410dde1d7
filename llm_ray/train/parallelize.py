"""Turn a model config plus a recipe into a DeepSpeed engine.

The models know nothing about parallelism; everything here is applied from outside, in a fixed
order (torchtitan's rule): activation checkpointing, then pipeline split, then ZeRO/precision
via ``deepspeed.initialize``. deepspeed is imported inside functions: importing it in a driver
without a GPU has broken before (ray-project/ray#50406).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm_ray.config import ModelConfig, Recipe
from llm_ray.models.converters import ModelSpec, backbone_of
from llm_ray.models.decoder import DecoderBlock, DecoderEmbedding, DecoderHead
from llm_ray.models.layers import make_norm
from llm_ray.train.ds_config import deepspeed_config


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each transformer block in backward instead of storing its activations.

    The block's ``forward`` is wrapped in place rather than the block in a wrapper module, so
    parameter names (and so checkpoints and exports) stay the same with and without it.
    """
    for block in backbone_of(model).layers:
        block.forward = functools.partial(_checkpointed_forward, block.forward)
    return model


def _checkpointed_forward(forward: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if torch.is_grad_enabled() and kwargs.get("kv_cache") is None:
        return checkpoint(forward, x, *args, use_reentrant=False, **kwargs)
    return forward(x, *args, **kwargs)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never biases or norm gains (GPT-2/nanoGPT practice)."""
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights are yielded once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class _FinalNorm(nn.Module):
    """The norm of ``DecoderHead`` alone, for a last stage whose projection is the tied embedding.

    Its attribute is named like DecoderHead's so checkpoints map to ``head.norm.*``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()

    def forward(self, x):
        return self.norm(x)


def _tied_logits(embedding: DecoderEmbedding, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, embedding.tok.weight)  # (B, T, d) -> (B, T, V)


def pipeline_layers(cfg: ModelConfig) -> list:
    """The decoder as the flat layer list ``deepspeed.pipe.PipelineModule`` partitions.

    Tied embeddings become one ``TiedLayerSpec`` used on the first stage (lookup) and the last
    (output projection); DeepSpeed all-reduces the tied weight's gradient between the two.
    """
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    layers: list = []
    if cfg.tie_embeddings:
        layers.append(TiedLayerSpec("embed", DecoderEmbedding, cfg, tied_weight_attr="tok.weight"))
    else:
        layers.append(LayerSpec(DecoderEmbedding, cfg))
    layers += [LayerSpec(DecoderBlock, cfg, i) for i in range(cfg.n_layers)]
    if cfg.tie_embeddings:
        layers.append(LayerSpec(_FinalNorm, cfg))
        layers.append(
            TiedLayerSpec("embed", DecoderEmbedding, cfg, forward_fn=_tied_logits, tied_weight_attr="tok.weight")
        )
    else:
        layers.append(LayerSpec(DecoderHead, cfg))
    return layers


def build_engine(recipe: Recipe, spec: ModelSpec, objective, on_gpu: bool, precision: str | None = None):
    """Build the model for this rank and wrap it in a DeepSpeed engine (pipeline or not).

    ``spec`` builds the model and applies its converters (loaded weights, a head, frozen
    parameters — left out of the optimizer by ``param_groups`` — LoRA) before DeepSpeed sees
    it; activation checkpointing wraps the blocks after. A pipeline splits the bare decoder
    (converters need the whole model) and takes its loss from the objective.
    """
    import deepspeed

    ds_config = deepspeed_config(recipe, on_gpu, precision)
    torch.manual_seed(recipe.train.seed)  # same initial weights on every rank and every run
    if recipe.parallel.pipeline_stages > 1:
        from deepspeed.pipe import PipelineModule

        if spec.converters or not objective.supports_pipeline:
            raise ValueError(f"parallel.pipeline_stages: {objective.name} with model converters runs without pipeline stages")
        module = PipelineModule(
            layers=pipeline_layers(spec.cfg),
            num_stages=recipe.parallel.pipeline_stages,
            loss_fn=objective.pipeline_loss,
            partition_method="type:DecoderBlock",
            activation_checkpoint_interval=int(recipe.train.activation_checkpointing),
        )
    else:
        module = spec.build()
        if recipe.train.activation_checkpointing:
            apply_activation_checkpointing(module)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, recipe.optim.weight_decay), config=ds_config
    )
    return engine
