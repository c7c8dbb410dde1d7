"""Knowledge distillation on the engine: a student (fewer layers, initialised from every other
teacher layer or at random) trained on text against a frozen teacher's soft targets; and
quantization-aware training, the same loop with the fake-quantized model as the student of its
own float original.

The teacher is a frozen model of the objective seam (``Objective.frozen_models``): each Ray
Train worker builds it once, in eval mode, next to the student DeepSpeed trains. The loss is
``models.losses.distillation_loss``: α·T²·KL(teacher ‖ student) + (1 − α)·CE; α = 0 is the same
student trained on the text alone (the baseline distillation must beat).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch

from llm_ray.models.converters import ModelSpec
from llm_ray.models.losses import IGNORE_INDEX, distillation_loss, hidden_cosine_loss
from llm_ray.train.objective import Objective


@dataclass
class Distill(Objective):
    teacher: ModelSpec
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_cosine: float = 0.0  # weight of DistilBERT's 1 - cos(h_s, h_t) on the final hidden states
    name = "distill"
    batch_fields = ("input_ids", "labels")
    frozen_forwards = 1  # the teacher's forward over the same rows

    def frozen_models(self) -> dict[str, ModelSpec]:
        return {"teacher": self.teacher}

    def loss(self, engine, batch, frozen):
        with final_hidden(engine.module if hasattr(engine, "module") else engine, self.hidden_cosine > 0) as student_h:
            logits = engine(batch["input_ids"])  # (B, T, V)
        if self.alpha > 0 or self.hidden_cosine > 0:
            with torch.no_grad(), final_hidden(frozen["teacher"], self.hidden_cosine > 0) as teacher_h:
                teacher = frozen["teacher"](batch["input_ids"])
        else:  # the no-teacher baseline: the teacher's forward would be wasted
            teacher = logits.detach()
        loss, kl, ce = distillation_loss(logits, teacher, batch["labels"], self.temperature, self.alpha)
        metrics = {"kl": kl.detach(), "ce": ce.detach()}
        if self.hidden_cosine > 0:
            cos = hidden_cosine_loss(student_h[0], teacher_h[0], batch["labels"] != IGNORE_INDEX)
            loss = loss + self.hidden_cosine * cos
            metrics["hidden_cos"] = cos.detach()
        return loss, metrics


@contextlib.contextmanager
def final_hidden(model, wanted: bool):
    """Yields a list that holds, after a forward, the input of the LM head's projection: the
    final hidden states (B, T, d), normed (what the vocabulary sees; DistilBERT's choice)."""
    out: list = []
    handle = model.head.proj.register_forward_pre_hook(lambda m, args: out.append(args[0])) if wanted else None
    try:
        yield out
    finally:
        if handle is not None:
            handle.remove()


def every_other_layer(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher blocks a student starts from, spread evenly (DistilBERT: 0, 2, 4, ...)."""
    step = teacher_layers / student_layers
    return [min(teacher_layers - 1, int(i * step)) for i in range(student_layers)]


def student_config(teacher_cfg, spec):
    """The student's shape: ``student_layers`` (0: half the teacher's) and, where
    ``student_width`` is set, a narrower d_model (the FFN width and head size follow it; the head
    counts stay). RecipeError naming the key when the shape is not valid."""
    from llm_ray.config import RecipeError

    layers = spec.student_layers or max(1, teacher_cfg.n_layers // 2)
    width = {}
    if spec.student_width and spec.student_width != teacher_cfg.d_model:
        width = {"d_model": spec.student_width, "d_ff": None, "d_head": None}
    try:
        return dataclasses.replace(teacher_cfg, n_layers=layers, **width)
    except RecipeError as e:
        raise RecipeError("student_width" if width else "student_layers", f"the student's {e}") from None


def distilled_folder(teacher, spec, out_dir: str) -> tuple[str, dict]:
    """Train the student of ``spec`` (shallower, optionally narrower) against the loaded
    ``teacher`` bundle; (folder, training figures)."""
    from llm_ray.models.converters import LayersFrom

    cfg = student_config(teacher.cfg, spec)
    narrower = cfg.d_model != teacher.cfg.d_model
    init = [LayersFrom(teacher_weights(teacher), every_other_layer(teacher.cfg.n_layers, cfg.n_layers))] if spec.student_init == "teacher_layers" else []
    record = {"distill": {"student_layers": cfg.n_layers, "student_width": cfg.d_model, "student_init": spec.student_init,
                          "temperature": spec.temperature, "alpha": spec.alpha, "hidden_cosine": spec.hidden_cosine}}
    assert not (narrower and (init or spec.hidden_cosine)), "checked by compress_stage"
    return trained_against_teacher(teacher, spec, out_dir, cfg, init, record)


def qat_folder(teacher, spec, out_dir: str) -> tuple[str, dict]:
    """Quantization-aware training: the model itself, fake-quantized as ``spec.qat_scheme``
    will store it, fine-tuned against its own float original (soft targets with ``alpha`` = 1
    keep it on the original's distribution, not the training text's), then stored quantized."""
    from llm_ray.models.converters import FakeQuant, LoadWeights

    init = [LoadWeights(teacher_weights(teacher)), FakeQuant(spec.qat_scheme, spec.group_size)]
    record = {"qat": {"scheme": spec.qat_scheme, "group_size": spec.group_size, "temperature": spec.temperature, "alpha": spec.alpha}}
    return trained_against_teacher(teacher, spec, out_dir, teacher.cfg, init, record,
                                   quantization={"scheme": spec.qat_scheme, "group_size": spec.group_size})


def teacher_weights(teacher) -> str:
    from llm_ray.bundle import WEIGHTS
    from llm_ray.config import RecipeError

    if teacher.config.get("quantization"):
        raise RecipeError("model", f"{teacher.path} is stored quantized: train from its float original")
    return os.path.join(teacher.path, WEIGHTS)


def trained_against_teacher(teacher, spec, out_dir: str, student_cfg, init: list, record: dict,
                            quantization: dict | None = None) -> tuple[str, dict]:
    """Train a student (``student_cfg`` built with the ``init`` converters) on the engine against
    the frozen ``teacher`` with the ``Distill`` objective; write its folder. The run
    (checkpoints, metrics, TensorBoard) is ``spec.train_recipe``'s run."""
    import json

    from llm_ray.bundle import TOKENIZER_CONFIG, save_bundle
    from llm_ray.config import load_recipe
    from llm_ray.models.converters import LoadWeights
    from llm_ray.storage import resolve_storage, sse_of
    from llm_ray.train import tuning
    from llm_ray.train.launcher import prepare_source

    recipe = load_recipe(spec.train_recipe, [f"data.tokenizer.path={teacher.path}/tokenizer.json",
                                             "data.tokenizer.train_if_missing=false", *spec.train_set])
    recipe = dataclasses.replace(recipe, model=student_cfg)  # the engine trains the student's shape
    storage = resolve_storage(recipe.run.storage_path, recipe.run.s3_endpoint, sse_of(recipe.run))
    run = storage.child(recipe.run.name)
    tuned = tuning.TunedRun(recipe, teacher.path, teacher, storage, run, out_dir)
    _, source = prepare_source(recipe, run)
    student = ModelSpec.of(student_cfg, init, seed=recipe.train.seed)
    objective = Distill(ModelSpec.of(teacher.cfg, [LoadWeights(teacher_weights(teacher))]), spec.temperature, spec.alpha,
                        spec.hidden_cosine)
    summary = tuned.train(student, objective, source)
    module, manifest, ckpt = tuning.trained_module(tuned, student)
    tok_config = None
    if os.path.exists(os.path.join(teacher.path, TOKENIZER_CONFIG)):
        with open(os.path.join(teacher.path, TOKENIZER_CONFIG)) as f:
            tok_config = json.load(f)
    provenance = {"teacher": teacher.path, "source_checkpoint": ckpt.uri, "step": manifest["train_state"]["step"], **record}
    folder = save_bundle(student.finalize(module), student_cfg, teacher.tokenizer.to_str(), out_dir, provenance, tok_config,
                         quantization=quantization)
    return folder, tuning.training_figures(summary)
