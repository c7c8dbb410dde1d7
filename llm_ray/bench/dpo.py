"""``llm-ray bench dpo``: tokens/s of a DPO step against an SFT step on the same model and tokens.

One run, one machine, one model folder, the same preference pairs:

- baseline ``sft``: the SFT objective on the chosen and rejected rows as 2B plain rows per step,
  so it trains on exactly the tokens a DPO step of B pairs sees;
- ``dpo_frozen_copy``: DPO with the reference policy as a frozen copy on the worker;
- ``dpo_precomputed``: DPO with reference log-probs computed once before training (that pass
  is timed apart and reported, not hidden).

Each is a real engine run (Ray Train, DeepSpeed, 1 worker) of ``--steps`` steps; tokens/s is
the engine's own mean over steps 2... A DPO step does one trained forward+backward over the 2B
rows plus, with a frozen copy, one reference forward: about 4 units of work against SFT's 3, so
~0.75x is what the frozen copy should reach and ~1.0x precomputed log-probs; the bench prints
the measured share of the reference forward. A benchmark, not a test: nothing here asserts a
speed. The last line printed is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time

from llm_ray.config import load_recipe


def _default_model(root: str) -> str:
    """A small random decoder folder (tokenizer trained on the bundled corpus) when the recipe's
    ``init_from`` does not exist yet: the bench then runs on a fresh machine too."""
    import torch

    from llm_ray.bundle import save_bundle
    from llm_ray.config import DEFAULT_CORPUS, ModelConfig
    from llm_ray.data.tokenizer import train_tokenizer
    from llm_ray.models import build_model

    tok = train_tokenizer([DEFAULT_CORPUS], "bpe", 2048)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=256, n_layers=4, n_heads=4, max_seq_len=256)
    torch.manual_seed(0)
    out = os.path.join(root, "model")
    save_bundle(build_model(cfg), cfg, tok.to_str(), out, tokenizer_config={"eos_token": "<|im_end|>", "pad_token": "<|pad|>"})
    return out


def _run(tuned, name: str, spec, objective, arrays: dict) -> dict:
    from llm_ray.data.source import ArraySource

    variant = dataclasses.replace(tuned, recipe=tuned.recipe.replace(f"run.name={name}"), run=tuned.storage.child(name))
    return variant.train(spec, objective, ArraySource(arrays, tuned.recipe.train.seed))


def bench_dpo(recipe_path: str, overrides: list[str], steps: int = 10) -> dict:
    import numpy as np

    from llm_ray.align.dpo import precompute_reference
    from llm_ray.align.objectives import DPO
    from llm_ray.align.reward import preference_data
    from llm_ray.finetune.objectives import SFTChat
    from llm_ray.train import tuning
    from llm_ray.train.launcher import _use_gpu, ensure_ray

    root = tempfile.mkdtemp(prefix="llm-ray-bench-dpo-")
    recipe = load_recipe(recipe_path, overrides)
    if not os.path.exists(recipe.finetune.init_from) and recipe.finetune.init_from not in ("smollm2", "minilm"):
        print(f"{recipe.finetune.init_from} not found: using a random 4-layer d=256 decoder", file=sys.stderr)
        overrides = [*overrides, f"finetune.init_from={_default_model(root)}"]
    fixed = [f"run.storage_path={root}/runs", "run.progress_bar=false", f"train.max_steps={steps}",
             f"checkpoint.every_steps={steps}", "finetune.lora.r=0", "align.dpo.precompute_reference=false"]
    tuned = tuning.start(load_recipe(recipe_path, overrides + fixed), "bench dpo", arch="decoder")
    r, d = tuned.recipe, tuned.recipe.align.dpo
    train, _, _, _ = preference_data(tuned)
    pairs = train.arrays()
    spec, ref_spec = tuned.spec([tuned.init_weights]), tuned.spec([tuned.init_weights])
    ensure_ray()

    # SFT baseline: the same rows, chosen and rejected interleaved as one set of plain examples
    rows = {"input_ids": np.concatenate([pairs["chosen_input_ids"], pairs["rejected_input_ids"]]),
            "labels": np.concatenate([pairs["chosen_labels"], pairs["rejected_labels"]])}
    t = r.train
    sft_tuned = dataclasses.replace(tuned, recipe=r.replace(f"train.global_batch_size={2 * t.global_batch_size}",
                                                            f"train.micro_batch_size={2 * t.micro_batch_size}"))
    results = {"sft": _run(sft_tuned, "sft", spec, SFTChat(), rows)}
    results["dpo_frozen_copy"] = _run(tuned, "dpo-frozen", spec, DPO(d.beta, d.loss, d.label_smoothing, "frozen_copy", ref_spec), pairs)
    started = time.time()
    pre = precompute_reference(ref_spec, pairs, d.loss == "ipo", r, _use_gpu(r))
    precompute_s = time.time() - started
    results["dpo_precomputed"] = _run(tuned, "dpo-precomputed", spec, DPO(d.beta, d.loss, d.label_smoothing, "precomputed"),
                                      {**pairs, **pre})

    base = results["sft"]["tokens_per_s"]
    print(f"\n{'objective':<18}{'tokens/s':>12}{'vs sft':>9}{'step s':>9}   precision {results['sft']['precision']}")
    for name, s in results.items():
        step_s = s["last_step_metrics"].get("step_s", float("nan"))
        print(f"{name:<18}{s['tokens_per_s']:>12.0f}{s['tokens_per_s'] / base:>9.2f}{step_s:>9.3f}")
    # Mean step seconds (same tokens per step on all three): where a DPO step's time goes.
    step = {name: 1 / s["tokens_per_s"] for name, s in results.items()}
    ref_share = (step["dpo_frozen_copy"] - step["dpo_precomputed"]) / step["dpo_frozen_copy"]
    dpo_extra = step["dpo_precomputed"] / step["sft"] - 1
    print(f"reference log-probs precomputed in {precompute_s:.2f} s for {len(train)} pairs (one pass, reused every epoch)")
    print(f"what limits it: the reference forward is {ref_share:.0%} of a frozen-copy DPO step (a forward is ~1/3 "
          f"of forward+backward: ~25% expected); DPO's own work beyond SFT's (two log-prob gathers, the pair "
          f"concat) costs {dpo_extra:+.0%} of an SFT step")
    figures = {
        "model": r.finetune.init_from,
        "seq_len": r.data.seq_len,
        "pairs_per_step": t.global_batch_size,
        "steps": steps,
        "precision": results["sft"]["precision"],
        **{f"{name}_tokens_per_s": s["tokens_per_s"] for name, s in results.items()},
        "precompute_reference_s": precompute_s,
        "reference_forward_share": ref_share,
        "dpo_extra_over_sft": dpo_extra,
        "dpo_frozen_copy_over_sft": results["dpo_frozen_copy"]["tokens_per_s"] / base,
        "dpo_precomputed_over_sft": results["dpo_precomputed"]["tokens_per_s"] / base,
    }
    print(json.dumps(figures))
    return figures
