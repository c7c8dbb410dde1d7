"""``llm-ray generate``: arguments and the command, kept out of ``cli.py`` to keep that file small.

    llm-ray generate smollm2 --prompt "What is the capital of France?" --chat
    llm-ray generate models/tiny --prompt "The import" --num-beams 4 --length-penalty 0.8
    llm-ray generate smollm2 --prompt "Once" --temperature 0.8 --top-p 0.9 --seed 1 --stop "."

Sampling is on when any of --temperature / --top-k / --top-p is given (a temperature of 0
means greedy). With --out the results go to ``summary.json`` there and the folder is printed
last; without it each result's text is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DTYPES = ("fp32", "bf16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder (llm-ray export / import) or packaged name (smollm2)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--early-stopping", default="false", choices=["true", "false", "never"])
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); output is cut before it")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (reference path)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--out", default=None, help="folder for summary.json")


def config_from_args(args):
    """GenerationConfig from the flags; bad values raise ValueError naming the field."""
    from llm_ray.generation.config import GenerationConfig

    sample = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=0 if args.top_k is None else args.top_k,
        top_p=1.0 if args.top_p is None else args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        early_stopping={"true": True, "false": False}.get(args.early_stopping, args.early_stopping),
        num_return_sequences=args.num_return_sequences,
    )


def run(args) -> None:
    try:
        config = config_from_args(args)  # before the model loads
    except ValueError as e:
        print(f"llm-ray generate: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    import dataclasses

    import torch

    from llm_ray.bundle import load_bundle
    from llm_ray.generation.api import generate
    from llm_ray.train.device import local_device

    device = local_device()
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    bundle = load_bundle(args.model, device=device, dtype=dtype)
    start = time.perf_counter()
    results = generate(bundle, args.prompt, config, chat=args.chat or None, use_cache=not args.no_cache)
    seconds = time.perf_counter() - start
    for r in results:
        print(r.text)
        for alt in r.alternatives:
            print(f"  [{alt.score:.3f}] {alt.text}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        summary = {
            "model": bundle.path,
            "config": dataclasses.asdict(config),
            "seconds": round(seconds, 3),
            "generated_tokens": sum(r.num_generated_tokens for r in results),
            "results": [dataclasses.asdict(r) for r in results],  # alternatives nest as dicts
        }
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(os.path.abspath(args.out))
