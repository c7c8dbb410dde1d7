"""The objective seam: what a stage plugs into the one training engine.

An objective names the batch fields it reads, the frozen models a worker builds next to the
trained one (a reference policy, a teacher), and ``loss(engine, batch, frozen) -> (loss,
metrics)``. The worker loop (``loop.py``) owns everything else — DeepSpeed, accumulation,
checkpoints, exact resume, metrics — and never imports an objective: the stage's driver hands
one over in the trainer's config (pattern: torchtitan's ``TrainSpec``). Pretraining's two
objectives live here; fine-tuning's and preference learning's live with their stages.
Losses themselves are tensor functions in ``llm_ray.models.losses``.
"""

from __future__ import annotations

import abc
from typing import Mapping

import torch
from torch import nn

from llm_ray.models.converters import ModelSpec
from llm_ray.models.losses import sequence_cross_entropy, token_cross_entropy

Metrics = dict[str, torch.Tensor]


class Objective(abc.ABC):
    """Base class. Subclasses set ``name`` and ``batch_fields`` and implement ``loss``."""

    name = "objective"
    batch_fields: tuple[str, ...] = ()
    sequences_per_sample = 1  # model rows one sample becomes (a preference pair: 2)
    frozen_forwards = 0  # forward passes of a frozen model per trained row (MFU's FLOP count)
    supports_pipeline = False  # DeepSpeed's PipelineEngine computes the loss itself

    def frozen_models(self) -> dict[str, ModelSpec]:
        """Frozen modules each worker builds once, in eval mode, without DeepSpeed."""
        return {}

    def on_train_start(self, engine, step: int) -> None:
        """Called on every rank once the engine is built and restored at ``step`` (RL: send the
        policy to the rollout pool)."""

    def after_step(self, engine, step: int) -> None:
        """Called on every rank after optimizer step ``step``, before its checkpoint."""

    def check_batch(self, batch: Mapping) -> None:
        missing = [k for k in self.batch_fields if k not in batch]
        if missing:
            raise KeyError(f"objective {self.name} needs batch fields {missing}; the source gave {sorted(batch)}")

    @abc.abstractmethod
    def loss(self, engine, batch: dict[str, torch.Tensor], frozen: dict[str, nn.Module]) -> tuple[torch.Tensor, Metrics]:
        """(scalar loss to back-propagate, scalar metric tensors averaged and logged by the loop)."""

    # Pipeline stages: only objectives with ``supports_pipeline`` define ``pipeline_loss(outputs,
    # labels)`` and ``pipeline_inputs(batch) -> (inputs, labels)``; ``build_engine`` checks.


class CausalLM(Objective):
    """Next-token cross entropy; ``segment_ids`` (packed documents) when the source sends them.
    SFT chat is this loss on prompt-masked labels (``finetune/objectives.py``)."""

    name = "causal_lm"
    batch_fields = ("input_ids", "labels")
    supports_pipeline = True

    def loss(self, engine, batch, frozen):
        segments = batch.get("segment_ids")
        logits = engine(batch["input_ids"]) if segments is None else engine(batch["input_ids"], segment_ids=segments)
        return token_cross_entropy(logits, batch["labels"]), {}  # logits (B, T, V)

    def per_example_loss(self, model, batch) -> torch.Tensor:
        """(B,) each row's mean token cross entropy: what DP-SGD clips per example."""
        segments = batch.get("segment_ids")
        logits = model(batch["input_ids"]) if segments is None else model(batch["input_ids"], segment_ids=segments)
        return sequence_cross_entropy(logits, batch["labels"])

    def pipeline_loss(self, outputs, labels):
        return token_cross_entropy(outputs, labels)

    def pipeline_inputs(self, batch):
        return batch["input_ids"], batch["labels"]


class MaskedLM(CausalLM):
    """BERT's masked LM: the same token cross entropy on the masked positions' labels."""

    name = "masked_lm"
    supports_pipeline = False

    def loss(self, engine, batch, frozen):
        return token_cross_entropy(engine(batch["input_ids"]), batch["labels"]), {}


PRETRAINING = {"causal_lm": CausalLM, "masked_lm": MaskedLM}
