"""Eval spec for ``llm-ray eval``: one model, named tasks, each with its data, prompt and metrics.

Tasks are a mapping keyed by name so that ``--set tasks.heldout.window=128`` reaches one task
the way ``--set parallel.zero_stage=3`` reaches a recipe key. Importing this module needs
neither torch nor ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from llm_ray.config.loader import RecipeError, apply_overrides, from_dict, load_yaml
from llm_ray.config.loader import check as _check

GENERATION_METRICS = ("bleu", "rouge", "meteor", "bertscore")
CLASSIFICATION_METRICS = ("accuracy", "f1")


@dataclass
class PromptConfig:
    """How an example becomes a prompt (``{field}`` placeholders name the record's fields).

    zero_shot: ``instruction + template``; few_shot: ``k`` demonstrations (``template`` followed
    by ``target_template``) before it; cot: zero-shot chain of thought in two stages (Kojima et
    al. 2022): ``template + cot_trigger`` -> generated reasoning, then ``answer_trigger`` and the
    answer (generated, or chosen by log-likelihood for classification).
    """

    style: Literal["zero_shot", "few_shot", "cot"] = "zero_shot"
    instruction: str = ""  # text before the demonstrations and the question
    template: str = "{input}"
    target_template: str = " {target}"  # a demonstration's answer, appended to its template
    separator: str = "\n\n"  # between instruction, demonstrations and the question
    k: int = 0  # demonstrations for few_shot
    shots: str = ""  # JSONL of demonstrations; "" = drawn from the task's other examples
    seed: int = 0  # which demonstrations are drawn
    cot_trigger: str = "\nLet's think step by step."
    answer_trigger: str = "\nTherefore, the answer is"
    cot_max_new_tokens: int = 64  # reasoning length of the first cot stage
    chat: bool = False  # wrap each prompt as one user turn in the model's chat template

    def __post_init__(self):
        if self.style == "few_shot":
            _check(self.k >= 1, "k", "few_shot needs k >= 1 demonstrations")
        _check(self.k >= 0, "k", "must be >= 0")
        _check(self.cot_max_new_tokens >= 1, "cot_max_new_tokens", "must be >= 1")
        _check("{" in self.template, "template", "must name at least one field, e.g. '{input}'")


@dataclass
class TaskConfig:
    """One evaluation task.

    perplexity: ``data`` is a text file; sliding window of ``window`` tokens moved by ``stride``.
    generation: ``data`` is JSONL with ``input_field`` and ``target_field`` (a string or a list of
    references); greedy output scored by ``metrics``.
    classification: ``data`` is JSONL with ``input_field`` and ``target_field`` (the label text or
    its index in the choices); each choice scored by log-likelihood; accuracy and macro F1.
    """

    kind: Literal["perplexity", "generation", "classification"] = "perplexity"
    data: str = ""
    metrics: list[str] = field(default_factory=list)  # [] = every metric of the kind
    prompt: PromptConfig = field(default_factory=PromptConfig)
    input_field: str = "input"
    target_field: str = "target"
    choices: list[str] = field(default_factory=list)  # classification labels; [] = per-example "choices"
    choice_prefix: str = " "  # put between the prompt and a choice when scoring it
    length_normalize: bool = False  # classification: mean log-prob per choice token instead of the sum
    max_examples: int = 0  # 0 = all
    max_new_tokens: int = 32  # generation: answer length
    stop: list[str] = field(default_factory=lambda: ["\n"])  # generation: the answer ends before any of these
    window: int = 256  # perplexity: tokens of context + scored tokens per forward
    stride: int = 128  # perplexity: tokens scored per window (after the first)
    add_bos: bool = False  # perplexity, classification: prepend the model's BOS (scores the first token too)
    rouge_stemmer: bool = True  # rouge-score's Porter stemmer

    def __post_init__(self):
        _check(bool(self.data), "data", f"needs a path ({'a text file' if self.kind == 'perplexity' else 'JSONL'})")
        allowed = {"generation": GENERATION_METRICS, "classification": CLASSIFICATION_METRICS}.get(self.kind, ())
        for i, m in enumerate(self.metrics):
            _check(m in allowed, f"metrics[{i}]", f"{m!r} is not a {self.kind} metric (use {', '.join(allowed) or 'none'})")
        if not self.metrics:
            self.metrics = list(allowed)
        _check(self.window >= 2, "window", "must be >= 2")
        _check(1 <= self.stride <= self.window, "stride", f"must be in 1..window ({self.window})")
        _check(self.max_examples >= 0, "max_examples", "must be >= 0 (0 = all)")
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _check(len(set(self.choices)) == len(self.choices), "choices", "must not repeat a label")
        if self.kind == "perplexity":
            _check(self.prompt.style == "zero_shot", "prompt.style", "perplexity takes no prompt")


def _build_tasks(raw: Any) -> dict[str, TaskConfig]:
    if not isinstance(raw, dict) or not raw:
        raise RecipeError("tasks", "needs a mapping of task name -> task (kind, data, ...)")
    tasks = {}
    for name, body in raw.items():
        key = f"tasks.{name}"
        if isinstance(body, TaskConfig):
            tasks[str(name)] = body
            continue
        if not isinstance(body, dict):
            raise RecipeError(key, f"expected a mapping, got {type(body).__name__} {body!r}")
        tasks[str(name)] = from_dict(TaskConfig, body, key)
    return tasks


@dataclass
class EvalSpec:
    model: str = ""  # a model folder (llm-ray export / import / sft) or a packaged name ("smollm2")
    tasks: Any = field(default_factory=dict)  # name -> TaskConfig (a mapping so --set can reach one)
    batch_size: int = 8  # sequences per forward
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = "fp32"
    bertscore_model: str = "minilm"  # encoder folder or packaged name for BERTScore
    bertscore_layer: Optional[int] = None  # encoder layer whose output is matched; None = last
    examples_in_report: int = 5  # predictions kept per task in report.json / report.md

    def __post_init__(self):
        _check(bool(self.model), "model", "needs a model folder or a packaged model name (e.g. smollm2)")
        self.tasks = _build_tasks(self.tasks)
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.bertscore_layer is None or self.bertscore_layer >= 1, "bertscore_layer", "must be >= 1 (or null = last)")
        _check(self.examples_in_report >= 0, "examples_in_report", "must be >= 0")

    def resolve_paths(self, base: str | Path) -> "EvalSpec":
        """Data paths relative to the spec file's folder when they do not exist as given."""
        base = Path(base)
        for task in self.tasks.values():
            for obj, attr in ((task, "data"), (task.prompt, "shots")):
                value = getattr(obj, attr)
                if value and not Path(value).exists() and (base / value).exists():
                    setattr(obj, attr, str(base / value))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_eval_spec(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> EvalSpec:
    """Load a YAML eval spec and apply ``--set key=value`` overrides (``tasks.NAME.key=...``)."""
    data = load_yaml(path) if path else {}
    spec = from_dict(EvalSpec, apply_overrides(data, list(overrides or [])))
    return spec.resolve_paths(Path(path).parent) if path else spec
