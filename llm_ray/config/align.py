"""Recipe section ``align``: preference learning (``llm-ray reward``, ``llm-ray dpo``).

The model to tune, LoRA, freezing, the data files and the output folder come from the
``finetune`` section, as for ``llm-ray sft``; this section holds what preference learning adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llm_ray.config.loader import check as _check


@dataclass
class RewardConfig:
    """Bradley-Terry reward model: a scalar head on the pooled last real token."""

    center_coef: float = 0.0  # TRL's center_rewards_coefficient: coef * mean((r_c + r_r)^2)
    pooling: Literal["auto", "last", "mean", "cls"] = "auto"  # auto: last (decoder), cls (encoder)

    def __post_init__(self):
        _check(self.center_coef >= 0, "center_coef", "must be >= 0")


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the KL leash to the reference policy
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # DPO (Rafailov 2023) or IPO (Azar 2023)
    label_smoothing: float = 0.0  # > 0: conservative DPO (labels flipped with this probability)
    # auto: adapters_off with LoRA (the same weights, adapters switched off: no second copy),
    # else frozen_copy (the starting policy built once per worker, frozen)
    reference: Literal["auto", "frozen_copy", "adapters_off"] = "auto"
    precompute_reference: bool = False  # one pass of reference log-probs before training, reused

    def __post_init__(self):
        _check(self.beta > 0, "beta", "must be > 0")
        _check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        _check(self.loss == "sigmoid" or self.label_smoothing == 0, "label_smoothing",
               "applies to the sigmoid loss only (conservative DPO); use 0 with ipo")


@dataclass
class AlignConfig:
    # prompts longer than this keep their last tokens (counted); 0: half of data.seq_len
    max_prompt_tokens: int = 0
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def __post_init__(self):
        _check(self.max_prompt_tokens >= 0, "max_prompt_tokens", "must be >= 0 (0 = half of data.seq_len)")
