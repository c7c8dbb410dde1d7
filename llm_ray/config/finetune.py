"""Recipe section ``finetune``: supervised fine-tuning (``llm-ray sft``) of an existing model.

The model's shape comes from the ``init_from`` folder, not from the recipe's ``model`` section;
``data.seq_len`` is the length examples are padded or truncated to. Checks that need the
model's shape (``freeze_layers`` against its depth, LoRA targets) run in ``check_against_model``
once the folder's config is read, still before any Ray work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from llm_ray.config.loader import check as _check


@dataclass
class LoRAConfig:
    """Low-rank adapters on the named linear layers; ``r: 0`` trains the weights themselves."""

    r: int = 0
    alpha: float = 16.0  # update scale = alpha / r
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        _check(self.r >= 0, "r", "must be >= 0 (0 = no LoRA)")
        _check(self.alpha > 0, "alpha", "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        if self.r:
            _check(bool(self.targets) and all(self.targets), "targets", "needs at least one linear layer name, e.g. q_proj")

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass
class FinetuneConfig:
    # a model folder (llm-ray export / import / sft output) or a packaged name (smollm2, minilm)
    init_from: str = ""
    task: Literal["chat", "classification"] = "chat"
    # JSONL. chat: {"messages": [{"role", "content"}...]}, {"instruction", "input"?, "output"}
    # or {"prompt", "response"}; classification: {"text", "label"}
    train_path: str = ""
    eval_path: str = ""  # empty: hold out eval_fraction of train_path (seeded split)
    eval_fraction: float = 0.1
    freeze_embeddings: bool = False  # token/position tables (and a head tied to them)
    freeze_layers: int = 0  # the first N transformer blocks
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    labels: list[str] = field(default_factory=list)  # classification: class names, index = class id
    pooling: Literal["auto", "last", "cls", "mean"] = "auto"  # classification; auto: last (decoder), cls (encoder)
    text_field: str = "text"  # classification
    label_field: str = "label"  # classification
    system_prompt: Optional[str] = None  # chat: prepended as a system turn when a record has none
    output: str = ""  # model folder to write; empty: <run dir>/model (local run folders only)

    def __post_init__(self):
        _check(0.0 < self.eval_fraction < 1.0, "eval_fraction", "must be in (0, 1)")
        _check(self.freeze_layers >= 0, "freeze_layers", "must be >= 0")
        if self.task == "classification":
            _check(len(self.labels) >= 2, "labels", "classification needs at least 2 label names")
            _check(len(set(self.labels)) == len(self.labels), "labels", "label names must be unique")
        else:
            _check(not self.labels, "labels", "only used with task: classification")

    def require_run(self) -> None:
        """What ``llm-ray sft`` needs (a pretraining recipe leaves this section empty)."""
        _check(bool(self.init_from), "finetune.init_from", "needs a model folder or a packaged model name (smollm2)")
        _check(bool(self.train_path), "finetune.train_path", "needs a JSONL file of training records")

    def check_against_model(self, model, check_task: bool = True) -> None:
        """Checks that need the ``ModelConfig`` read from ``init_from``; ``check_task`` false for
        stages that ignore ``task`` (reward, dpo)."""
        _check(
            self.freeze_layers <= model.n_layers,
            "finetune.freeze_layers",
            f"{self.freeze_layers} exceeds the model's n_layers ({model.n_layers})",
        )
        if self.lora.enabled:
            _check(
                not (self.freeze_embeddings or self.freeze_layers),
                "finetune.lora",
                "LoRA already freezes every base weight; drop freeze_embeddings / freeze_layers",
            )
        if check_task and self.task == "chat":
            _check(model.arch == "decoder", "finetune.task", f"chat needs a decoder, {self.init_from} is an {model.arch}")
