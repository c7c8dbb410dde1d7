"""``llm-ray ppo``: RL from a reward on separate Ray actor pools, driven from here.

The driver is the single controller. Per iteration k it waits for policy weights k from the
trainer (through the ``ExperienceHubActor``), pushes them to the rollout pool, samples
``samples_per_prompt`` completions of the iteration's prompts there (our serving engine),
scores them in the reward pool, gets the reference pool's log-probs (and, for PPO, the critic
pool's values), turns rewards into advantages (PPO: GAE over per-token rewards; GRPO: relative
to the prompt's group) and hands the experience to the hub. The policy — and PPO's critic —
train on the engine (Ray Train + DeepSpeed, the ``PolicyGradient`` / ``ValueRegression``
objectives and an ``ExperienceSource``), each a run in a thread of this process.

Everything an iteration uses is a function of the seed, k and weights k — the prompts, each
sample's sampling seed, the minibatch order — so a stopped run, rerun, continues from its last
checkpoint with the same numbers; the KL controller's state is saved per iteration next to
the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time

import numpy as np

from llm_ray.config import Recipe, RecipeError
from llm_ray.config.loader import check
from llm_ray.stage import StageResult, write_summary

logger = logging.getLogger("llm_ray.rl")
CONTROLLER_DIR = "controller"
POOL_OF = {"policy": "rollout", "critic": "critic"}  # which pool runs each trained model  # per-iteration controller state and rollout metrics in the run folder


class AdaptiveKLController:
    """Ziegler et al. 2019: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon); fixed when target is 0."""

    def __init__(self, coef: float, target: float = 0.0, horizon: int = 10000):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.coef *= 1 + error * n_samples / self.horizon


def derived_recipe(recipe: Recipe) -> Recipe:
    """Train keys that follow from the RL section: one optimizer step per minibatch, the
    checkpoints at iteration ends (the trainer restarts at an iteration's first step)."""
    c, p = recipe.align.ppo, recipe.parallel
    spi, every = c.steps_per_iteration, recipe.checkpoint.every_steps
    minibatch = c.rollout_samples // c.minibatches
    check(minibatch % (p.num_workers * recipe.train.micro_batch_size) == 0, "train.micro_batch_size",
          f"a minibatch has {minibatch} samples: it must split evenly into {p.num_workers} workers x micro batches of "
          f"{recipe.train.micro_batch_size}")
    stop = recipe.run.stop_at_step
    check(not stop or stop % spi == 0, "run.stop_at_step", f"must end an iteration (a multiple of {spi} steps)")
    return recipe.replace(f"train.global_batch_size={minibatch}", f"train.max_steps={c.iterations * spi}",
                          f"checkpoint.every_steps={max(1, math.ceil(every / spi)) * spi}")


def check_rl_recipe(recipe: Recipe, max_prompt: int) -> None:
    c = recipe.align.ppo
    check(bool(c.reward.kind), "align.ppo.reward", "give a reward source: function (module:function), model (a folder) or url")
    check(max_prompt + c.max_new_tokens <= recipe.data.seq_len + 1, "align.ppo.max_new_tokens",
          f"{c.max_new_tokens} new tokens after prompts of up to {max_prompt} exceed data.seq_len ({recipe.data.seq_len}) + 1")
    check(recipe.data.seq_len < recipe.model.max_seq_len, "data.seq_len", f"must be < the model's max_seq_len ({recipe.model.max_seq_len})")
    check(c.kl_target == 0 or c.kl_placement == "reward", "align.ppo.kl_target", "the adaptive KL controller moves the reward's KL term: set kl_in: reward")
    from llm_ray.align.rl_actors import resolve_reward_function

    for key, source in (("reward", c.reward), ("judge", c.judge)):
        if source.kind == "function":
            try:
                resolve_reward_function(source.function)
            except ValueError as e:
                raise RecipeError(f"align.ppo.{key}.function", str(e)) from None
        elif source.kind == "model" and not os.path.isdir(source.model):
            raise RecipeError(f"align.ppo.{key}.model", f"{source.model} is not a folder written by `llm-ray reward`")


def check_cluster_cpus(recipe: Recipe, trainers: int) -> None:
    """Every trainer's workers and every pool reserve CPUs at once: on a cluster that cannot
    hold them all a trainer would wait for its workers forever. A local cluster cannot grow,
    so that is a recipe error; a remote one may autoscale, so it is a warning."""
    import ray

    c, p = recipe.align.ppo, recipe.parallel
    pools = [c.rollout, c.reward_pool, c.reference] + ([c.critic] if trainers > 1 else [])
    needed = trainers * p.num_workers * p.cpus_per_worker + sum(q.num_actors * q.num_cpus for q in pools)
    have = ray.cluster_resources().get("CPU", 0)
    if needed <= have:
        return
    message = (f"the run reserves {needed:g} CPUs ({trainers} trainer(s) x {p.num_workers} worker(s) x "
               f"{p.cpus_per_worker} + the pools' num_actors x num_cpus), the cluster has {have:g}; "
               "lower align.ppo.<pool>.num_cpus (0 is allowed) or parallel.cpus_per_worker")
    if os.environ.get("RAY_ADDRESS"):
        logger.warning("%s (waiting for the autoscaler)", message)
    else:
        raise RecipeError("align.ppo.rollout.num_cpus", message)


def sample_seed(seed: int, iteration: int, prompt: int, sample: int) -> int:
    """Each sample's own sampling seed: a rerun of iteration k draws the same tokens."""
    return int(np.random.SeedSequence([seed, iteration, prompt, sample]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def experience_rows(prompt_ids: list[int], token_ids: list[int], logprobs: list[float], seq_len: int, pad_id: int):
    """One sample -> input_ids (T,), labels (T,) and old log-probs (T,), T = seq_len; position t
    predicts token t+1, so response token j sits at label position len(prompt) - 1 + j."""
    from llm_ray.models.losses import IGNORE_INDEX

    seq = np.full(seq_len + 1, pad_id, np.int64)
    seq[:len(prompt_ids)] = prompt_ids
    seq[len(prompt_ids):len(prompt_ids) + len(token_ids)] = token_ids
    labels = np.full(seq_len, IGNORE_INDEX, np.int64)
    start = len(prompt_ids) - 1
    labels[start:start + len(token_ids)] = token_ids
    old = np.zeros(seq_len, np.float32)
    old[start:start + len(token_ids)] = logprobs
    return seq[:-1], labels, old


class Controller:
    """The loop over iterations: pools in, experience out (one instance per run)."""

    def __init__(self, recipe: Recipe, tuned, prompts, pools: dict, hub, pad_id: int):
        self.recipe, self.c, self.tuned, self.prompts = recipe, recipe.align.ppo, tuned, prompts
        self.pools, self.hub, self.pad_id = pools, hub, pad_id
        self.kl = AdaptiveKLController(self.c.kl_coef, self.c.kl_target, self.c.kl_horizon)
        self.latest_weights: dict = {}  # channel -> what a replacement actor loads
        self.window: list[tuple[float, int]] = []  # (reward, length) of recent samples: hacking monitor
        self.trend: list[tuple[float, float]] = []  # (reward mean, judge mean) of recent iterations
        self.dir = os.path.join(tuned.run.root, CONTROLLER_DIR)
        os.makedirs(self.dir, exist_ok=True)

    # -- state ------------------------------------------------------------------------------------
    def state_path(self, iteration: int) -> str:
        return os.path.join(self.dir, f"state_{iteration:06d}.json")

    def restore(self, iteration: int) -> None:
        if iteration == 0:
            return
        with open(self.state_path(iteration)) as f:
            state = json.load(f)
        self.kl.coef, self.window = state["kl_coef"], [tuple(x) for x in state["window"]]
        self.trend = [tuple(x) for x in state.get("trend", [])]

    def save(self, iteration: int) -> None:
        tmp = self.state_path(iteration) + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"iteration": iteration, "kl_coef": self.kl.coef, "window": self.window, "trend": self.trend}, f)
        os.replace(tmp, self.state_path(iteration))  # whole or absent

    # -- one iteration ----------------------------------------------------------------------------
    def wait_weights(self, channel: str, version: int, trainers: list["TrainerThread"]):
        import ray

        deadline = time.perf_counter() + self.c.timeout_s
        while True:
            try:
                return ray.get(self.hub.wait_weights.remote(channel, version, 2.0), timeout=30)
            except ray.exceptions.RayTaskError:  # the hub's 2 s wait ran out
                for t in trainers:
                    if not t.is_alive():
                        raise RuntimeError(f"the {t.role} trainer stopped before {channel} weights {version}: {t.error!r}") from t.error
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{channel} trainer: no weights {version} within {self.c.timeout_s:.0f}s") from None

    def push_weights(self, channel: str, weights) -> float:
        """Weights to the pool that uses them: policy -> rollout, critic -> critic."""
        self.latest_weights[channel] = weights
        version, refs, checksum, _ = weights
        started = time.perf_counter()
        self.pools[POOL_OF[channel]].call_all("update_weights", version, refs, checksum)
        return time.perf_counter() - started

    def ready_replacement(self, channel: str):
        def ready(pool, index: int) -> None:
            import ray

            if channel in self.latest_weights:
                version, refs, checksum, _ = self.latest_weights[channel]
                ray.get(pool.remote(index, "update_weights", version, refs, checksum), timeout=self.c.timeout_s)
        return ready

    def prompt_indices(self, iteration: int) -> np.ndarray:
        from llm_ray.data.sampler import GlobalSampler

        n = self.c.prompts_per_iteration
        return GlobalSampler(len(self.prompts), self.recipe.train.seed).sample_ids(np.arange(iteration * n, (iteration + 1) * n))

    def rollout(self, iteration: int, indices: np.ndarray) -> list[dict]:
        g, seed = self.c.samples_per_prompt, self.recipe.train.seed
        requests = [(self.prompts.ids[i], [sample_seed(seed, iteration, int(i), j) for j in range(g)]) for i in indices]
        groups = self.pools["rollout"].map_shards("generate", requests, self.c.max_new_tokens, self.c.temperature)
        return [s for group in groups for s in group]  # a prompt's samples adjacent

    def make_experience(self, iteration: int, version: int) -> tuple[dict, dict]:
        from llm_ray.models.losses import group_advantages, kl_penalty

        import torch

        c, tok = self.c, self.tuned.bundle.tokenizer
        indices = self.prompt_indices(iteration)
        times = {}
        t0 = time.perf_counter()
        samples = self.rollout(iteration, indices)
        times["rollout_s"] = time.perf_counter() - t0
        lag = [version - s["weight_version"] for s in samples]
        owners = np.repeat(indices, c.samples_per_prompt)
        completions = [tok.decode(s["token_ids"], skip_special_tokens=True) for s in samples]
        t0 = time.perf_counter()
        items = [(self.prompts.messages[i], text, self.prompts.columns[i]) for i, text in zip(owners, completions)]
        rewards = np.asarray(self.pools["reward"].map_shards("score", items), np.float32)
        judged = np.asarray(self.pools["reward"].map_shards("score", items, "judge"), np.float32) if c.judge.kind else None
        times["reward_s"] = time.perf_counter() - t0
        rows = [experience_rows(self.prompts.ids[i], s["token_ids"], s["logprobs"], self.recipe.data.seq_len, self.pad_id)
                for i, s in zip(owners, samples)]
        t0 = time.perf_counter()
        ref = np.stack(self.pools["reference"].map_shards("logprobs", [(r[0], r[1]) for r in rows], c.temperature))
        times["reference_s"] = time.perf_counter() - t0
        input_ids, labels, old = (np.stack([r[k] for r in rows]) for k in range(3))
        mask = labels != -100
        kl_tokens = kl_penalty(torch.from_numpy(old), torch.from_numpy(ref), c.kl_estimator).numpy() * mask
        kl_seq = kl_tokens.sum(1)  # (N,) per-sequence KL estimate
        arrays = {"input_ids": input_ids, "labels": labels, "old_logprobs": old, "ref_logprobs": ref.astype(np.float32),
                  "rewards": rewards}
        if c.estimator == "grpo":
            shaped = rewards - self.kl.coef * kl_seq if c.kl_placement == "reward" else rewards
            adv = group_advantages(torch.from_numpy(shaped), c.samples_per_prompt, c.group_scale).numpy()
            arrays["advantages"] = (adv[:, None] * mask).astype(np.float32)
        else:
            t0 = time.perf_counter()
            values = np.stack(self.pools["critic"].map_shards("values", [(r[0], r[1]) for r in rows]))
            times["critic_s"] = time.perf_counter() - t0
            arrays.update(self.gae_advantages(rewards, kl_tokens, values, mask))
        lengths = mask.sum(1)
        stats = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                 "kl_seq_mean": float(kl_seq.mean()), "kl_coef": self.kl.coef, "response_length": float(lengths.mean()),
                 "finished_share": float(np.mean([s["finish_reason"] == "stop" for s in samples])),
                 "off_policy_lag_max": int(max(lag)), "samples": len(samples), "prompt_indices": indices.tolist(), **times}
        if judged is not None:
            stats["judge_mean"] = float(judged.mean())
        self.kl.update(float(kl_seq.mean()), len(samples))
        stats.update(self.monitor(rewards, lengths, judged))
        return arrays, stats

    def gae_advantages(self, rewards: np.ndarray, kl_tokens: np.ndarray, values: np.ndarray, mask: np.ndarray) -> dict:
        """PPO: per-token rewards (−β·KL at every response token when the KL is in the reward,
        the reward model's score at the last one), GAE over the critic's values, whitened."""
        import torch

        from llm_ray.models.losses import gae, masked_whiten

        c = self.c
        token_rewards = -self.kl.coef * kl_tokens if c.kl_placement == "reward" else np.zeros_like(kl_tokens)
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # (N,) the last response position
        token_rewards[np.arange(len(rewards)), last] += rewards
        m = torch.from_numpy(mask)
        adv, ret = gae(torch.from_numpy(token_rewards.astype(np.float32)), torch.from_numpy(values), m, c.gamma, c.lam)
        if c.whiten_advantages:
            adv = masked_whiten(adv, m)
        return {"advantages": adv.numpy().astype(np.float32), "old_values": (values * mask).astype(np.float32),
                "returns": ret.numpy().astype(np.float32)}

    def monitor(self, rewards: np.ndarray, lengths: np.ndarray, judged: np.ndarray | None) -> dict:
        """Reward hacking: the reward/length correlation over a window of samples; the trend of
        the reward against the held-out judge's over a window of iterations."""
        self.window = (self.window + list(zip(rewards.tolist(), lengths.tolist())))[-512:]
        r, n = np.asarray(self.window).T
        corr = float(np.corrcoef(r, n)[0, 1]) if r.std() > 0 and n.std() > 0 else 0.0
        if abs(corr) > 0.7 and len(self.window) >= 64:
            logger.warning("reward and response length correlate at %.2f over the last %d samples: "
                           "the policy may be gaming the reward through length", corr, len(self.window))
        out = {"reward_length_corr": corr}
        if judged is not None:
            self.trend = (self.trend + [(float(rewards.mean()), float(judged.mean()))])[-JUDGE_WINDOW:]
            slopes = judge_slopes(self.trend)
            out.update(zip(("reward_slope", "judge_slope"), slopes))
            if len(self.trend) == JUDGE_WINDOW and slopes[0] > 0 > slopes[1]:
                logger.warning("the reward rose (%+.3f per iteration) while the held-out judge fell (%+.3f) over the "
                               "last %d iterations: the policy may be gaming the reward", *slopes, JUDGE_WINDOW)
        return out


