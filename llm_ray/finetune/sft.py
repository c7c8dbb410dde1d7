"""``llm-ray sft``: supervised fine-tuning on the pretraining engine.

Driver: read the ``init_from`` model folder, turn the JSONL records into masked examples
(``data/sft.py``), evaluate the starting model on the held-out split, then train on the engine
(``train/tuning.py``) with the model converters of the recipe — loaded weights, a
classification head, freezing, LoRA — and the ``SFTChat`` or ``Classification`` objective.
Afterwards the latest checkpoint is loaded into the same structure, the converters are
finalized (LoRA merged), and the result is written as a plain model folder with
``summary.json``: held-out loss (and accuracy / macro F1) before and after, trainable and
frozen parameter counts, and checks that frozen weights did not move.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter

import numpy as np
import torch
import torch.nn as nn

from llm_ray.config import Recipe, RecipeError
from llm_ray.config.loader import check
from llm_ray.models.converters import ClassifierHead, ModelSpec, param_counts
from llm_ray.stage import StageResult, write_summary
from llm_ray.train.tuning import converters_for, tuned_recipe

ADAPTER = "adapter.safetensors"  # LoRA tensors alone (names as in the wrapped model)


def model_spec(tuned, pad_id: int, with_weights: bool = True) -> ModelSpec:
    """Init weights, classification head, freezing and LoRA, in that order."""
    ft = tuned.recipe.finetune
    head = [ClassifierHead(len(ft.labels), pad_id, ft.pooling)] if ft.task == "classification" else []
    return tuned.spec(([tuned.init_weights] if with_weights else []) + converters_for(ft, head))


# ---- evaluation on the held-out split (driver side, plain torch) -------------------------------


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def response_loss(model: nn.Module, input_ids: np.ndarray, labels: np.ndarray, device, batch_size: int = 8) -> float:
    """Token-mean cross entropy over labelled (response) tokens of all examples."""
    from llm_ray.models.losses import IGNORE_INDEX, token_cross_entropy

    model.eval()
    total, count = 0.0, 0
    for s in _batches(len(input_ids), batch_size):
        x = torch.from_numpy(input_ids[s]).to(device)
        y = torch.from_numpy(labels[s]).to(device)
        logits = model(x)  # (B, T, V), or a classifier's (B, C) against labels (B, 1)
        total += float(token_cross_entropy(logits, y, "sum"))
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
    template = ChatTemplate.for_bundle(bundle)
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
            raise RecipeError(key, f"no usable examples (rejected: {sorted({r['reason'] for r in rejects}) or 'none'})")
    return train, held, rejects, template


# ---- the command ------------------------------------------------------------------------------


def prepare_recipe(recipe: Recipe, cfg) -> Recipe:
    """The recipe the engine runs: the folder's model shape, checked before any Ray work."""
    return tuned_recipe(recipe, cfg, "sft")


def sft(recipe: Recipe) -> StageResult:
    from safetensors.torch import load_file, save_file

    from llm_ray.bundle import WEIGHTS, save_bundle, save_classifier
    from llm_ray.data.source import ArraySource
    from llm_ray.finetune.objectives import Classification, SFTChat
    from llm_ray.generation.api import pad_id_for
    from llm_ray.train import tuning
    from llm_ray.train.device import local_device

    started = time.time()
    tuned = tuning.start(recipe, "sft")  # before any Ray work
    recipe, bundle, ft, out_dir = tuned.recipe, tuned.bundle, tuned.recipe.finetune, tuned.out_dir
    pad_id = pad_id_for(bundle)
    train, held, rejects, template = load_examples(recipe, bundle, pad_id)
    tuned.write_rejects(rejects)

    device = local_device()
    spec = model_spec(tuned, pad_id)
    start_model = spec.build()
    counts = param_counts(start_model)
    # names as in the backbone's folder: LoRA's frozen ".base." weights map to the plain names
    frozen = [n.removeprefix("backbone.") for n, p in start_model.named_parameters(remove_duplicate=False) if not p.requires_grad]
    before = evaluate(start_model.to(device), ft.task, held, device)
    del start_model

    objective = Classification() if ft.task == "classification" else SFTChat()
    source = ArraySource({"input_ids": train.input_ids, "labels": train.labels}, recipe.train.seed)
    train_summary = tuned.train(spec, objective, source)

    trained, manifest, ckpt = tuning.trained_module(tuned, spec)
    init_weights = load_file(os.path.join(tuned.init_dir, WEIGHTS))
    lora, adapters = None, None
    if ft.lora.enabled:
        lora, adapters = _merge_lora(trained, spec, torch.from_numpy(held.input_ids[:8]), init_weights, device)
        lora = {**dataclasses.asdict(ft.lora), **lora}
    else:
        trained = spec.finalize(trained)

    provenance = {**tuned.provenance(manifest, ckpt, "sft"), "finetune_task": ft.task}
    tok_config = tuned.tokenizer_config(template)
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
        "run_dir": tuned.run.uri,
        "init_from": ft.init_from,
        "task": ft.task,
        "train_examples": len(train),
        "eval_examples": len(held),
        "rejected": len(rejects),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "rejects_file": os.path.join(out_dir, tuning.REJECTS),
        "eval_loss_before": before["loss"],
        "eval_loss_after": after["loss"],
        **tuning.training_figures(train_summary),
        **counts,
        "frozen_tensors": len(frozen_plain),
        "frozen_unchanged": _unchanged(frozen_plain, written, init_weights) if frozen_plain else None,
        "lora": lora,
        "wall_s": round(time.time() - started, 2),
    }
    if ft.task == "classification":
        summary.update({f"{k}_{when}": v for when, m in (("before", before), ("after", after)) for k, v in m.items() if k != "loss"})
    return write_summary(out_dir, summary)


def _unchanged(names: list[str], trained: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> bool:
    """Bit-identical for every name both hold (a tied weight is stored under one name only)."""
    return all(torch.equal(trained[n], init[n]) for n in names if n in trained and n in init)


@torch.no_grad()
def _merge_lora(model: nn.Module, spec: ModelSpec, sample: torch.Tensor, init_weights: dict, device) -> tuple[dict, dict]:
    """Merge in place (LoRA's finalize); returns (figures, adapter tensors). Checks the frozen
    bases did not move and that merged logits equal adapter + base logits on ``sample``."""
    from llm_ray.models.lora import LoRALinear, lora_state_dict

    bases = {n: m.base.weight for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    base_unchanged = all(torch.equal(w.detach().cpu().float(), init_weights[n.removeprefix("backbone.") + ".weight"])
                         for n, w in bases.items())
    model.to(device).eval()
    adapter_logits = model(sample.to(device)).float()
    adapters = {k: v.float().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    model = spec.finalize(model)
    merged_logits = model(sample.to(device)).float()
    figures = {
        "wrapped_layers": len(bases),
        "base_unchanged": base_unchanged,
        "merge_max_abs_diff": float((adapter_logits - merged_logits).abs().max()),
        "logits_max_abs": float(adapter_logits.abs().max()),  # the scale that difference is on
    }
    return figures, adapters


def _reload(out_dir: str, task: str, device) -> nn.Module:
    from llm_ray.bundle import load_bundle, load_classifier

    if task == "classification":
        return load_classifier(out_dir, device=str(device))[0]
    return load_bundle(out_dir, device=str(device)).model
