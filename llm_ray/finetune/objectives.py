"""Fine-tuning's objectives on the engine's seam (``llm_ray.train.objective``)."""

from __future__ import annotations

from llm_ray.models.losses import IGNORE_INDEX, classification_loss
from llm_ray.train.objective import CausalLM, Objective


class SFTChat(CausalLM):
    """Next-token loss on assistant tokens only: the prompt's labels are IGNORE_INDEX
    (``data/sft.py``), so this is causal LM's loss; it also reports how many tokens it learns."""

    name = "sft_chat"
    supports_pipeline = False

    def loss(self, engine, batch, frozen):
        loss, metrics = super().loss(engine, batch, frozen)
        return loss, {**metrics, "response_tokens": (batch["labels"] != IGNORE_INDEX).sum().float()}


class Classification(Objective):
    """Cross entropy of a ``SequenceClassifier``'s (B, C) logits against labels (B, 1)."""

    name = "classification"
    batch_fields = ("input_ids", "labels")

    def loss(self, engine, batch, frozen):
        logits = engine(batch["input_ids"])  # (B, C)
        target = batch["labels"][:, 0]
        accuracy = (logits.argmax(-1) == target).float().mean()
        return classification_loss(logits, target), {"accuracy": accuracy}
