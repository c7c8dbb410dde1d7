"""``llm-ray bench privacy [RECIPE]``: the step time of DP-SGD against the same non-private step.

Two real engine runs of one recipe (default ``jobs/recipes/dp-tiny.yaml``: Ray Train, DeepSpeed,
its workers and ZeRO stage), ``--steps`` steps each, the same data, model and optimizer; the
named baseline ``non_private`` is the recipe with ``privacy.dp.enabled=false``. Tokens/s is
the engine's own mean over steps 2... (the first pays set-up). What limits DP-SGD here: the
per-example gradients (``torch.func`` vmap of grad: every example's gradient materialised,
and on CPU SDPA's backward has no vmap batching rule, so torch loops over examples there) and
their norms and clipped sum; the model runs once forward and once backward per step, as without DP.
Target (issue 14): at most 2x the non-private step.

Secure aggregation (``--parts secagg``): two federated runs of one recipe (default
``jobs/recipes/federated-tiny.yaml``), the named baseline ``plain_fedavg`` with
``federated.secure_aggregation.enabled=false``; mean round time over rounds 2... of each, and the
secure run's own measured protocol time per round (key exchange, share routing, masking,
unmasking) as a share of its round. Target: under 10% of the round time.
A benchmark, not a test. The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import tempfile

from llm_ray.config import load_recipe


def bench_privacy(recipe_path: str, overrides: list[str], steps: int = 12, parts: tuple[str, ...] = ("dp", "secagg"),
                  federated_recipe: str = "jobs/recipes/federated-tiny.yaml", rounds: int = 4) -> dict:
    figures: dict = {}
    if "dp" in parts:
        figures.update(bench_dp(recipe_path, overrides, steps))
    if "secagg" in parts:
        figures.update(bench_secagg(federated_recipe, rounds))
    print(json.dumps(figures))
    return figures


def bench_dp(recipe_path: str, overrides: list[str], steps: int) -> dict:
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
    print("what limits it: per-example gradients (vmap of grad: each example's gradient materialised, example by "
          "example where an op has no batching rule, as SDPA's backward on CPU), their norms and clipped sum; target <= 2x.")
    return {"recipe": recipe_path, "steps": steps, "baseline": "non_private", "precision": base.get("precision"),
               "non_private_tokens_per_s": base["tokens_per_s"], "dp_sgd_tokens_per_s": dp["tokens_per_s"],
               "dp_step_over_non_private": round(ratio, 3), "epsilon": dp["privacy"]["epsilon"],
               "noise_multiplier": dp["privacy"]["noise_multiplier"]}


def bench_secagg(recipe_path: str, rounds: int) -> dict:
    from llm_ray.privacy.federated import federated

    root = tempfile.mkdtemp(prefix="llm-ray-bench-secagg-")
    fixed = [f"run.storage_path={root}", "run.progress_bar=false", f"federated.rounds={rounds}", "federated.fail_client=null"]
    results = {}
    for name, enabled in (("plain_fedavg", "false"), ("secure_aggregation", "true")):
        recipe = load_recipe(recipe_path, [*fixed, f"run.name={name}", f"federated.secure_aggregation.enabled={enabled}"])
        results[name] = federated(recipe).summary

    def round_s(summary):  # round 1 pays the clients' first steps
        times = [h["round_s"] for h in summary["history"][1:]] or [summary["history"][0]["round_s"]]
        return sum(times) / len(times)

    plain, secure = results["plain_fedavg"], results["secure_aggregation"]
    ratio = round_s(secure) / round_s(plain)
    print(f"\n{'run':<20}{'round s':>10}{'x plain':>10}{'protocol share':>16}{'held-out loss':>15}")
    print(f"{'plain_fedavg':<20}{round_s(plain):>10.2f}{1:>10.2f}{'-':>16}{plain['heldout_loss_final']:>15.4f}")
    print(f"{'secure_aggregation':<20}{round_s(secure):>10.2f}{ratio:>10.2f}{secure['mean_secagg_share']:>16.1%}"
          f"{secure['heldout_loss_final']:>15.4f}")
    print("what limits it: each client derives (clients - 1) pairwise masks plus its own, an AES-CTR keystream "
          "as long as the model, and the server re-derives the self masks; target < 10% of the round.")
    return {"federated_recipe": recipe_path, "rounds": rounds, "secagg_baseline": "plain_fedavg",
            "plain_round_s": round(round_s(plain), 3), "secure_round_s": round(round_s(secure), 3),
            "secure_round_over_plain": round(ratio, 3), "secagg_share_of_round": round(secure["mean_secagg_share"], 4)}
