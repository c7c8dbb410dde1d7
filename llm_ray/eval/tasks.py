"""Task runners: perplexity on a text file, generation scored by BLEU/ROUGE/METEOR/BERTScore,
classification (or multiple choice) by the log-likelihood of each choice.

Each runner takes a loaded ``ModelBundle`` and a ``TaskConfig`` and returns
``{"kind", "metrics": {...}, "n_examples", "examples": [...]}``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from llm_ray.config.eval import EvalSpec, TaskConfig
from llm_ray.eval import metrics as M
from llm_ray.eval.perplexity import perplexity
from llm_ray.eval.prompts import answer_prompt, prompts_for


# ---------------------------------------------------------------------------------- data


def read_jsonl(path: str, what: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    records = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: {path}:{n} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{what}: {path}:{n} must be a JSON object")
        records.append(rec)
    if not records:
        raise ValueError(f"{what}: {path} holds no examples")
    return records


def _label_text(value, choices: list[str], where: str) -> str:
    """A classification target given as the label text or as its index into ``choices``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(choices):
            raise ValueError(f"{where}: label index {value} outside the {len(choices)} choices")
        return choices[value]
    if str(value) not in choices:
        raise ValueError(f"{where}: label {value!r} is not one of the choices {choices}")
    return str(value)


def prepare_examples(task: TaskConfig, records: list[dict], name: str) -> list[dict]:
    """Add ``input``, ``target`` (answer text), ``references`` / ``choices`` to each record."""
    out = []
    for i, rec in enumerate(records):
        where = f"tasks.{name}.data[{i}]"
        for f in (task.input_field, task.target_field):
            if f not in rec:
                raise KeyError(f"{where}: missing field {f!r} (has {sorted(rec)})")
        ex = dict(rec, input=rec[task.input_field])
        target = rec[task.target_field]
        if task.kind == "generation":
            refs = [target] if isinstance(target, str) else list(target)
            if not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"{where}: {task.target_field!r} must be a string or a list of strings")
            ex["references"], ex["target"] = refs, refs[0]
        else:
            choices = list(task.choices) or rec.get("choices")
            if not choices:
                raise ValueError(f"{where}: no choices (set tasks.{name}.choices or a 'choices' field)")
            ex["choices"] = [str(c) for c in choices]
            ex["target"] = _label_text(target, ex["choices"], where)
        out.append(ex)
    return out


# ------------------------------------------------------------------------------- model I/O


def encode(bundle, text: str, add_bos: bool = False) -> list[int]:
    ids = bundle.tokenizer.encode(text, add_special_tokens=False).ids
    return ([bundle.bos_id] if add_bos and bundle.bos_id is not None else []) + ids


