"""What every stage that tunes an existing model folder shares (sft, reward, dpo).

A stage's driver is then: read its data, pick converters and an objective, call
``TunedRun.train``, and write the trained model (``trained_module``, converters finalized) and
its summary. Checks that the folder allows are made here, before any Ray work starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from llm_ray.config import Recipe, RecipeError
from llm_ray.config.loader import check
from llm_ray.models.converters import LoadWeights, LoRA, ModelSpec
from llm_ray.storage import Storage, resolve_storage, sse_of

REJECTS = "rejects.jsonl"


@dataclass
class TunedRun:
    recipe: Recipe  # model section = the init folder's shape
    init_dir: str  # absolute: workers run in another working directory
    bundle: "object"  # llm_ray.bundle.ModelBundle of init_dir
    storage: Storage
    run: Storage
    out_dir: str  # local model folder to write

    @property
    def init_weights(self) -> LoadWeights:
        from llm_ray.bundle import WEIGHTS

        return LoadWeights(os.path.join(self.init_dir, WEIGHTS))

    def spec(self, converters: list) -> ModelSpec:
        return ModelSpec.of(self.recipe.model, converters, seed=self.recipe.train.seed)

    def train(self, spec: ModelSpec, objective, source) -> dict:
        """Run the engine on ``source`` with ``objective``; returns the run's summary."""
        from llm_ray.train.launcher import TrainJob, _use_gpu, check_resumable, ensure_ray, fit

        check_resumable(self.run, spec.model, self.bundle.tokenizer)  # before Ray starts
        ensure_ray()
        job = TrainJob(self.recipe, spec, objective, source, self.bundle.tokenizer, _use_gpu(self.recipe))
        return fit(job, self.storage, self.run)

    def write_rejects(self, rejects: list[dict]) -> str:
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, REJECTS)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rejects)
        return path

    def provenance(self, manifest: dict, ckpt, stage: str) -> dict:
        return {"init_from": self.recipe.finetune.init_from, "init_dir": self.init_dir, "source_checkpoint": ckpt.uri,
                "step": manifest["train_state"]["step"], "stage": stage}

    def tokenizer_config(self, template=None) -> Optional[dict]:
        """The init folder's tokenizer_config.json, with the chat template the model was tuned with."""
        from llm_ray.bundle import TOKENIZER_CONFIG

        config = {}
        if os.path.exists(os.path.join(self.init_dir, TOKENIZER_CONFIG)):
            with open(os.path.join(self.init_dir, TOKENIZER_CONFIG)) as f:
                config = json.load(f)
        if template is not None:
            config["chat_template"] = template.source
        return config or None


def tuned_recipe(recipe: Recipe, cfg, stage: str, arch: Optional[str] = None) -> Recipe:
    """The recipe the engine runs: the folder's model shape, after every check it allows."""
    ft = recipe.finetune
    ft.require_run()
    ft.check_against_model(cfg, check_task=stage == "sft")
    if arch is not None:
        check(cfg.arch == arch, "finetune.init_from", f"{stage} needs a {arch}, {ft.init_from} is an {cfg.arch}")
    check(recipe.parallel.pipeline_stages == 1, "parallel.pipeline_stages", f"{stage} runs without pipeline stages (use 1)")
    check(recipe.data.seq_len <= cfg.max_seq_len, "data.seq_len", f"{recipe.data.seq_len} exceeds the model's max_seq_len ({cfg.max_seq_len})")
    # train.objective only records the architecture for the recipe's cross-section checks
    arch_objective = "causal_lm" if cfg.arch == "decoder" else "masked_lm"
    return dataclasses.replace(recipe, model=cfg, train=dataclasses.replace(recipe.train, objective=arch_objective))


def start(recipe: Recipe, stage: str, arch: Optional[str] = None) -> TunedRun:
    """Resolve ``finetune.init_from``, adopt its model shape and validate: before any Ray work."""
    from llm_ray.bundle import load_bundle, resolve_model_path
    from llm_ray.train.launcher import _has_checkpoints

    recipe.finetune.require_run()
    try:
        init_dir = os.path.abspath(resolve_model_path(recipe.finetune.init_from))
    except FileNotFoundError as e:
        raise RecipeError("finetune.init_from", str(e)) from None
    bundle = load_bundle(init_dir)
    recipe = tuned_recipe(recipe, bundle.cfg, stage, arch)
    storage = resolve_storage(recipe.run.storage_path, recipe.run.s3_endpoint, sse_of(recipe.run))
    run = storage.child(recipe.run.name)
    if recipe.finetune.output:
        out_dir = os.path.abspath(recipe.finetune.output)
    elif run.is_local:
        out_dir = os.path.join(run.root, "model")
    else:
        raise RecipeError("finetune.output", "needs a local folder when run.storage_path is object storage")
    if not recipe.checkpoint.resume and _has_checkpoints(run):
        raise RecipeError("checkpoint.resume", f"run {run.uri} already has checkpoints; choose another run.name or resume")
    return TunedRun(recipe, init_dir, bundle, storage, run, out_dir)


def training_figures(train_summary: dict) -> dict:
    """What a tuning stage's summary reports of its engine run."""
    return {
        "train_loss_first": train_summary.get("initial_loss"),
        "train_loss_last": train_summary.get("final_loss"),
        "steps": train_summary.get("steps"),
        "stopped_early": train_summary.get("stopped_early"),  # run.stop_at_step: rerun to continue
        "tokens_per_s": train_summary.get("tokens_per_s"),
        "checkpoint": train_summary.get("checkpoint"),
    }


def converters_for(ft, head: Optional[list] = None) -> list:
    """Converters of a ``finetune`` section, in their order: weights, a head, freezing, LoRA."""
    from llm_ray.models.converters import Freeze

    out = list(head or [])
    if ft.freeze_embeddings or ft.freeze_layers:
        out.append(Freeze(ft.freeze_embeddings, ft.freeze_layers))
    if ft.lora.enabled:
        out.append(LoRA(list(ft.lora.targets), ft.lora.r, ft.lora.alpha, ft.lora.dropout))
    return out


def load_trained(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a checkpoint's state dict; a tied weight may be stored under one of its names only."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    present = {id(p) for name, p in module.named_parameters() if name in state}
    aliases = {name for name, p in module.named_parameters(remove_duplicate=False) if id(p) in present}
    really_missing = [k for k in missing if k not in aliases]
    if really_missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the tuned model: missing {really_missing[:5]}, unexpected {unexpected[:5]}")
    return module


def trained_module(tuned: TunedRun, spec: ModelSpec) -> tuple[nn.Module, dict, Storage]:
    """(the run's latest complete checkpoint in ``spec``'s structure — converters not yet
    finalized — its manifest, the checkpoint folder)."""
    from llm_ray.train.export import load_checkpoint_state

    state, manifest, _, ckpt = load_checkpoint_state(tuned.run.uri, tuned.recipe.run.s3_endpoint)
    module = load_trained(spec.without_weights().build(), state)
    return module, manifest, ckpt