JUDGE_WINDOW = 5  # iterations over which the reward's and the judge's trends are compared


def judge_slopes(trend: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slopes per iteration of (reward mean, judge mean) over ``trend``."""
    if len(trend) < 2:
        return 0.0, 0.0
    y = np.asarray(trend, np.float64)  # (W, 2)
    x = np.arange(len(y)) - (len(y) - 1) / 2
    slopes = (x[:, None] * (y - y.mean(0))).sum(0) / (x * x).sum()
    return float(slopes[0]), float(slopes[1])


def launch_pools(c, init_dir: str, ready_replacement, critic_spec=None) -> dict:
    """The pools of a run by name, those in ``c.colocate`` hosted together;
    ``ready_replacement(channel)`` readies a replacement actor."""
    from llm_ray.align.pools import RayActorGroup, colocated_pools
    from llm_ray.align.rl_actors import CriticActor, ReferenceActor, RewardActor, RolloutActor

    judge = dataclasses.asdict(c.judge) if c.judge.kind else None
    members = {  # name -> (actor class, args, resources, on_replace)
        "rollout": (RolloutActor, (init_dir, c.rollout_batch_size), c.rollout, ready_replacement("policy")),
        "reward": (RewardActor, (dataclasses.asdict(c.reward), c.timeout_s, judge), c.reward_pool, None),
        "reference": (ReferenceActor, (init_dir,), c.reference, None),
    }
    if critic_spec is not None:
        members["critic"] = (CriticActor, (critic_spec,), c.critic, ready_replacement("critic"))
    common = {"timeout_s": c.timeout_s, "max_restarts": c.max_actor_restarts}
    pools: dict = colocated_pools({n: members[n] for n in c.colocate}, **common) if c.colocate else {}
    for name, (cls, args, resources, on_replace) in members.items():
        if name not in pools:
            pools[name] = RayActorGroup(name, cls, resources, args, on_replace=on_replace, **common)
    return pools


def pool_memory_mb(pools: dict) -> float:
    """Resident memory of the pools' processes, each counted once (colocated roles share one)."""
    return float(sum(dict(p for pool in pools.values() for p in zip(pool.pids, pool.rss_mb)).values()))


def critic_run(tuned):
    """(the critic's TunedRun — its own run folder ``<run.name>-critic``, lr ``critic_lr`` — and
    its ModelSpec): a value model from the reward model or from the policy."""
    from llm_ray.bundle import WEIGHTS, load_bundle
    from llm_ray.bundle.heads import HEAD_WEIGHTS
    from llm_ray.data.tokenizer import tokenizer_hash
    from llm_ray.models.converters import LoadWeights, ModelSpec, ValueHead

    recipe, c = tuned.recipe, tuned.recipe.align.ppo
    source = c.critic_from if c.critic_from != "auto" else ("reward_model" if c.reward.kind == "model" else "policy")
    if source == "reward_model":
        folder = load_bundle(c.reward.model)
        check(tokenizer_hash(folder.tokenizer) == tokenizer_hash(tuned.bundle.tokenizer), "align.ppo.critic_from",
              f"the reward model {c.reward.model} has another tokenizer than the policy: its values would read other tokens")
        check(folder.cfg.arch == "decoder", "align.ppo.critic_from", "a value model needs a decoder reward model")
        spec = ModelSpec.of(folder.cfg, [ValueHead(os.path.join(os.path.abspath(c.reward.model), HEAD_WEIGHTS)),
                                         LoadWeights(os.path.join(os.path.abspath(c.reward.model), WEIGHTS))], seed=recipe.train.seed)
    else:
        spec = ModelSpec.of(recipe.model, [ValueHead(), tuned.init_weights], seed=recipe.train.seed)
    name = f"{recipe.run.name}-critic"
    overrides = [f"run.name={name}"] + ([f"optim.lr={c.critic_lr}"] if c.critic_lr else [])
    return dataclasses.replace(tuned, recipe=recipe.replace(*overrides), run=tuned.storage.child(name)), spec


class TrainerThread(threading.Thread):
    """The policy's engine run (a blocking ``fit``) beside the controller loop; keeps its
    summary or the error that ended it, for the controller to report."""

    def __init__(self, fit, role: str, channel: str):
        super().__init__(name=f"{role}-trainer", daemon=True)
        self.fit, self.role, self.channel, self.summary, self.error = fit, role, channel, None, None

    def run(self) -> None:
        try:
            self.summary = self.fit()
        except BaseException as e:  # re-raised by the driver
            self.error = e


def completed_iterations(run, steps_per_iteration: int) -> int:
    """Iterations the run's latest complete checkpoint holds (where a rerun continues)."""
    from llm_ray.train.checkpointing import MANIFEST, latest_complete_checkpoint

    ckpt = latest_complete_checkpoint(run)
    if ckpt is None:
        return 0
    return json.loads(ckpt.read_text(MANIFEST))["train_state"]["step"] // steps_per_iteration


def run_iterations(ctl: Controller, start: int, end: int, trainers: list["TrainerThread"]) -> list[dict]:
    """Iterations ``start``..``end``-1; one row of rollout metrics each (also in controller/)."""
    import ray
    from torch.utils.tensorboard import SummaryWriter

    c, rows = ctl.c, []
    writer = SummaryWriter(os.path.join(ctl.tuned.run.root, "tensorboard", "rollout"), purge_step=start)
    with open(os.path.join(ctl.dir, "rollout.jsonl"), "a") as log:
        ready_at = time.perf_counter()
        for k in range(start, end):
            weights = {t.channel: ctl.wait_weights(t.channel, k, trainers) for t in trainers}
            update_s = time.perf_counter() - ready_at  # the trainers' steps and their gather since the last put
            begun = time.perf_counter()
            busy = {name: pool.busy_s for name, pool in ctl.pools.items()}
            # a trainer's gather + put, then the push to its pool
            sync_s = sum(ctl.push_weights(ch, w) + w[3] for ch, w in weights.items())
            arrays, stats = ctl.make_experience(k, weights["policy"][0])
            ctl.save(k + 1)
            ray.get(ctl.hub.put.remote(k, arrays), timeout=c.timeout_s)
            ready_at = time.perf_counter()
            wall = ready_at - begun + (update_s if k > start else 0.0)
            row = {"iteration": k, "weight_version": weights["policy"][0], **stats, "sync_s": sync_s,
                   "update_s": update_s if k > start else None,
                   "sync_share": sync_s / wall if wall else None,
                   **{f"{n}_idle_share": 1 - (p.busy_s - busy[n]) / (wall * len(p.actors)) for n, p in ctl.pools.items()},
                   "restarts": {n: p.restarts for n, p in ctl.pools.items()},
                   "pids": {n: list(p.pids) for n, p in ctl.pools.items()}, "time": time.time()}
            log.write(json.dumps(row) + "\n")
            log.flush()
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "time"):
                    writer.add_scalar(f"rollout/{key}", value, k)
            logger.info("iteration %d: reward %.3f kl %.4f length %.1f", k, stats["reward_mean"], stats["kl_seq_mean"], stats["response_length"])
            rows.append(row)
    writer.close()
    return rows


