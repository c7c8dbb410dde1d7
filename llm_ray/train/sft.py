"""``llm-ray sft``: supervised fine-tuning on the pretraining engine.

Driver: read the ``init_from`` model folder, turn the JSONL records into masked examples
(``data/sft.py``), evaluate the starting model on the held-out split, then train with the same
``TorchTrainer`` + DeepSpeed engine, checkpoints and resume as pretraining (``launcher.fit``).
The only addition on the workers is ``FinetuneModelBuilder``, which ``build_engine`` applies to
the freshly built model before ``deepspeed.initialize``: load the weights, add a classification
head, freeze parameters, wrap LoRA adapters. Afterwards the latest checkpoint is loaded into the
same structure, adapters are merged, and the result is written as a plain model folder
(``save_bundle``) with ``summary.json``: held-out loss (and accuracy / macro F1) before and
after, trainable and frozen parameter counts, and checks that frozen weights did not move.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from llm_ray.config import FinetuneConfig, Recipe, RecipeError, from_dict
from llm_ray.config.loader import check
from llm_ray.storage import resolve_storage

REJECTS = "rejects.jsonl"
ADAPTER = "adapter.safetensors"  # LoRA tensors alone (names as in the wrapped model)


@dataclass
class SFTResult:
    out_dir: str
    summary: dict


def finetune_model(module: nn.Module, ft: FinetuneConfig, pad_id: int) -> nn.Module:
    """Head, freezing and LoRA, in that order, on a built (and loaded) ``DecoderLM``/``EncoderMLM``."""
    from llm_ray.models.heads import SequenceClassifier
    from llm_ray.models.lora import apply_lora

    backbone = module
    if ft.task == "classification":
        module = SequenceClassifier(backbone, len(ft.labels), pad_id, ft.pooling)
        # The vocab projection (decoder) / MLM head (encoder) is unused by the classifier: no
        # gradient, so frozen; except a weight tied to the embedding table, trained via lookups.
        unused = backbone.head.proj if backbone.cfg.arch == "decoder" else backbone.head
        tied = {id(p) for p in backbone.embedding.parameters()}
        for p in unused.parameters():
            if id(p) not in tied:
                p.requires_grad_(False)
    if ft.freeze_embeddings:
        backbone.embedding.requires_grad_(False)  # a head tied to the table is the same Parameter
    for block in backbone.layers[: ft.freeze_layers]:
        block.requires_grad_(False)
    if ft.lora.enabled:
        apply_lora(backbone, ft.lora.targets, ft.lora.r, ft.lora.alpha, ft.lora.dropout)  # freezes the rest
        if ft.task == "classification":
            module.classifier.requires_grad_(True)
    return module


@dataclass
class FinetuneModelBuilder:
    """Picklable ``prepare_model`` for ``parallelize.build_engine``; runs on every worker."""

    finetune: dict  # FinetuneConfig as a dict (plain data crosses Ray cleanly)
    pad_id: int
    weights: Optional[str] = None  # model.safetensors of init_from; None keeps the built weights

    def __call__(self, module: nn.Module) -> nn.Module:
        if self.weights:
            from safetensors.torch import load_model

            load_model(module, self.weights, strict=True)
        return finetune_model(module, from_dict(FinetuneConfig, self.finetune, "finetune"), self.pad_id)


def param_counts(module: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return {"trainable_params": trainable, "frozen_params": frozen}


def build_finetune_model(recipe: Recipe, builder: FinetuneModelBuilder) -> nn.Module:
    """The module a worker builds (same seed, same order, so the same head and adapter init)."""
    from llm_ray.models import build_model

    torch.manual_seed(recipe.train.seed)
    return builder(build_model(recipe.model))


def load_trained(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a checkpoint's state dict; a tied weight may be stored under one of its names only."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    present = {id(p) for name, p in module.named_parameters() if name in state}
    aliases = {name for name, p in module.named_parameters(remove_duplicate=False) if id(p) in present}
    really_missing = [k for k in missing if k not in aliases]
    if really_missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the fine-tuned model: missing {really_missing[:5]}, unexpected {unexpected[:5]}")
    return module


# ---- evaluation on the held-out split (driver side, plain torch) -------------------------------


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def response_loss(model: nn.Module, input_ids: np.ndarray, labels: np.ndarray, device, batch_size: int = 8) -> float:
    """Token-mean cross entropy over labelled (response) tokens of all examples."""
    from llm_ray.data.packing import IGNORE_INDEX

    model.eval()
    total, count = 0.0, 0
    for s in _batches(len(input_ids), batch_size):
        x = torch.from_numpy(input_ids[s]).to(device)
        y = torch.from_numpy(labels[s]).to(device)
        logits = model(x).float()  # (B, T, V)
        total += float(nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((y != IGNORE_INDEX).sum())
    return total / max(count, 1)


@torch.no_grad()
def predict(model: nn.Module, input_ids: np.ndarray, device, batch_size: int = 16) -> np.ndarray:
    model.eval()
    out = [model.classify(torch.from_numpy(input_ids[s]).to(device)).argmax(-1).cpu().numpy() for s in _batches(len(input_ids), batch_size)]
    return np.concatenate(out)


def accuracy_macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """Accuracy and macro F1 over the labels seen in either array (eval's metrics, shared)."""
    from llm_ray.eval.metrics import accuracy, macro_f1

    y_true, y_pred = np.asarray(y_true).tolist(), np.asarray(y_pred).tolist()
    return float(accuracy(y_true, y_pred)), float(macro_f1(y_true, y_pred))


def evaluate(model: nn.Module, task: str, examples, device) -> dict:
    if task == "classification":
        acc, f1 = accuracy_macro_f1(examples.labels[:, 0], predict(model, examples.input_ids, device))
        return {"accuracy": acc, "macro_f1": f1, "loss": response_loss(model, examples.input_ids, examples.labels, device)}
    return {"loss": response_loss(model, examples.input_ids, examples.labels, device)}


# ---- data -----------------------------------------------------------------------------------


def _encoder(recipe: Recipe, bundle, pad_id: int):
    """``record -> (input_ids, labels)`` for the recipe's task, and the chat template used."""
    from llm_ray.data.sft import ChatTemplate, chat_messages, encode_chat, encode_classification

    ft, seq_len, tok = recipe.finetune, recipe.data.seq_len, bundle.tokenizer
    if ft.task == "classification":
        return (lambda r: encode_classification(r, ft.labels, tok, seq_len, pad_id, ft.text_field, ft.label_field)), None
    tok_name = (lambda i: tok.id_to_token(i) if i is not None else "") if tok else None
    template = ChatTemplate(bundle.chat_template, tok_name(bundle.bos_id), tok_name(bundle.eos_ids[0] if bundle.eos_ids else None))
    return (lambda r: encode_chat(chat_messages(r, ft.system_prompt), template, tok, seq_len, pad_id)), template


def load_examples(recipe: Recipe, bundle, pad_id: int):
    """(train Examples, eval Examples, rejects, chat template or None)."""
    from llm_ray.data.sft import Examples, build_examples, read_jsonl, split_records

    ft = recipe.finetune
    encode, template = _encoder(recipe, bundle, pad_id)
    for key, path in (("finetune.train_path", ft.train_path), ("finetune.eval_path", ft.eval_path)):
        check(not path or os.path.isfile(path), key, f"no such file: {path}")
    records, rejects = read_jsonl(ft.train_path)
    train = build_examples(records, ft.train_path, encode)
    rejects += train.rejects
    if ft.eval_path:
        eval_records, eval_bad = read_jsonl(ft.eval_path)
        held = build_examples(eval_records, ft.eval_path, encode)
        rejects += eval_bad + held.rejects
    else:
        # Split the usable examples, after encoding: a rejected record never takes an eval slot.
        train_rows, eval_rows = split_records(list(range(len(train))), ft.eval_fraction, recipe.train.seed)
        held = Examples(train.input_ids[eval_rows], train.labels[eval_rows])
        train = Examples(train.input_ids[train_rows], train.labels[train_rows])
    for key, ex in (("finetune.train_path", train), ("finetune.eval_path", held)):
        if len(ex) == 0:
            raise ValueError(f"{key}: no usable examples (rejected: {sorted({r['reason'] for r in rejects}) or 'none'})")
    return train, held, rejects, template


# ---- the command ------------------------------------------------------------------------------


def _output_dir(recipe: Recipe, run) -> str:
    if recipe.finetune.output:
        return os.path.abspath(recipe.finetune.output)
    if not run.is_local:
        raise RecipeError("finetune.output", "needs a local folder when run.storage_path is object storage")
    return os.path.join(run.root, "model")


def prepare_recipe(recipe: Recipe, cfg) -> Recipe:
    """The recipe the engine runs: the folder's model shape and the objective that fits it."""
    ft = recipe.finetune
    ft.require_run()
    ft.check_against_model(cfg)
    check(recipe.parallel.pipeline_stages == 1, "parallel.pipeline_stages", "sft runs without pipeline stages (use 1)")
    objective = "causal_lm" if cfg.arch == "decoder" else "masked_lm"
    return dataclasses.replace(recipe, model=cfg, train=dataclasses.replace(recipe.train, objective=objective))


def sft(recipe: Recipe) -> SFTResult:
    from safetensors.torch import load_file, save_file

    from llm_ray.data.sft import ExampleSource
    from llm_ray.generation.api import pad_id_for
    from llm_ray.models.bundle import WEIGHTS, load_bundle, resolve_model_path, save_bundle
    from llm_ray.models.heads import save_classifier
    from llm_ray.train.device import local_device
    from llm_ray.train.export import load_checkpoint_state
    from llm_ray.train.launcher import _has_checkpoints, _use_gpu, ensure_ray, fit

    started = time.time()
    recipe.finetune.require_run()
    try:
        init_dir = os.path.abspath(resolve_model_path(recipe.finetune.init_from))  # workers run in another cwd
    except FileNotFoundError as e:
        raise RecipeError("finetune.init_from", str(e)) from None
    bundle = load_bundle(init_dir)
    recipe = prepare_recipe(recipe, bundle.cfg)  # before any Ray work
    ft = recipe.finetune
    storage = resolve_storage(recipe.run.storage_path, recipe.run.s3_endpoint)
    run = storage.child(recipe.run.name)
    out_dir = _output_dir(recipe, run)
    if not recipe.checkpoint.resume and _has_checkpoints(run):
        raise RecipeError("checkpoint.resume", f"run {run.uri} already has checkpoints; choose another run.name or resume")
    pad_id = pad_id_for(bundle)
    train, held, rejects, template = load_examples(recipe, bundle, pad_id)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, REJECTS), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rejects)

    device = local_device()
    builder = FinetuneModelBuilder(dataclasses.asdict(ft), pad_id, os.path.join(init_dir, WEIGHTS))
    start_model = build_finetune_model(recipe, builder)
    counts = param_counts(start_model)
    # names as in the backbone's folder: LoRA's frozen ".base." weights map to the plain names
    frozen = [n.removeprefix("backbone.") for n, p in start_model.named_parameters(remove_duplicate=False) if not p.requires_grad]
    before = evaluate(start_model.to(device), ft.task, held, device)
    del start_model

    ensure_ray()
    use_gpu = _use_gpu(recipe)
    source = ExampleSource(train.input_ids, train.labels, recipe.train.seed)
    train_summary = fit(recipe, storage, run, recipe.model, bundle.tokenizer, source, use_gpu, {"prepare_model": builder})

    # The trained model: latest complete checkpoint loaded into the same structure.
    state, manifest, _, ckpt = load_checkpoint_state(run.uri, recipe.run.s3_endpoint)
    trained = load_trained(build_finetune_model(recipe, dataclasses.replace(builder, weights=None)), state)
    del state
    init_weights = load_file(os.path.join(init_dir, WEIGHTS))
    lora, adapters = None, None
    if ft.lora.enabled:
        lora, adapters = _merge_lora(trained, torch.from_numpy(held.input_ids[:8]), init_weights, device)
        lora = {**dataclasses.asdict(ft.lora), **lora}

    provenance = {"init_from": ft.init_from, "init_dir": init_dir, "source_checkpoint": ckpt.uri,
                  "step": manifest["train_state"]["step"], "finetune_task": ft.task}
    tok_config = _tokenizer_config(init_dir, template)
    if ft.task == "classification":
        save_classifier(trained.cpu(), ft.labels, bundle.tokenizer.to_str(), out_dir, provenance, tok_config)
    else:
        save_bundle(trained.cpu(), bundle.cfg, bundle.tokenizer.to_str(), out_dir, provenance, tok_config)
    if adapters is not None:  # the adapter alone too: base + adapter reproduces the merged model
        save_file(adapters, os.path.join(out_dir, ADAPTER))
    del trained

    # "After" is measured on what was written: the folder is reloaded as a user would.
    after = evaluate(_reload(out_dir, ft.task, device), ft.task, held, device)
    written = load_file(os.path.join(out_dir, WEIGHTS))
    frozen_plain = [n for n in frozen if ".base." not in n]  # LoRA-targeted weights change by design
    summary = {
        "out_dir": out_dir,
        "run_dir": run.uri,
        "init_from": ft.init_from,
        "task": ft.task,
        "train_examples": len(train),
        "eval_examples": len(held),
        "rejected": len(rejects),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "rejects_file": os.path.join(out_dir, REJECTS),
        "eval_loss_before": before["loss"],
        "eval_loss_after": after["loss"],
        "train_loss_first": train_summary.get("initial_loss"),
        "train_loss_last": train_summary.get("final_loss"),
        "steps": train_summary.get("steps"),
        "stopped_early": train_summary.get("stopped_early"),  # run.stop_at_step: rerun to continue
        "tokens_per_s": train_summary.get("tokens_per_s"),
        **counts,
        "frozen_tensors": len(frozen_plain),
        "frozen_unchanged": _unchanged(frozen_plain, written, init_weights) if frozen_plain else None,
        "lora": lora,
        "checkpoint": train_summary.get("checkpoint"),
        "wall_s": round(time.time() - started, 2),
    }
    if ft.task == "classification":
        summary.update({f"{k}_{when}": v for when, m in (("before", before), ("after", after)) for k, v in m.items() if k != "loss"})
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return SFTResult(out_dir, summary)


