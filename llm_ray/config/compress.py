"""Spec of ``llm-ray compress``: one model, one compression method, the held-out text that
judges it. Loaded from YAML, overridable with ``--set key=value``; needs neither torch nor ray."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from llm_ray.config.loader import apply_overrides, from_dict, load_yaml
from llm_ray.config.loader import check as _check

# stored-weight methods: int8 (per row), int4 (per group of group_size), bf16 / fp16 (casts);
# structured: prune_ffn (a share of every layer's FFN channels removed: smaller matrices)
# unstructured (zeros in place, non-zeros fall, the dense file does not): magnitude (per
# matrix), magnitude_global, wanda (|W|·‖X‖ per output row); any of them N:M with n_m
QUANTIZE = ("int8", "int4", "bf16", "fp16")
UNSTRUCTURED = ("magnitude", "magnitude_global", "wanda")
METHODS = QUANTIZE + ("prune_ffn",) + UNSTRUCTURED


@dataclass
class CompressSpec:
    model: str = ""  # a model folder or a packaged name ("smollm2")
    method: Literal["int8", "int4", "bf16", "fp16", "prune_ffn", "magnitude", "magnitude_global", "wanda"] = "int8"
    group_size: int = 64  # int4: inputs per scale (a matrix whose width it does not divide stays float)
    sparsity: float = 0.5  # prune_ffn: share of each layer's FFN channels removed; unstructured: of weights
    n_m: list[int] = field(default_factory=list)  # unstructured: [2, 4] keeps 2 of every 4 inputs (sparsity ignored)
    calibration_text: str = ""  # prune_ffn, wanda: text whose activations score weights; "" = weights only
    calibration_tokens: int = 2048
    eval_text: str = ""  # held-out text file for perplexity before and after
    eval_tokens: int = 4096  # its first tokens scored
    window: int = 256  # perplexity window (stride = window / 2)
    speed_new_tokens: int = 16  # greedy tokens timed per decode for tokens/s
    speed_batches: list[int] = field(default_factory=lambda: [1, 16])  # decode batch sizes timed

    def __post_init__(self):
        _check(bool(self.model), "model", "needs a model folder or a packaged model name (e.g. smollm2)")
        _check(self.method in METHODS, "method", f"one of {list(METHODS)}, got {self.method!r}")
        _check(self.group_size >= 2 and self.group_size % 2 == 0, "group_size", "must be an even number >= 2")
        _check(0 < self.sparsity < 1, "sparsity", "must be in (0, 1)")
        if self.n_m:
            _check(len(self.n_m) == 2 and 0 < self.n_m[0] < self.n_m[1], "n_m", f"must be [N, M] with 0 < N < M, got {self.n_m}")
            _check(self.method in UNSTRUCTURED, "n_m", f"applies to {list(UNSTRUCTURED)}, not {self.method}")
        _check(self.method != "wanda" or bool(self.calibration_text), "calibration_text", "wanda needs calibration text")
        _check(self.calibration_tokens >= 2, "calibration_tokens", "must be >= 2")
        _check(bool(self.eval_text), "eval_text", "needs a held-out text file (perplexity before and after)")
        _check(self.eval_tokens >= 2, "eval_tokens", "must be >= 2")
        _check(self.window >= 2, "window", "must be >= 2")
        _check(self.speed_new_tokens >= 1, "speed_new_tokens", "must be >= 1")
        _check(bool(self.speed_batches) and all(b >= 1 for b in self.speed_batches), "speed_batches", "batch sizes must be >= 1")

    def resolve_paths(self, base: str | Path) -> "CompressSpec":
        """Text paths relative to the spec file's folder when it does not exist as given."""
        for key in ("eval_text", "calibration_text"):
            value = getattr(self, key)
            if value and not Path(value).exists() and (Path(base) / value).exists():
                setattr(self, key, str(Path(base) / value))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_compress_spec(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> CompressSpec:
    data = load_yaml(path) if path else {}
    spec = from_dict(CompressSpec, apply_overrides(data, list(overrides or [])))
    return spec.resolve_paths(Path(path).parent) if path else spec