def ppo(recipe: Recipe) -> StageResult:
    import ray

    from llm_ray.align.experience import ExperienceSource
    from llm_ray.align.objectives import PolicyGradient, ValueRegression
    from llm_ray.align.prompts import load_prompts
    from llm_ray.align.rl_actors import ExperienceHubActor
    from llm_ray.bundle import save_bundle
    from llm_ray.generation.api import pad_id_for
    from llm_ray.train import tuning
    from llm_ray.train.launcher import ensure_ray

    started = time.time()
    tuned = tuning.start(recipe, "ppo", arch="decoder")  # before any Ray work
    recipe = tuned.recipe = derived_recipe(tuned.recipe)
    c, ft = recipe.align.ppo, recipe.finetune
    max_prompt = recipe.align.max_prompt_tokens or recipe.data.seq_len // 2
    check_rl_recipe(recipe, max_prompt)
    check(tuned.run.is_local, "run.storage_path", "llm-ray ppo keeps its controller state in a local run folder for now")
    prompts, rejects = load_prompts(ft.train_path, tuned.bundle, max_prompt, ft.system_prompt, recipe.run.s3_endpoint)
    rejects_file = tuned.write_rejects(rejects)
    spi = c.steps_per_iteration
    start = completed_iterations(tuned.run, spi)

    critic = critic_run(tuned) if c.estimator == "ppo" else None
    if critic is not None:
        start = min(start, completed_iterations(critic[0].run, spi))

    ensure_ray()
    check_cluster_cpus(recipe, trainers=2 if critic else 1)
    hub = ray.remote(ExperienceHubActor).options(num_cpus=0, max_concurrency=64).remote()
    ctl = Controller(recipe, tuned, prompts, {}, hub, pad_id_for(tuned.bundle))
    ctl.restore(start)
    spec = tuned.spec([tuned.init_weights] + tuning.converters_for(ft))
    source = ExperienceSource(hub, c.rollout_samples, c.ppo_epochs, c.minibatches, recipe.train.seed, c.timeout_s)
    common = dict(hub=hub, steps_per_iteration=spi, max_steps=recipe.train.max_steps, bucket_mb=c.weight_sync_bucket_mb,
                  timeout_s=c.timeout_s)
    policy = PolicyGradient(**common, channel="policy", temperature=c.temperature, clip_eps=c.clip_eps,
                            clip_eps_high=c.clip_eps_high, aggregate=c.loss_aggregate,
                            kl_coef=c.kl_coef if c.kl_placement == "loss" else 0.0, kl_estimator=c.kl_estimator,
                            entropy_coef=c.entropy_coef, name=c.estimator)
    trainers = [TrainerThread(lambda: tuned.train(spec, policy, source), "policy", "policy")]
    if critic is not None:
        critic_tuned, critic_spec = critic
        value = ValueRegression(**common, channel="critic", value_clip=c.value_clip)
        trainers.append(TrainerThread(lambda: critic_tuned.train(critic_spec, value, source), "critic", "critic"))
    try:
        ctl.pools = launch_pools(c, tuned.init_dir, ctl.ready_replacement, critic[1] if critic else None)
        for t in trainers:
            t.start()
        stop = recipe.run.stop_at_step
        rows = run_iterations(ctl, start, stop // spi if stop else c.iterations, trainers)
    except BaseException:
        ray.kill(hub)  # a trainer waiting for experience fails at once instead of at its timeout
        for t in trainers:
            t.join(timeout=120)
        raise
    finally:
        restarts = {n: p.restarts for n, p in ctl.pools.items()}
        memory_mb = pool_memory_mb(ctl.pools)
        for pool in ctl.pools.values():
            pool.shutdown()
    for t in trainers:
        t.join()
        if t.error is not None:
            raise t.error
    train_summary = trainers[0].summary

    trained, manifest, ckpt = tuning.trained_module(tuned, spec)
    provenance = {**tuned.provenance(manifest, ckpt, c.estimator), c.estimator: dataclasses.asdict(c)}
    save_bundle(spec.finalize(trained).cpu(), recipe.model, tuned.bundle.tokenizer.to_str(), tuned.out_dir, provenance,
                tuned.tokenizer_config())
    summary = run_summary(tuned, ctl.dir, start, len(prompts), prompts.truncated, rejects, rejects_file, rows, restarts, train_summary)
    summary["pool_memory_mb"] = round(memory_mb, 1)
    summary["wall_s"] = round(time.time() - started, 2)
    return write_summary(tuned.out_dir, summary)


def mean_phases(rows: list[dict]) -> dict:
    """Mean seconds of each phase over ``rows`` (None where a phase never ran: no critic)."""
    out = {}
    for key in ("rollout_s", "reward_s", "reference_s", "critic_s", "sync_s", "update_s"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def run_summary(tuned, controller_dir: str, start: int, n_prompts: int, truncated: int, rejects: list, rejects_file: str,
                rows: list[dict], restarts: dict, train_summary: dict) -> dict:
    """``summary.json`` of a run: the first and last iteration of all its attempts, this
    attempt's mean phase times, the trainer's figures."""
    from llm_ray.train import tuning
    from llm_ray.train.metrics import read_metrics

    c = tuned.recipe.align.ppo
    all_rows = [json.loads(line) for line in open(os.path.join(controller_dir, "rollout.jsonl")) if line.strip()]
    by_iteration = {r["iteration"]: r for r in all_rows}  # a rerun's rows replace an interrupted run's
    first, last = by_iteration[min(by_iteration)], by_iteration[max(by_iteration)]
    mismatch = [m["logprob_mismatch"] for m in read_metrics(tuned.run).values() if "logprob_mismatch" in m]
    return {
        "out_dir": tuned.out_dir,
        "run_dir": tuned.run.uri,
        "init_from": tuned.recipe.finetune.init_from,
        "estimator": c.estimator,
        "iterations": c.iterations,
        "resumed_at_iteration": start,
        "prompts": n_prompts,
        "rejected": len(rejects),
        "rejects_file": rejects_file,
        "prompt_truncated": truncated,
        "reward_first": first["reward_mean"],
        "reward_last": last["reward_mean"],
        "judge_first": first.get("judge_mean"),
        "judge_last": last.get("judge_mean"),
        "kl_last": last["kl_seq_mean"],
        "response_length_last": last["response_length"],
        "logprob_mismatch_max": max(mismatch) if mismatch else None,
        "pool_restarts": restarts,
        "mean_phase_s": mean_phases(rows),
        **tuning.training_figures(train_summary),
        "last_policy_loss": train_summary["last_step_metrics"].get("policy_loss"),
    }
