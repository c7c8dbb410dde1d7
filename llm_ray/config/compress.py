"""Spec of ``llm-ray compress``: one model, one compression method, the held-out text that
judges it. Loaded from YAML, overridable with ``--set key=value``; needs neither torch nor ray."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from llm_ray.config.loader import apply_overrides, from_dict, load_yaml
from llm_ray.config.loader import check as _check

# stored-weight methods: int8 (per row), int4 (per group of group_size), bf16 / fp16 (casts)
METHODS = ("int8", "int4", "bf16", "fp16")


@dataclass
class CompressSpec:
    model: str = ""  # a model folder or a packaged name ("smollm2")
    method: Literal["int8", "int4", "bf16", "fp16"] = "int8"
    group_size: int = 64  # int4: inputs per scale (a matrix whose width it does not divide stays float)
    eval_text: str = ""  # held-out text file for perplexity before and after
    eval_tokens: int = 4096  # its first tokens scored
    window: int = 256  # perplexity window (stride = window / 2)
    speed_new_tokens: int = 16  # greedy tokens timed per decode for tokens/s
    speed_batches: list[int] = field(default_factory=lambda: [1, 16])  # decode batch sizes timed

    def __post_init__(self):
        _check(bool(self.model), "model", "needs a model folder or a packaged model name (e.g. smollm2)")
        _check(self.method in METHODS, "method", f"one of {list(METHODS)}, got {self.method!r}")
        _check(self.group_size >= 2 and self.group_size % 2 == 0, "group_size", "must be an even number >= 2")
        _check(bool(self.eval_text), "eval_text", "needs a held-out text file (perplexity before and after)")
        _check(self.eval_tokens >= 2, "eval_tokens", "must be >= 2")
        _check(self.window >= 2, "window", "must be >= 2")
        _check(self.speed_new_tokens >= 1, "speed_new_tokens", "must be >= 1")
        _check(bool(self.speed_batches) and all(b >= 1 for b in self.speed_batches), "speed_batches", "batch sizes must be >= 1")

    def resolve_paths(self, base: str | Path) -> "CompressSpec":
        """``eval_text`` relative to the spec file's folder when it does not exist as given."""
        if self.eval_text and not Path(self.eval_text).exists() and (Path(base) / self.eval_text).exists():
            self.eval_text = str(Path(base) / self.eval_text)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_compress_spec(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> CompressSpec:
    data = load_yaml(path) if path else {}
    spec = from_dict(CompressSpec, apply_overrides(data, list(overrides or [])))
    return spec.resolve_paths(Path(path).parent) if path else spec
