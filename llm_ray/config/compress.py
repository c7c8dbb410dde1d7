"""Spec of ``llm-ray compress``: one model, one compression method, the held-out text that
judges it. Loaded from YAML, overridable with ``--set key=value``; needs neither torch nor ray."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from llm_ray.config.loader import apply_overrides, from_dict, load_yaml
from llm_ray.config.loader import check as _check

# stored-weight methods: int8 (per row), int4 (per group of group_size), bf16 / fp16 (casts);
# int8_dynamic: the int8 folder run with int8 activations too (int8 matmuls at load);
# structured (smaller matrices): prune_ffn (a share of every layer's FFN channels removed),
# prune_heads (attention heads: query heads inside each GQA group, or whole groups)
# unstructured (zeros in place, non-zeros fall, the dense file does not): magnitude (per
# matrix), magnitude_global, wanda (|W|·‖X‖ per output row); any of them N:M with n_m
QUANTIZE = ("int8", "int8_dynamic", "int4", "bf16", "fp16")
UNSTRUCTURED = ("magnitude", "magnitude_global", "wanda")
# trained on the engine: distill (a shallower student), qat (fake-quantized fine-tune, stored quantized)
METHODS = QUANTIZE + ("prune_ffn", "prune_heads") + UNSTRUCTURED + ("distill", "qat")


@dataclass
class CompressSpec:
    model: str = ""  # a model folder or a packaged name ("smollm2")
    method: Literal["int8", "int8_dynamic", "int4", "bf16", "fp16", "prune_ffn", "prune_heads", "magnitude", "magnitude_global", "wanda", "distill", "qat"] = "int8"
    group_size: int = 64  # int4: inputs per scale (a matrix whose width it does not divide stays float)
    sparsity: float = 0.5  # prune_ffn: share of each layer's FFN channels removed; prune_heads: of heads; unstructured: of weights
    head_unit: Literal["query", "group"] = "query"  # prune_heads: query heads within each k/v group, or whole groups
    n_m: list[int] = field(default_factory=list)  # unstructured: [2, 4] keeps 2 of every 4 inputs (sparsity ignored)
    calibration_text: str = ""  # prune_ffn, prune_heads, wanda: text whose activations score weights; "" = weights only
    calibration_shards: str = ""  # instead: a prepared dataset (llm-ray data prepare; local or s3://), the model's tokenizer
    calibration_tokens: int = 2048
    s3_endpoint: str = ""  # for s3:// calibration shards on a non-AWS endpoint (MinIO, moto)
    qat_scheme: Literal["int8", "int4"] = "int4"  # qat: how the folder stores the weights (int4: group_size)
    # distill, qat: a training recipe (data.paths, optim, train, parallel, run) and its --set overrides
    train_recipe: str = ""
    train_set: list[str] = field(default_factory=list)
    student_layers: int = 0  # 0: half the teacher's
    student_width: int = 0  # distill: the student's d_model (0: the teacher's); narrower needs student_init: random
    student_init: Literal["teacher_layers", "random"] = "teacher_layers"  # teacher_layers: every other one
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft-target term; 0 = the student on the text alone
    hidden_cosine: float = 0.0  # distill: weight of DistilBERT's cosine term on the final hidden states
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
        _check(self.method != "wanda" or bool(self.calibration_text or self.calibration_shards), "calibration_text",
               "wanda needs calibration text (or calibration_shards)")
        _check(not (self.calibration_text and self.calibration_shards), "calibration_shards", "one of calibration_text and calibration_shards, not both")
        if self.method in ("distill", "qat"):
            _check(bool(self.train_recipe), "train_recipe", f"{self.method} needs a training recipe (data, optim, train, run)")
        _check(self.student_layers >= 0, "student_layers", "must be >= 0 (0 = half the teacher's)")
        _check(self.student_width >= 0, "student_width", "must be >= 0 (0 = the teacher's d_model)")
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(0 <= self.alpha <= 1, "alpha", "must be in [0, 1]")
        _check(self.hidden_cosine >= 0, "hidden_cosine", "must be >= 0")
        _check(self.calibration_tokens >= 2, "calibration_tokens", "must be >= 2")
        _check(bool(self.eval_text), "eval_text", "needs a held-out text file (perplexity before and after)")
        _check(self.eval_tokens >= 2, "eval_tokens", "must be >= 2")
        _check(self.window >= 2, "window", "must be >= 2")
        _check(self.speed_new_tokens >= 1, "speed_new_tokens", "must be >= 1")
        _check(bool(self.speed_batches) and all(b >= 1 for b in self.speed_batches), "speed_batches", "batch sizes must be >= 1")

    def resolve_paths(self, base: str | Path) -> "CompressSpec":
        """Text paths relative to the spec file's folder when it does not exist as given."""
        for key in ("eval_text", "calibration_text", "calibration_shards", "train_recipe"):
            value = getattr(self, key)
            if value and not Path(value).exists() and (Path(base) / value).exists():
                setattr(self, key, str(Path(base) / value))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SweepConfig:
    """``llm-ray compress sweep``: a Ray Tune grid over compress specs (section ``sweep``).

    ``grid`` is a list of override mappings, each a family of trials: a list value expands into
    one trial per element (``{method: int4, group_size: [32, 64]}`` is two trials), so methods
    with different hyperparameters share one experiment without meaningless combinations. A
    list-valued field (``n_m``, ``speed_batches``, ``train_set``) expands only from a list of
    lists."""

    name: str = "compress-sweep"
    storage_path: str = "runs"  # the experiment folder is storage_path/name (what Tune restores)
    grid: Any = field(default_factory=list)  # a list of override mappings (checked below)
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    objectives: list[str] = field(default_factory=lambda: ["perplexity", "bytes"])  # minimised: the Pareto axes

    def __post_init__(self):
        _check(bool(self.grid) and all(isinstance(g, dict) and g for g in self.grid), "grid",
               "needs a list of override mappings, e.g. [{method: int8}, {method: int4, group_size: [32, 64]}]")
        fields = {f.name for f in dataclasses.fields(CompressSpec)}
        for i, entry in enumerate(self.grid):
            unknown = sorted(set(entry) - fields)
            _check(not unknown, f"grid.{i}", f"unknown keys {unknown}")
        _check(self.max_concurrent_trials >= 1, "max_concurrent_trials", "must be >= 1")
        _check(self.cpus_per_trial > 0, "cpus_per_trial", "must be > 0")
        _check(len(self.objectives) == 2, "objectives", "two figures to minimise (the plot's axes)")

    def trials(self) -> list[dict]:
        """Every trial's overrides, in grid order (list values expanded, their product)."""
        import itertools

        out = []
        for entry in self.grid:
            keys = list(entry)
            values = [v if _expands(k, v) else [v] for k, v in entry.items()]
            out += [dict(zip(keys, combo)) for combo in itertools.product(*values)]
        return out


LIST_FIELDS = ("n_m", "speed_batches", "train_set")  # list-valued: a list of lists is one trial per list


def _expands(key: str, value: Any) -> bool:
    if key in LIST_FIELDS:
        return isinstance(value, list) and bool(value) and all(isinstance(v, list) for v in value)
    return isinstance(value, list)


def load_compress_spec(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> CompressSpec:
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    data.pop("sweep", None)  # a sweep file is a compress spec plus its sweep section
    spec = from_dict(CompressSpec, data)
    return spec.resolve_paths(Path(path).parent) if path else spec


def load_sweep_spec(path: str, overrides: Optional[list[str]] = None) -> tuple[CompressSpec, SweepConfig]:
    """(the base compress spec, the sweep) of a sweep file; ``--set sweep.key=...`` reaches the sweep."""
    data = apply_overrides(load_yaml(path), list(overrides or []))
    sweep = from_dict(SweepConfig, data.pop("sweep", None) or {}, "sweep")
    spec = from_dict(CompressSpec, data).resolve_paths(Path(path).parent)
    for trial in sweep.trials():  # every trial's spec is valid before Tune starts
        from_dict(CompressSpec, {**spec.to_dict(), **trial}, "sweep.grid")
    return spec, sweep