def generate_texts(bundle, prompts: list[str], max_new_tokens: int, stop: list[str], batch_size: int) -> list[str]:
    """Greedy continuations of ``prompts`` (text only, cut before the first stop string), through
    ``llm_ray.generation.generate``; prompts go in length-sorted batches so little is padding."""
    from llm_ray.generation import GenerationConfig
    from llm_ray.generation.api import generate

    config = GenerationConfig(max_new_tokens=max_new_tokens, stop=list(stop))
    lengths = [len(bundle.tokenizer.encode(p).ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for i, result in zip(idx, generate(bundle, [prompts[i] for i in idx], config)):
            out[i] = result.text
    return out


def as_chat(bundle, prompts: list[str]) -> list[str]:
    """Each prompt as one user turn, rendered with the model's chat template (ends with the
    assistant's generation prompt, so the answer or the choice follows it)."""
    from llm_ray.generation.chat import render_bundle_chat

    return [render_bundle_chat(bundle, [{"role": "user", "content": p}]) for p in prompts]


@torch.inference_mode()
def continuation_logprobs(bundle, pairs: list[tuple[str, str]], batch_size: int, add_bos: bool) -> list[tuple[float, int]]:
    """(sum of log p(continuation | context), continuation length in tokens) per pair.

    The continuation's tokens are those of ``encode(context + continuation)`` past the
    context's own tokens, so a word that merges across the boundary is tokenized as the model
    saw it in training (lm-evaluation-harness does the same); when the context's tokens are not
    a prefix of the joint encoding, the two are encoded apart and concatenated.
    """
    model = bundle.model
    device = next(model.parameters()).device
    seqs = []
    for ctx, cont in pairs:
        ctx_ids = encode(bundle, ctx, add_bos)
        full = encode(bundle, ctx + cont, add_bos)
        cont_ids = full[len(ctx_ids) :] if full[: len(ctx_ids)] == ctx_ids else encode(bundle, cont)
        if not cont_ids:
            raise ValueError(f"choice {cont!r} encodes to no tokens")
        if not ctx_ids:  # the first token needs something to be predicted from
            raise ValueError("empty prompt: set prompt.template or add_bos")
        seqs.append((ctx_ids, cont_ids))
    results = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        T = max(len(c) + len(k) for c, k in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)  # right padding: never seen causally
        for row, (c, k) in enumerate(batch):
            ids[row, : len(c) + len(k)] = torch.tensor(c + k)
        logp = torch.log_softmax(model(ids.to(device)).float(), dim=-1)  # (B, T, V)
        for row, (c, k) in enumerate(batch):
            pos = torch.arange(len(c) - 1, len(c) + len(k) - 1, device=logp.device)  # predict k
            tok = torch.tensor(k, device=logp.device)
            results.append((float(logp[row, pos, tok].sum()), len(k)))
    return results


# ---------------------------------------------------------------------------------- runners


def run_perplexity(bundle, task: TaskConfig, spec: EvalSpec, name: str) -> dict:
    p = Path(task.data)
    if not p.is_file():
        raise FileNotFoundError(f"tasks.{name}.data: file not found: {task.data}")
    ids = encode(bundle, p.read_text(encoding="utf-8"), task.add_bos)
    result = perplexity(bundle.model, ids, task.window, task.stride, spec.batch_size)
    return {"metrics": result, "n_examples": 1, "examples": [], "tokens": len(ids)}


def _prompts(bundle, task: TaskConfig, examples: list[dict]) -> list[str]:
    shots = None
    if task.prompt.shots:
        shots = prepare_examples(task, read_jsonl(task.prompt.shots, "prompt.shots"), "shots")
    prompts = prompts_for(task.prompt, examples, shots)
    return as_chat(bundle, prompts) if task.prompt.chat else prompts


def _with_reasoning(bundle, task: TaskConfig, spec: EvalSpec, prompts: list[str]) -> tuple[list[str], list[str]]:
    """Chain of thought, stage 1: generate the reasoning and build the stage-2 prompts."""
    # No stop string while generating: models often open their reasoning with blank lines, which
    # a separator stop ("\n\n") would turn into no reasoning at all. Cut after the leading space.
    raw = generate_texts(bundle, prompts, task.prompt.cot_max_new_tokens, [], spec.batch_size)
    sep = task.prompt.separator
    reasoning = [r.lstrip().split(sep)[0] if sep else r.lstrip() for r in raw]
    return [answer_prompt(task.prompt, p, r) for p, r in zip(prompts, reasoning)], reasoning


def run_generation(bundle, task: TaskConfig, spec: EvalSpec, name: str, bertscorer: Callable[[], object]) -> dict:
    examples = _examples(task, name)
    prompts = _prompts(bundle, task, examples)
    reasoning = None
    if task.prompt.style == "cot":
        prompts, reasoning = _with_reasoning(bundle, task, spec, prompts)
    predictions = [p.strip() for p in generate_texts(bundle, prompts, task.max_new_tokens, task.stop, spec.batch_size)]
    references = [ex["references"] for ex in examples]
    scores: dict = {}
    if "bleu" in task.metrics:
        scores.update(M.bleu(predictions, references))
    if "rouge" in task.metrics:
        scores.update(M.rouge(predictions, references, use_stemmer=task.rouge_stemmer))
    if "meteor" in task.metrics:
        scores.update(M.meteor(predictions, references))
    if "bertscore" in task.metrics:
        from llm_ray.eval.bertscore import bertscore

        scores.update(bertscore(predictions, references, bertscorer()))
    shown = [
        {"prompt": p, "prediction": y, "references": r, **({"reasoning": reasoning[i]} if reasoning else {})}
        for i, (p, y, r) in enumerate(zip(prompts, predictions, references))
    ]
    return {"metrics": scores, "n_examples": len(examples), "examples": shown[: spec.examples_in_report]}


def run_classification(bundle, task: TaskConfig, spec: EvalSpec, name: str) -> dict:
    examples = _examples(task, name)
    prompts = _prompts(bundle, task, examples)
    reasoning = None
    if task.prompt.style == "cot":
        prompts, reasoning = _with_reasoning(bundle, task, spec, prompts)
    pairs = [(p, task.choice_prefix + c) for p, ex in zip(prompts, examples) for c in ex["choices"]]
    scored = iter(continuation_logprobs(bundle, pairs, spec.batch_size, task.add_bos))
    gold, pred, shown = [], [], []
    for i, (p, ex) in enumerate(zip(prompts, examples)):
        logps = [next(scored) for _ in ex["choices"]]
        values = [s / n if task.length_normalize else s for s, n in logps]
        choice = ex["choices"][max(range(len(values)), key=values.__getitem__)]
        gold.append(ex["target"])
        pred.append(choice)
        row = {"prompt": p, "prediction": choice, "target": ex["target"], "logprobs": dict(zip(ex["choices"], values))}
        shown.append(row | ({"reasoning": reasoning[i]} if reasoning else {}))
    scores = M.classification_metrics(gold, pred)
    scores = {k: v for k, v in scores.items() if k.split("_")[0] in task.metrics}
    return {
        "metrics": scores,
        "n_examples": len(examples),
        "per_class_f1": M.f1_per_class(gold, pred),
        "examples": shown[: spec.examples_in_report],
    }


def _examples(task: TaskConfig, name: str) -> list[dict]:
    records = read_jsonl(task.data, f"tasks.{name}.data")
    if task.max_examples:
        records = records[: task.max_examples]
    return prepare_examples(task, records, name)


def run_task(bundle, task: TaskConfig, spec: EvalSpec, name: str, bertscorer: Callable[[], object]) -> dict:
    t0 = time.perf_counter()
    if task.kind == "perplexity":
        result = run_perplexity(bundle, task, spec, name)
    elif task.kind == "generation":
        result = run_generation(bundle, task, spec, name, bertscorer)
    else:
        result = run_classification(bundle, task, spec, name)
    return {"kind": task.kind, "data": task.data, "prompt_style": task.prompt.style, **result, "seconds": time.perf_counter() - t0}
