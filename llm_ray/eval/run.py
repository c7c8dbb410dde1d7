"""``llm-ray eval``: load the model once, run every task of the spec, write the reports."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

from llm_ray.config.eval import EvalSpec
from llm_ray.eval.report import write_reports
from llm_ray.stage import SUMMARY, StageResult
from llm_ray.eval.tasks import run_task
from llm_ray.train.device import local_device


def pick_device(spec: EvalSpec) -> torch.device:
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA device is present")
    if spec.device == "auto":
        return local_device()
    return torch.device(spec.device)


def run_eval(spec: EvalSpec, out_dir: str, bundle=None) -> dict:
    """Evaluate ``spec.model`` (or an already loaded ``bundle``) on every task; returns the
    report (also written to ``out_dir`` with report.md and summary.json)."""
    from llm_ray.bundle import load_bundle

    t0 = time.perf_counter()
    device = pick_device(spec)
    dtype = torch.bfloat16 if spec.dtype == "bf16" else None
    if bundle is None:
        bundle = load_bundle(spec.model, device=device, dtype=dtype)
    if bundle.cfg.arch != "decoder":  # every task kind scores or generates left to right
        raise ValueError(f"model: {spec.model} is an {bundle.cfg.arch}; eval tasks need a decoder (causal LM)")

    scorer: Optional[object] = None

    def bertscorer():
        nonlocal scorer  # loaded on first use: only generation tasks with bertscore need it
        if scorer is None:
            from llm_ray.eval.bertscore import BERTScorer

            scorer = BERTScorer(load_bundle(spec.bertscore_model, device=device), layer=spec.bertscore_layer, batch_size=spec.batch_size)
        return scorer

    tasks = {name: run_task(bundle, task, spec, name, bertscorer) for name, task in spec.tasks.items()}
    notes = []
    if any("meteor" in t["metrics"] for t in tasks.values()):
        from llm_ray.eval.metrics import NoSynonymWordNet, meteor_wordnet

        notes.append(
            "METEOR without WordNet synonyms (nltk's WordNet data is not installed): exact and Porter-stem matches only."
            if isinstance(meteor_wordnet(), NoSynonymWordNet)
            else "METEOR with nltk's WordNet synonyms."
        )
    if any("bertscore_f1" in t["metrics"] for t in tasks.values()):
        notes.append(f"BERTScore with encoder `{spec.bertscore_model}` layer {scorer.layer}, no idf, no baseline rescaling.")
    report = {
        "model": spec.model,
        "model_path": bundle.path,
        "device": str(device),
        "dtype": spec.dtype,
        "spec": spec.to_dict(),
        "tasks": tasks,
        "notes": notes,
        "seconds": time.perf_counter() - t0,
    }
    write_reports(report, out_dir)
    return report


def eval_stage(spec: EvalSpec, out_dir: str) -> StageResult:
    """``llm-ray eval`` as a stage: the report folder and its summary (model, flat metrics)."""
    run_eval(spec, out_dir)
    with open(os.path.join(out_dir, SUMMARY)) as f:
        return StageResult(os.path.abspath(out_dir), json.load(f))
