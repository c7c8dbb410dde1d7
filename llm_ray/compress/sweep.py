"""``llm-ray compress sweep SPEC``: a Ray Tune experiment over compression methods and their
hyperparameters, and the size / quality Pareto front of its trials.

Each trial is ``compress_stage`` on one spec (its model folder in the trial's folder) and
reports held-out perplexity, bytes and tokens/s to Tune. Trials that train (distill, qat)
build their ``TorchTrainer`` inside the trial function, as Ray 2.x expects of Tune over Train,
with the engine run (checkpoints, metrics) in the trial's folder. One-shot methods have nothing for an
early-stopping scheduler to stop, so the search is a grid with Tune's default FIFO scheduler.
The experiment folder (``storage_path/name``) holds Tune's state and logs (progress.csv,
result.json, TensorBoard events: what the Tune dashboard reads); running the same command
again after an interruption restores it (``Tuner.restore``) and runs only what had not finished.
"""

from __future__ import annotations

import json
import os
import time

from llm_ray.stage import StageResult, write_summary

REPORTED = ("perplexity", "next_token_accuracy", "bytes", "params", "nonzeros", "tokens_per_s_b1", "tokens_per_s_b16")


def compress_trial(config: dict) -> None:
    """The Tune trainable: one compress spec (the base spec's fields plus this trial's)."""
    from ray import tune

    from llm_ray.compress.stage import compress_stage
    from llm_ray.config import from_dict
    from llm_ray.config.compress import CompressSpec

    # Relative paths (the spec's, a training recipe's data and run folder) mean what they meant
    # where the command ran: Tune starts each trial in its own folder.
    os.chdir(config["cwd"])
    trial_dir = tune.get_context().get_trial_dir()
    spec = from_dict(CompressSpec, {**config["base"], **config["trial"]})
    if spec.method in ("distill", "qat"):  # a trial that trains keeps its engine run in its own folder
        spec.train_set = [*spec.train_set, f"run.storage_path={trial_dir}", "run.name=train"]
    out = os.path.join(trial_dir, "model")
    s = compress_stage(spec, out).summary
    tune.report({**{k: v for k, v in s["after"].items() if k in REPORTED},
                 **{k: v for k, v in s.items() if k.endswith("_ratio")}, "model_dir": out})


def pareto_front(rows: list[dict], objectives: list[str]) -> list[dict]:
    """The rows no other row beats on every objective (all minimised), by the first objective."""
    def dominated(r):
        return any(all(o[k] <= r[k] for k in objectives) and any(o[k] < r[k] for k in objectives) for o in rows)
    return sorted((r for r in rows if not dominated(r)), key=lambda r: r[objectives[0]])


def trial_label(trial: dict) -> str:
    """``key=value`` of the trial's overrides; a training trial's ``train_set`` as its count (the
    full lists are in pareto.json)."""
    return " ".join(f"{k}=[{len(v)} overrides]" if k == "train_set" else f"{k}={v}" for k, v in trial.items())


def write_front(folder: str, rows: list[dict], front: list[dict], objectives: list[str]) -> dict:
    """pareto.md (every trial, the front marked), pareto.json and pareto.png in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    x, y = objectives[1], objectives[0]
    on_front = {id(r) for r in front}
    lines = [f"| trial | {y} | {x} | size ratio | perplexity ratio | tokens/s b1 | front |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: r[x]):
        lines.append(f"| {r['label']} | {r[y]:.4g} | {r[x]:,} | {r.get('size_ratio', 0):.2f} | {r.get('perplexity_ratio', 0):.3f} | "
                     f"{r.get('tokens_per_s_b1', 0):.1f} | {'yes' if id(r) in on_front else ''} |")
    paths = {"table": os.path.join(folder, "pareto.md"), "json": os.path.join(folder, "pareto.json"),
             "plot": os.path.join(folder, "pareto.png")}
    with open(paths["table"], "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(paths["json"], "w") as f:
        json.dump({"objectives": objectives, "trials": rows, "front": [r["label"] for r in front]}, f, indent=2)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r[x] for r in rows], [r[y] for r in rows], color="0.6", label="trials")
    ax.plot([r[x] for r in sorted(front, key=lambda r: r[x])], [r[y] for r in sorted(front, key=lambda r: r[x])],
            "o-", color="C3", label="Pareto front")
    for r in front:
        ax.annotate(r["label"], (r[x], r[y]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(x), ax.set_ylabel(y), ax.legend()
    ys = [r[y] for r in rows]
    if max(ys) > 10 * min(ys):  # a log axis only where the spread needs one (pruning can cost 100x)
        ax.set_yscale("log")
    ax.set_title("compression sweep: size vs held-out quality")
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=120)
    plt.close(fig)
    return paths


def sweep_stage(spec, sweep) -> StageResult:
    from ray import tune

    from llm_ray.train.launcher import ensure_ray

    started = time.time()
    ensure_ray()
    storage = os.path.abspath(sweep.storage_path)
    folder = os.path.join(storage, sweep.name)
    trainable = tune.with_resources(compress_trial, {"cpu": sweep.cpus_per_trial})
    restored = tune.Tuner.can_restore(folder)
    if restored:  # an interrupted sweep: finished trials keep their results, the rest run
        tuner = tune.Tuner.restore(folder, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"base": spec.to_dict(), "trial": tune.grid_search(sweep.trials()), "cwd": os.getcwd()},
            tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent_trials),
            run_config=tune.RunConfig(storage_path=storage, name=sweep.name),
        )
    results = tuner.fit()
    rows = [{"label": trial_label(r.config["trial"]), "trial": r.config["trial"],
             **{k: v for k, v in r.metrics.items() if k in REPORTED or k.endswith("_ratio") or k == "model_dir"}}
            for r in results if r.error is None and r.metrics]
    errors = [str(r.error) for r in results if r.error is not None]
    front = pareto_front(rows, list(sweep.objectives))
    paths = write_front(folder, rows, front, list(sweep.objectives))
    summary = {"out_dir": folder, "trials": len(results), "finished": len(rows), "errors": errors, "restored": restored,
               "objectives": list(sweep.objectives), "front": [r["label"] for r in front], **paths,
               "wall_s": round(time.time() - started, 2)}
    return write_summary(folder, summary)
