"""``llm-ray bench ppo``: one RL run of a recipe, what each phase costs, and the rollout pool
against the serving engine alone on the same requests, in the same run.

The run is ``llm-ray ppo`` itself (a fresh run folder under a temporary directory). From its
per-iteration rows (``controller/rollout.jsonl``), the first iteration left out (start-up):
samples/s, each phase's share of an iteration (rollout, reward, reference, critic, weight
sync, update — the update being the trainers' steps while the controller waits), and the
rollout pool's generated tokens/s. The baseline: the same engine class the rollout actors run,
in this process (no Ray), generating the first timed iteration's requests — the same prompts,
sampling seeds, temperature and token limit — on the starting policy. Targets (the issue):
sync under 5% of an iteration, rollout tokens/s at least 0.8x the engine alone. Not a test.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from typing import Optional

PHASES = ("rollout_s", "reward_s", "reference_s", "critic_s", "sync_s", "update_s")


def engine_alone(model_dir: str, max_batch_size: int, requests: list, max_new_tokens: int, temperature: float) -> float:
    """Generated tokens/s of the rollout engine in this process on ``requests`` (warm-up first)."""
    from llm_ray.align.rl_actors import RolloutActor

    actor = RolloutActor(model_dir, max_batch_size)

    async def timed() -> float:
        await actor.generate(requests[:1], max_new_tokens, temperature)  # first forwards
        t0 = time.perf_counter()
        groups = await actor.generate(requests, max_new_tokens, temperature)
        return sum(len(s["token_ids"]) for g in groups for s in g) / (time.perf_counter() - t0)

    try:
        return asyncio.run(timed())
    finally:
        actor.engine.shutdown()


def bench_ppo(recipe_path: Optional[str], overrides: list[str], iterations: int = 6) -> dict:
    from rich.console import Console
    from rich.table import Table

    from llm_ray.align.ppo import ppo, sample_seed
    from llm_ray.config import load_recipe

    storage = tempfile.mkdtemp(prefix="llm-ray-bench-ppo-")
    recipe = load_recipe(recipe_path or "jobs/recipes/grpo-tiny.yaml",
                         list(overrides) + [f"align.ppo.iterations={iterations}", f"run.storage_path={storage}",
                                            "run.name=bench", "run.progress_bar=false"])
    result = ppo(recipe)
    rows = [json.loads(line) for line in open(os.path.join(storage, "bench", "controller", "rollout.jsonl"))][1:]
    if not rows:
        raise ValueError("bench ppo: needs at least 2 iterations (the first is left out)")
    c = recipe.align.ppo
    totals = [sum(r.get(k) or 0.0 for k in PHASES) for r in rows]
    mean_total = sum(totals) / len(totals)
    shares = {k: sum(r.get(k) or 0.0 for r in rows) / sum(totals) for k in PHASES}
    rollout_tps = sum(r["samples"] * r["response_length"] for r in rows) / sum(r["rollout_s"] for r in rows)

    # The baseline's requests: those of the first timed iteration, on the starting policy.
    from llm_ray.align.prompts import load_prompts
    from llm_ray.bundle import load_bundle, resolve_model_path

    init_dir = resolve_model_path(recipe.finetune.init_from)
    prompts, _ = load_prompts(recipe.finetune.train_path, load_bundle(init_dir),
                              recipe.align.max_prompt_tokens or recipe.data.seq_len // 2, recipe.finetune.system_prompt)
    k, seed = rows[0]["iteration"], recipe.train.seed
    requests = [(prompts.ids[i], [sample_seed(seed, k, int(i), j) for j in range(c.samples_per_prompt)])
                for i in rows[0]["prompt_indices"]]
    alone = engine_alone(init_dir, c.rollout_batch_size, requests, c.max_new_tokens, c.temperature)

    table = Table(title=f"bench ppo: {c.estimator}, {c.rollout_samples} samples/iteration, {len(rows)} timed iterations")
    for col in ("phase", "mean s", "share"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for key in PHASES:
        vals = [r.get(key) for r in rows if r.get(key) is not None]
        table.add_row(key.removesuffix("_s"), f"{sum(vals) / len(vals):.3f}" if vals else "-", f"{shares[key]:.1%}")
    table.add_row("iteration", f"{mean_total:.3f}", "100%")
    table.add_row("rollout pool tokens/s", f"{rollout_tps:.1f}", "")
    table.add_row("engine alone tokens/s (baseline)", f"{alone:.1f}", "")
    Console(file=sys.stdout).print(table)
    figures = {
        "estimator": c.estimator, "samples_per_iteration": c.rollout_samples, "timed_iterations": len(rows),
        "samples_per_s": c.rollout_samples / mean_total, "iteration_s": mean_total,
        **{f"{k.removesuffix('_s')}_share": round(v, 4) for k, v in shares.items()},
        "rollout_tokens_per_s": round(rollout_tps, 2), "engine_alone_tokens_per_s": round(alone, 2),
        "rollout_over_engine_alone": round(rollout_tps / alone, 3),
        "reward_first": result.summary["reward_first"], "reward_last": result.summary["reward_last"],
    }
    print(json.dumps(figures))
    return figures
