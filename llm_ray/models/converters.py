"""Model changes applied before DeepSpeed sees the model, each with its own save-time transform.

Pattern: torchtitan's ``ModelConverter`` — ``convert(model)`` once the model is built, and a
transform when the trained model is written (``finalize``, run in reverse order). Loading
initial weights, freezing, LoRA, task heads and fake quantisation (QAT) are converters. A
``ModelSpec`` is the whole recipe of a model: its config and its converters, picklable, so
every Ray Train worker and every frozen copy builds the same module. Pure torch: no Ray,
DeepSpeed or file formats beyond safetensors.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from llm_ray.config import ModelConfig, from_dict


class ModelConverter:
    """Base class: both steps are the identity unless a converter overrides them."""

    def convert(self, model: nn.Module) -> nn.Module:
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        """The model as it should be written: e.g. adapters merged into plain weights."""
        return model


def backbone_of(model: nn.Module) -> nn.Module:
    """The language model under a task head (``SequenceClassifier.backbone``) or the model."""
    return getattr(model, "backbone", model)


def tied_aliases(model: nn.Module) -> set[str]:
    """Parameter names that alias another's tensor (a tied LM head): stored once, may be missing."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}


def load_weights_bytes(model: nn.Module, data: bytes, device: str = "cpu") -> None:
    """Load a safetensors file's bytes into ``model`` strictly; a tied weight, stored once, may
    be missing under its alias (as ``safetensors.torch.load_model`` allows)."""
    from safetensors.torch import load

    state = {k: v.to(device) for k, v in load(data).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = tied_aliases(model)
    if unexpected or set(missing) - tied:
        raise KeyError(f"weights do not match the model: missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")


@dataclass
class LoadWeights(ModelConverter):
    """Load a ``model.safetensors`` into the (backbone of the) built model, strictly."""

    path: str

    def convert(self, model: nn.Module) -> nn.Module:
        from safetensors.torch import load_model

        from llm_ray.encryption import MAGIC, read_maybe_encrypted

        with open(self.path, "rb") as f:
            sealed = f.read(len(MAGIC)) == MAGIC
        if sealed:  # an encrypted model folder's weights: decrypted in memory (the worker's key)
            load_weights_bytes(backbone_of(model), read_maybe_encrypted(self.path, os.path.basename(self.path)))
        else:
            load_model(backbone_of(model), self.path, strict=True)
        return model


@dataclass
class LayersFrom(LoadWeights):
    """Initialise a shallower model from a deeper one's weights: everything outside the blocks
    as it is, block i from the source's block ``layers[i]`` (DistilBERT: every other layer)."""

    layers: list[int] = field(default_factory=list)

    def convert(self, model: nn.Module) -> nn.Module:
        from safetensors.torch import load_file

        source = load_file(self.path)
        if len(self.layers) != len(model.layers):
            raise ValueError(f"LayersFrom: {len(self.layers)} source layers for a model of {len(model.layers)}")
        state = {}
        for name in model.state_dict():
            parts = name.split(".")
            if parts[0] == "layers":
                parts[1] = str(self.layers[int(parts[1])])
            key = ".".join(parts)
            if key in source:
                state[name] = source[key]
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = tied_aliases(model)
        if [m for m in missing if m not in tied] or unexpected:
            raise KeyError(f"LayersFrom {self.path}: missing {[m for m in missing if m not in tied][:5]}")
        return model


@dataclass
class ClassifierHead(ModelConverter):
    """Wrap the language model in a ``SequenceClassifier``; ``num_labels: 1`` gives a
    ``RewardModel`` (scalar head)."""

    num_labels: int
    pad_id: int
    pooling: str = "auto"

    def convert(self, model: nn.Module) -> nn.Module:
        from llm_ray.models.heads import RewardModel, SequenceClassifier

        if self.num_labels == 1:
            clf = RewardModel(model, self.pad_id, self.pooling)
        else:
            clf = SequenceClassifier(model, self.num_labels, self.pad_id, self.pooling)
        # The vocab projection (decoder) / MLM head (encoder) is unused by the classifier: no
        # gradient, so frozen; except a weight tied to the embedding table, trained via lookups.
        unused = model.head.proj if model.cfg.arch == "decoder" else model.head
        tied = {id(p) for p in model.embedding.parameters()}
        for p in unused.parameters():
            if id(p) not in tied:
                p.requires_grad_(False)
        return clf


@dataclass
class ValueHead(ModelConverter):
    """Wrap a decoder in a ``ValueModel`` (PPO's critic); ``head_path``: a reward folder's
    ``classifier.safetensors``, whose scalar head starts the value head (else a fresh one)."""

    head_path: str = ""

    def convert(self, model: nn.Module) -> nn.Module:
        from safetensors.torch import load_file

        from llm_ray.models.heads import ValueModel

        critic = ValueModel(model)
        if self.head_path:
            critic.value_head.load_state_dict(load_file(self.head_path), strict=True)
        tied = {id(p) for p in model.embedding.parameters()}
        for p in model.head.proj.parameters():  # the vocab projection is unused, as in ClassifierHead
            if id(p) not in tied:
                p.requires_grad_(False)
        return critic


@dataclass
class Freeze(ModelConverter):
    """Freeze the token/position tables (and a head tied to them) and the first ``layers`` blocks."""

    embeddings: bool = False
    layers: int = 0

    def convert(self, model: nn.Module) -> nn.Module:
        backbone = backbone_of(model)
        if self.embeddings:
            backbone.embedding.requires_grad_(False)
        for block in backbone.layers[: self.layers]:
            block.requires_grad_(False)
        return model


@dataclass
class LoRA(ModelConverter):
    """Low-rank adapters on the backbone's named linears; the rest of the backbone is frozen and
    a task head stays trainable. ``finalize`` merges the adapters into plain linears."""

    targets: list[str]
    r: int
    alpha: float
    dropout: float = 0.0

    def convert(self, model: nn.Module) -> nn.Module:
        from llm_ray.models.lora import apply_lora

        apply_lora(backbone_of(model), self.targets, self.r, self.alpha, self.dropout)
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        from llm_ray.models.lora import merge_lora

        return merge_lora(model)


class FakeQuantLinear(nn.Linear):
    """A linear whose forward sees its weight as stored quantized (``FakeQuant``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from llm_ray.models.quant import fake_quantize

        return nn.functional.linear(x, fake_quantize(self.weight, *self.fake_quant), self.bias)


class FakeQuantEmbedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from llm_ray.models.quant import fake_quantize

        return nn.functional.embedding(ids, fake_quantize(self.weight, *self.fake_quant), self.padding_idx)


@dataclass
class FakeQuant(ModelConverter):
    """Quantization-aware training: every matrix the folder will store quantized (``scheme``,
    ``group_size``: ``models.quant.quantizable``) is used fake-quantized in the forward, with a
    straight-through gradient, so training adapts the float weights to their rounding.

    The modules' classes are swapped in place (``FakeQuantLinear``), not wrapped: parameter
    names, a tied embedding and DeepSpeed's checkpoints stay as they are. ``finalize`` swaps
    them back; the model is then saved with ``quantization={"scheme": scheme, ...}``, which
    rounds exactly as the forward did."""

    scheme: str = "int4"
    group_size: int = 64

    def convert(self, model: nn.Module) -> nn.Module:
        from llm_ray.models.quant import quantizable

        for name, m in backbone_of(model).named_modules():
            swap = {nn.Linear: FakeQuantLinear, nn.Embedding: FakeQuantEmbedding}.get(type(m))
            if swap and quantizable(name, m.weight, self.scheme, self.group_size):
                m.__class__, m.fake_quant = swap, (self.scheme, self.group_size)
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        for m in model.modules():
            if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)):
                m.__class__ = nn.Linear if isinstance(m, FakeQuantLinear) else nn.Embedding
                del m.fake_quant
        return model


@dataclass
class ModelSpec:
    """How to build one model: config, seed and converters (plain data: crosses Ray cleanly)."""

    model: dict  # ModelConfig as a dict
    converters: list[ModelConverter] = field(default_factory=list)
    seed: int = 0

    @classmethod
    def of(cls, cfg: ModelConfig, converters: Optional[list[ModelConverter]] = None, seed: int = 0) -> "ModelSpec":
        return cls(dataclasses.asdict(cfg), list(converters or []), seed)

    @property
    def cfg(self) -> ModelConfig:
        return from_dict(ModelConfig, self.model)

    def build(self) -> nn.Module:
        """The converted module; the same seed and order give the same heads and adapters."""
        from llm_ray.models import build_model

        torch.manual_seed(self.seed)
        module = build_model(self.cfg)
        for converter in self.converters:
            module = converter.convert(module)
        return module

    def without_weights(self) -> "ModelSpec":
        """The same structure with no initial weights loaded (a checkpoint will fill it)."""
        return dataclasses.replace(self, converters=[c for c in self.converters if not isinstance(c, LoadWeights)])

    def finalize(self, module: nn.Module) -> nn.Module:
        for converter in reversed(self.converters):
            module = converter.finalize(module)
        return module

    def has(self, kind: type) -> bool:
        return any(isinstance(c, kind) for c in self.converters)


def param_counts(module: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return {"trainable_params": trainable, "frozen_params": frozen}
