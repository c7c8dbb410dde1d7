"""Spec of ``llm-ray canary``: canary exposure (Carlini et al. 2019, "The Secret Sharer").

Random secrets in a PII-shaped template are planted into a copy of a training recipe's corpus,
the recipe is trained once per arm (plain, DP-SGD, PII-scrubbed corpus, both), and each
canary's exposure is measured under each trained model. Loaded from YAML, overridable with
``--set key=value``; needs neither torch nor ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from llm_ray.config.loader import apply_overrides, from_dict, load_yaml
from llm_ray.config.loader import check as _check

ARMS = ("plain", "dp", "scrubbed", "dp_scrubbed")
SECRET = "{secret}"


@dataclass
class CanaryConfig:
    """``per_repeat`` canaries for each count in ``repeats`` (a canary of count r is inserted r
    times), plus ``controls`` fresh secrets never inserted: the honest baseline. The secret is
    ``digits`` random decimal digits where ``{secret}`` stands, at the end of ``template``;
    the template must be one the PII scrubber catches (checked on every canary at start)."""

    template: str = "my phone number is 020 7946 {secret}"
    digits: int = 4
    per_repeat: int = 4
    repeats: list[int] = field(default_factory=lambda: [1, 4, 16])
    controls: int = 8
    seed: int = 0  # which secrets, and where they are inserted

    def __post_init__(self):
        _check(self.template.count(SECRET) == 1, "template", f"must hold {SECRET} exactly once")
        _check(self.template.endswith(SECRET), "template", f"must end with {SECRET}: the secret is scored given what precedes it")
        prefix = self.template[: -len(SECRET)]
        _check(bool(prefix.strip()) and "\n" not in prefix, "template", "needs a one-line prefix before the secret")
        _check(1 <= self.digits <= 12, "digits", "must be in 1..12")
        _check(self.per_repeat >= 1, "per_repeat", "must be >= 1")
        _check(bool(self.repeats) and all(r >= 1 for r in self.repeats), "repeats", "needs counts >= 1, e.g. [1, 4, 16]")
        _check(len(set(self.repeats)) == len(self.repeats), "repeats", "must not repeat a count")
        _check(self.controls >= 1, "controls", "must be >= 1 (the never-inserted baseline)")
        need = self.per_repeat * len(self.repeats) + self.controls
        _check(2 * need <= 10 ** self.digits, "digits", f"{10 ** self.digits} secrets are too few for {need} distinct canaries")

    @property
    def space(self) -> int:
        """|R|: how many secrets there are."""
        return 10 ** self.digits


@dataclass
class ExposureConfig:
    """Ranks are exact (every candidate scored) when |R| <= ``exact_max``; otherwise estimated
    from ``samples`` random candidates with a skew-normal fit (Carlini et al. 2019, sec. 4.3)."""

    exact_max: int = 100_000
    samples: int = 10_000
    batch_size: int = 1024  # candidates per forward

    def __post_init__(self):
        _check(self.exact_max >= 1, "exact_max", "must be >= 1")
        _check(self.samples >= 100, "samples", "must be >= 100 (the distribution fit needs them)")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass
class CanaryDP:
    """The DP arms' ``privacy.dp``: fixed noise (not a target ε, so every DP arm has the same σ)."""

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self):
        _check(self.noise_multiplier > 0, "noise_multiplier", "must be > 0")
        _check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        _check(0 < self.delta < 1, "delta", "must be in (0, 1)")


@dataclass
class CanarySpec:
    # the training recipe every arm runs (same model, steps, seed) and its --set overrides;
    # data.paths is the corpus the canaries are planted into
    train_recipe: str = ""
    train_set: list[str] = field(default_factory=list)
    arms: list[Literal["plain", "dp", "scrubbed", "dp_scrubbed"]] = field(default_factory=lambda: ["plain", "dp", "scrubbed"])
    max_documents: int = 0  # the corpus' first N documents only (0 = all)
    canaries: CanaryConfig = field(default_factory=CanaryConfig)
    exposure: ExposureConfig = field(default_factory=ExposureConfig)
    dp: CanaryDP = field(default_factory=CanaryDP)

    def __post_init__(self):
        _check(bool(self.train_recipe), "train_recipe", "needs a training recipe (model, data.paths, optim, train)")
        _check(bool(self.arms), "arms", f"needs at least one of {list(ARMS)}")
        _check(len(set(self.arms)) == len(self.arms), "arms", "must not repeat an arm")
        _check(self.max_documents >= 0, "max_documents", "must be >= 0 (0 = all)")

    def resolve_paths(self, base: str | Path) -> "CanarySpec":
        """``train_recipe`` relative to the spec file's folder when it does not exist as given."""
        if not Path(self.train_recipe).exists() and (Path(base) / self.train_recipe).exists():
            self.train_recipe = str(Path(base) / self.train_recipe)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_canary_spec(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> CanarySpec:
    """Load a YAML canary spec and apply ``--set key=value`` overrides (``canaries.repeats=[1,8]``)."""
    data = load_yaml(path) if path else {}
    spec = from_dict(CanarySpec, apply_overrides(data, list(overrides or [])))
    return spec.resolve_paths(Path(path).parent) if path else spec
