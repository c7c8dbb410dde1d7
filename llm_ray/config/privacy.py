"""Recipe section ``privacy``: differentially private training (DP-SGD) of the engine.
Needs neither torch nor ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from llm_ray.config.loader import check as _check


@dataclass
class DPConfig:
    """DP-SGD (Abadi et al. 2016): each example's gradient clipped to ``max_grad_norm``, Gaussian
    noise of std ``noise_multiplier * max_grad_norm`` added once per optimizer step to the sum,
    ε at ``delta`` from Opacus' accountant. Give ``noise_multiplier`` or ``target_epsilon`` (the
    noise that reaches it after ``train.max_steps``). Batches are shuffled fixed-size draws, not
    Poisson sampling: ε is computed at sample rate global_batch_size / examples, as Opacus does
    for shuffled loaders, which is the usual approximation."""

    enabled: bool = False
    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"

    def __post_init__(self):
        _check(self.noise_multiplier is None or self.noise_multiplier > 0, "noise_multiplier", "must be > 0")
        _check(self.target_epsilon is None or self.target_epsilon > 0, "target_epsilon", "must be > 0")
        _check(0 < self.delta < 1, "delta", "must be in (0, 1)")
        _check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        if self.enabled:
            _check((self.noise_multiplier is None) != (self.target_epsilon is None), "noise_multiplier",
                   "give exactly one of noise_multiplier and target_epsilon")


@dataclass
class PrivacyConfig:
    dp: DPConfig = field(default_factory=DPConfig)
