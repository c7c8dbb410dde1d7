"""``llm-ray federated RECIPE``: federated training on Ray actors, optionally with secure
aggregation and client-level DP.

The driver is the server. It holds the global model, launches ``federated.clients``
``FederatedClientActor``s through the pool launcher (``RayActorGroup``: one placement group,
replacement of dead actors), and runs ``federated.rounds`` rounds: the global weights go out,
each client takes ``local_steps`` steps on the shard only it reads, and the server applies the
sample-weighted mean of the updates (FedAvg; FedProx is the clients' proximal term). With
``secure_aggregation`` the server receives masked integers and learns only their sum
(``secagg.py``). A client that dies or times out is left out of its round (the round goes on
while ``min_clients`` remain) and replaced before the next. After every round the server scores
the global model on held-out text; the final model is a model folder (``model/``) that eval,
compress and serve read.

Written on Ray actors rather than Flower: Flower's simulation engine runs its own Ray backend
and its SecAgg+ lives in Flower's runtime, while our clients must train with the one engine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np

from llm_ray.config import Recipe, RecipeError
from llm_ray.privacy.federated_client import FederatedClientActor
from llm_ray.privacy.secagg import SecAggServer, decode
from llm_ray.stage import StageResult

logger = logging.getLogger("llm_ray.federated")


def check_federated(recipe: Recipe) -> None:
    """What a one-process client engine cannot honour, named by key, before Ray starts."""
    p, t, fed = recipe.parallel, recipe.train, recipe.federated
    checks = [
        (t.objective == "causal_lm", "train.objective", "federated training runs causal_lm"),
        (recipe.data.source != "shards", "data.source", "federated clients read their shard from data.paths (text files)"),
        (p.num_workers == 1 and p.pipeline_stages == 1, "parallel.num_workers", "each federated client is one process: set 1"),
        (p.zero_stage == 0, "parallel.zero_stage", "federated clients load the global weights into their parameters: ZeRO 0"),
        (t.precision in ("fp32", "auto"), "train.precision", "federated clients train in fp32 (the global weights are fp32)"),
        (not recipe.privacy.dp.enabled, "privacy.dp.enabled", "use federated.client_dp for differential privacy of the updates"),
        (not recipe.model.moe.enabled, "model.moe.num_experts", "federated training of MoE models is not supported"),
        (bool(fed.heldout), "federated.heldout", "name a held-out text file the server scores the global model on"),
        (recipe.run.storage_path and not recipe.run.storage_path.startswith("s3://"), "run.storage_path",
         "federated training writes a local run folder"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise RecipeError(key, message)
    if not os.path.isfile(fed.heldout):
        raise RecipeError("federated.heldout", f"{fed.heldout!r} is not a file")


def client_recipe(recipe: Recipe) -> Recipe:
    """The recipe each client's engine is built from: its learning-rate schedule spans all of
    its local steps (rounds x local_steps)."""
    fed = recipe.federated
    return recipe.replace(f"train.max_steps={fed.rounds * fed.local_steps}", "train.precision=fp32")


def heldout_ids(tokenizer, path: str, tokens: int) -> list[int]:
    from llm_ray.data.text_files import read_documents
    from llm_ray.data.tokenizer import encode_documents

    ids = [i for doc in encode_documents(tokenizer, read_documents([path])) for i in doc]
    if len(ids) < 2:
        raise RecipeError("federated.heldout", f"{path} holds no text")
    return ids[:tokens]


def heldout_loss(model, ids: list[int], window: int) -> float:
    """Mean token NLL (nats) of the held-out tokens (eval's sliding-window perplexity)."""
    from llm_ray.eval.perplexity import perplexity

    return perplexity(model, ids, window, window, batch_size=8)["nll_per_token"]


class _Clients:
    """The pool plus fault handling: calls that answer, and who dropped and why."""

    def __init__(self, pool, timeout_s: float):
        self.pool, self.timeout_s = pool, timeout_s
        self.dead: dict[int, BaseException] = {}

    def gather(self, calls: dict[int, tuple], dropped: dict[int, str]) -> dict:
        """{client: (method, *args)} -> {client: result} for those that answered in time."""
        import ray

        refs = {i: self.pool.remote(i, method, *args) for i, (method, *args) in calls.items()}
        deadline = time.monotonic() + self.timeout_s
        out = {}
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError as e:
                dropped[i] = "timed out"
                ray.kill(self.pool.actors[i], no_restart=True)  # a straggler is treated as gone
                self.dead[i] = e
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                dropped[i] = "died"
                self.dead[i] = e
        return out

    def revive(self) -> list[int]:
        """Replace every client that died in the last round (``setup`` runs on the new one)."""
        revived = sorted(self.dead)
        for i in revived:
            self.pool.replace(i, self.dead.pop(i))
        return revived


def plain_round(clients: _Clients, r: int, weights_ref, fail: dict, dropped: dict) -> tuple[np.ndarray | None, dict, dict]:
    res = clients.gather({i: ("train", r, weights_ref, fail.get(i, False)) for i in range(len(clients.pool.actors))}, dropped)
    if not res:
        return None, res, {}
    return np.sum([out["payload"] for out in res.values()], axis=0), res, {}


def secure_round(clients: _Clients, r: int, weights_ref, fail: dict, dropped: dict, fed) -> tuple[np.ndarray | None, dict, dict]:
    """The four steps of ``secagg.py``; returns the decoded sum of what arrived."""
    t0 = time.perf_counter()
    everyone = range(len(clients.pool.actors))
    keys = clients.gather({i: ("advertise_keys", r) for i in everyone}, dropped)
    if len(keys) < fed.min_clients:
        return None, {}, {}
    server = SecAggServer(r, fed.threshold, keys)
    outgoing = clients.gather({i: ("share_keys", r, keys, fed.threshold) for i in keys}, dropped)
    shared = sorted(outgoing)
    incoming = server.route(outgoing)
    received = clients.gather({v: ("receive_shares", r, incoming[v]) for v in shared}, dropped)
    setup_s = time.perf_counter() - t0
    res = clients.gather({v: ("train_masked", r, weights_ref, shared, fail.get(v, False)) for v in received}, dropped)
    if len(res) < fed.min_clients:
        return None, res, {}
    t1 = time.perf_counter()
    alive, gone = sorted(res), sorted(set(shared) - set(res))
    shares = clients.gather({u: ("unmask_shares", r, alive, gone) for u in alive}, dropped)
    total = server.aggregate({i: res[i]["masked"] for i in alive}, shares, shared)
    unmask_s = time.perf_counter() - t1
    secagg_s = setup_s + unmask_s + max(out["mask_s"] for out in res.values())  # clients mask in parallel
    return decode(total, fed.secure_aggregation.frac_bits), res, {"secagg_s": secagg_s, "unmask_s": unmask_s,
                                                                   "unmasked_dropped": gone}


def federated(recipe: Recipe) -> StageResult:
    """Run the recipe's federated training; returns the run folder and its summary."""
    from llm_ray.align.pools import RayActorGroup
    from llm_ray.config.align import PoolConfig
    from llm_ray.data.tokenizer import ensure_tokenizer
    from llm_ray.storage import resolve_storage
    from llm_ray.train.launcher import ensure_ray

    check_federated(recipe)
    fed = recipe.federated
    run = resolve_storage(recipe.run.storage_path).child(recipe.run.name)
    if os.path.exists(os.path.join(run.root, "summary.json")):
        raise RecipeError("run.name", f"{run.uri} already holds a finished federated run; choose another run.name")
    tokenizer = ensure_tokenizer(recipe.data.tokenizer, recipe.data.paths)  # public vocabulary, trained once if missing
    cfg = dataclasses.replace(recipe.model, vocab_size=recipe.model.vocab_size or tokenizer.get_vocab_size())
    ids = heldout_ids(tokenizer, fed.heldout, fed.heldout_blocks * recipe.data.seq_len)
    ensure_ray()
    from llm_ray.models.converters import ModelSpec

    spec = ModelSpec.of(cfg, seed=recipe.train.seed)
    model = spec.build().eval()
    os.makedirs(run.root, exist_ok=True)
    run.write_text("recipe.yaml", recipe.to_yaml())

    def setup(pool, i):  # a replacement becomes client i again: same shard, fresh engine
        import ray

        infos[i] = ray.get(pool.remote(i, "setup", i), timeout=fed.client_timeout_s)

    infos: dict[int, dict] = {}
    pool = RayActorGroup("federated-clients", FederatedClientActor, PoolConfig(fed.clients, fed.cpus_per_client),
                         args=(client_recipe(recipe).to_dict(), spec, tokenizer.to_str()), timeout_s=fed.client_timeout_s,
                         max_restarts=fed.rounds * fed.clients, on_replace=setup)
    try:
        for i in range(fed.clients):
            setup(pool, i)
        summary = _rounds(recipe, model, ids, _Clients(pool, fed.client_timeout_s), run, infos)
    finally:
        pool.shutdown()
    summary["model_dir"] = _save_model(model, cfg, tokenizer, run, recipe)
    run.write_text("summary.json", json.dumps(summary, indent=2))
    return StageResult(run.uri, summary)


def _rounds(recipe: Recipe, model, ids: list[int], clients: _Clients, run, infos: dict) -> dict:
    import ray
    import torch
    from torch.nn.utils import parameters_to_vector

    from llm_ray.privacy.federated_client import load_vector

    from llm_ray.train.dp import epsilon
    from llm_ray.train.metrics import MetricsLogger

    fed, window = recipe.federated, recipe.data.seq_len
    params = [p for p in model.parameters() if p.requires_grad]
    weights = parameters_to_vector(params).detach().double().numpy()
    initial = heldout_loss(model, ids, window)
    log = MetricsLogger(run, 0, fed.rounds, recipe.run.progress_bar, 1, "federated")
    history, started = [], time.perf_counter()
    for r in range(1, fed.rounds + 1):
        revived = clients.revive()  # a replacement's start-up is not part of the round it joins
        t0, dropped = time.perf_counter(), {}
        weights_ref = ray.put(weights.astype(np.float32))
        fail = {fed.fail_client: True} if fed.fail_client is not None and r == fed.fail_round else {}
        if fed.secure_aggregation.enabled:
            total, res, extra = secure_round(clients, r, weights_ref, fail, dropped, fed)
        else:
            total, res, extra = plain_round(clients, r, weights_ref, fail, dropped)
        applied = total is not None and len(res) >= fed.min_clients
        if applied:  # the weighted mean update: sum(w_k * delta_k) / sum(w_k)
            weights = weights + fed.server_lr * total[:-1] / total[-1]
            load_vector(params, torch.from_numpy(weights).float())
        else:
            logger.warning("round %d: %d updates arrived, fewer than min_clients (%d); the global model stays", r,
                           len(res), fed.min_clients)
        loss = heldout_loss(model, ids, window)
        row = {"round": r, "heldout_loss": loss, "clients": sorted(res), "dropped": dropped, "revived": revived,
               "applied": applied, "client_loss": float(np.mean([o["loss"] for o in res.values()])) if res else None,
               "update_norm": float(np.mean([o["update_norm"] for o in res.values()])) if res else None,
               "round_s": time.perf_counter() - t0, **extra}
        if "secagg_s" in row:
            row["secagg_share"] = row["secagg_s"] / row["round_s"]
        history.append(row)
        log.log(r, {"loss": loss, **{k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}})
    log.close()
    dp = fed.client_dp
    summary = {
        "run_dir": run.uri, "rounds": fed.rounds, "clients": fed.clients, "strategy": fed.strategy, "split": fed.split,
        "dirichlet_alpha": fed.dirichlet_alpha if fed.split == "dirichlet" else None,
        "secure_aggregation": fed.secure_aggregation.enabled, "threshold": fed.threshold,
        "heldout_loss_initial": initial, "heldout_loss_final": history[-1]["heldout_loss"],
        "client_shards": [infos[i] for i in sorted(infos)], "history": history,
        "mean_round_s": float(np.mean([h["round_s"] for h in history])),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    if fed.secure_aggregation.enabled:
        summary["mean_secagg_share"] = float(np.mean([h["secagg_share"] for h in history if "secagg_share" in h]))
    if dp.enabled:  # every client takes part in every round: sample rate 1, one Gaussian mechanism per round
        summary["client_dp"] = {"epsilon": epsilon(dp.noise_multiplier, 1.0, fed.rounds, dp.delta, "rdp") if dp.noise_multiplier else float("inf"),
                                "delta": dp.delta, "noise_multiplier": dp.noise_multiplier, "clip_norm": dp.clip_norm}
    return summary


def _save_model(model, cfg, tokenizer, run, recipe: Recipe) -> str:
    from llm_ray.bundle import save_bundle

    out = os.path.join(run.root, "model")
    save_bundle(model, cfg, tokenizer.to_str(), out, provenance={"federated": {"rounds": recipe.federated.rounds,
                                                                                 "clients": recipe.federated.clients}})
    return out