def _unchanged(names: list[str], trained: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> bool:
    """Bit-identical for every name both hold (a tied weight is stored under one name only)."""
    return all(torch.equal(trained[n], init[n]) for n in names if n in trained and n in init)


@torch.no_grad()
def _merge_lora(model: nn.Module, sample: torch.Tensor, init_weights: dict, device) -> tuple[dict, dict]:
    """Merge in place; returns (figures, adapter tensors). Checks the frozen bases did not move
    and that merged logits equal adapter + base logits on ``sample``."""
    from llm_ray.models.lora import LoRALinear, lora_state_dict, merge_lora

    bases = {n: m.base.weight for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    base_unchanged = all(torch.equal(w.detach().cpu().float(), init_weights[n.removeprefix("backbone.") + ".weight"])
                         for n, w in bases.items())
    model.to(device).eval()
    adapter_logits = model(sample.to(device)).float()
    adapters = {k: v.float().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    merge_lora(model)
    merged_logits = model(sample.to(device)).float()
    figures = {
        "wrapped_layers": len(bases),
        "base_unchanged": base_unchanged,
        "merge_max_abs_diff": float((adapter_logits - merged_logits).abs().max()),
        "logits_max_abs": float(adapter_logits.abs().max()),  # the scale that difference is on
    }
    return figures, adapters


def _tokenizer_config(init_dir: str, template) -> Optional[dict]:
    """The init folder's tokenizer_config.json, with the chat template the model was tuned with."""
    from llm_ray.models.bundle import TOKENIZER_CONFIG

    config = {}
    if os.path.exists(os.path.join(init_dir, TOKENIZER_CONFIG)):
        with open(os.path.join(init_dir, TOKENIZER_CONFIG)) as f:
            config = json.load(f)
    if template is not None:
        config["chat_template"] = template.source
    return config or None


def _reload(out_dir: str, task: str, device) -> nn.Module:
    from llm_ray.models.bundle import load_bundle
    from llm_ray.models.heads import load_classifier

    if task == "classification":
        return load_classifier(out_dir, device=str(device))[0]
    return load_bundle(out_dir, device=str(device)).model
