"""``make demo``: the whole foundation on local Ray and CPU in a couple of minutes.

Train a tokenizer on the bundled corpus, pretrain the embedded default recipe, stop at a
checkpoint as a preempted job would, run again to resume, export, and print a greedy sample.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from llm_ray.config import DEFAULT_CORPUS, load_recipe

STOP_AT, MAX_STEPS = 150, 300


def _stage(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def run_demo(out: str = "runs/demo", prompt: str = "The import statement") -> str:
    from llm_ray.data.tokenizer import save_tokenizer, train_tokenizer
    from llm_ray.generation.sampling import greedy_tokens
    from llm_ray.train.export import export_model, load_exported
    from llm_ray.train.launcher import pretrain

    import torch

    out = os.path.abspath(out)
    shutil.rmtree(out, ignore_errors=True)  # a demo starts from nothing every time
    t0 = _stage(f"1/5 train a byte-level BPE tokenizer on {DEFAULT_CORPUS}")
    tok_path = os.path.join(out, "tokenizer.json")
    tokenizer = train_tokenizer([DEFAULT_CORPUS], "bpe", 4096)
    save_tokenizer(tokenizer, tok_path)
    print(f"vocab {tokenizer.get_vocab_size()} -> {tok_path} ({time.perf_counter() - t0:.1f}s)")

    overrides = [
        f"data.tokenizer.path={tok_path}",
        f"run.storage_path={out}/runs",
        "run.name=demo",
        f"train.max_steps={MAX_STEPS}",
        "optim.lr=3e-3",  # a 1.3M-parameter model takes a high rate; the sample shows words
        "run.progress_bar=false",
    ]
    t0 = _stage(f"2/5 pretrain the embedded default recipe; planned stop at step {STOP_AT}")
    first = pretrain(load_recipe(None, overrides + [f"run.stop_at_step={STOP_AT}"]))
    print(f"loss {first.summary['initial_loss']:.3f} -> {first.summary['final_loss']:.3f}, "
          f"checkpoint {first.summary['checkpoint']} ({time.perf_counter() - t0:.1f}s)")

    t0 = _stage("3/5 run again with the same name: resumes from the checkpoint")
    second = pretrain(load_recipe(None, overrides))
    print(json.dumps(second.summary, indent=2))
    print(f"({time.perf_counter() - t0:.1f}s)")

    t0 = _stage("4/5 export a consolidated model")
    exported = export_model(second.run_dir, os.path.join(out, "model")).summary
    print(f"{exported['params']:,} parameters, {exported['bytes']:,} bytes -> {exported['out_dir']}")

    _stage("5/5 greedy sample")
    model, tokenizer, _ = load_exported(exported["out_dir"])
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    text = tokenizer.decode(greedy_tokens(model, ids, max_new_tokens=40)[0].tolist())
    print(repr(text))
    summary = {
        "tokenizer": tok_path,
        "run_dir": second.run_dir,
        "model": exported["out_dir"],
        "initial_loss": second.summary["initial_loss"],
        "final_loss": second.summary["final_loss"],
        "resumed_from_step": first.summary["steps"],
        "sample": text,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return out
