"""``llm-ray bench privacy [RECIPE]``: the step time of DP-SGD against the same non-private step.

Two real engine runs of one recipe (default ``jobs/recipes/dp-tiny.yaml``: Ray Train, DeepSpeed,
its workers and ZeRO stage), ``--steps`` steps each, the same data, model and optimizer; the
named baseline ``non_private`` is the recipe with ``privacy.dp.enabled=false``. Tokens/s is
the engine's own mean over steps 2... (the first pays set-up). What limits DP-SGD here: the
per-example norm pass (``torch.func`` vmap of grad: a second forward and backward, per example)
and, on CPU, SDPA having no vmap batching rule (torch falls back to a loop over examples).
Target (issue 14): at most 2x the non-private step. A benchmark, not a test. The last line
printed is one JSON object.
"""

from __future__ import annotations

import json
import tempfile

from llm_ray.config import load_recipe


def bench_privacy(recipe_path: str, overrides: list[str], steps: int = 12) -> dict:
    from llm_ray.train.launcher import pretrain

    root = tempfile.mkdtemp(prefix="llm-ray-bench-privacy-")
    fixed = [f"run.storage_path={root}", "run.progress_bar=false", f"train.max_steps={steps}", f"checkpoint.every_steps={steps}"]
    results = {}
    for name, extra in (("non_private", ["privacy.dp.enabled=false"]), ("dp_sgd", [])):
        recipe = load_recipe(recipe_path, [*overrides, *fixed, f"run.name={name}", *extra])
        results[name] = pretrain(recipe).summary
    base, dp = results["non_private"], results["dp_sgd"]
    ratio = base["tokens_per_s"] / dp["tokens_per_s"]  # same tokens per step: the step-time ratio
    print(f"\n{'run':<14}{'tokens/s':>12}{'step time x':>14}{'final loss':>12}{'epsilon':>10}")
    print(f"{'non_private':<14}{base['tokens_per_s']:>12.0f}{1:>14.2f}{base['final_loss']:>12.4f}{'-':>10}")
    print(f"{'dp_sgd':<14}{dp['tokens_per_s']:>12.0f}{ratio:>14.2f}{dp['final_loss']:>12.4f}{dp['privacy']['epsilon']:>10.2f}")
    print("what limits it: the per-example norm pass (vmap of grad: one more forward+backward, example by example where "
          "an op has no batching rule, as SDPA on CPU); target <= 2x. Secure aggregation is not built yet.")
    figures = {"recipe": recipe_path, "steps": steps, "baseline": "non_private", "precision": base.get("precision"),
               "non_private_tokens_per_s": base["tokens_per_s"], "dp_sgd_tokens_per_s": dp["tokens_per_s"],
               "dp_step_over_non_private": round(ratio, 3), "epsilon": dp["privacy"]["epsilon"],
               "noise_multiplier": dp["privacy"]["noise_multiplier"]}
    print(json.dumps(figures))
    return figures
