"""Preference learning: the loss formulas on fixed tensors (no Ray), and real ``llm-ray reward``
and ``llm-ray dpo`` runs (Ray Train + DeepSpeed on CPU) from a tiny decoder folder made here."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llm_ray.config import load_recipe
from llm_ray.models.losses import IGNORE_INDEX, dpo_loss, pairwise_reward_loss, sequence_logprobs
from llm_ray.storage import resolve_storage
from llm_ray.train.metrics import read_metrics
from tests.conftest import REPO, rl_recipe

PAIRS = str(REPO / "jobs/data/preference/pairs.jsonl")
BAD_PAIRS = str(REPO / "jobs/data/preference/bad_pairs.jsonl")


# ---- losses against the papers' formulas, element by element in plain Python -------------------


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


FIXED = {  # sequence log-probs of 4 pairs: policy chosen / rejected, reference chosen / rejected
    "pc": [-12.0, -30.5, -7.25, -40.0], "pr": [-15.0, -28.0, -9.0, -39.5],
    "rc": [-13.0, -29.0, -7.0, -41.0], "rr": [-14.0, -29.5, -9.5, -38.0],
}


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0)])
def test_dpo_loss_equals_the_papers_formula(loss_type, beta, eps):
    t = {k: torch.tensor(v) for k, v in FIXED.items()}
    losses, chosen_r, rejected_r = dpo_loss(t["pc"], t["pr"], t["rc"], t["rr"], beta, loss_type, eps)
    for i in range(4):
        h = (FIXED["pc"][i] - FIXED["rc"][i]) - (FIXED["pr"][i] - FIXED["rr"][i])
        if loss_type == "sigmoid":  # Rafailov et al. eq. 7; conservative DPO flips labels w.p. eps
            want = -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h)
        else:  # Azar et al. eq. 17
            want = (h - 1 / (2 * beta)) ** 2
        assert losses[i].item() == pytest.approx(want, rel=1e-6)
        assert chosen_r[i].item() == pytest.approx(beta * (FIXED["pc"][i] - FIXED["rc"][i]), rel=1e-6)
        assert rejected_r[i].item() == pytest.approx(beta * (FIXED["pr"][i] - FIXED["rr"][i]), rel=1e-6)


def test_bradley_terry_loss_and_centering():
    chosen, rejected, margin = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.5, 0.5]), torch.tensor([0.5, 0.0, 1.0])
    want = sum(-_logsig(c - r - m) for c, r, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist())) / 3
    assert pairwise_reward_loss(chosen, rejected, margin).item() == pytest.approx(want, rel=1e-6)
    center = sum((c + r) ** 2 for c, r in zip(chosen.tolist(), rejected.tolist())) / 3
    assert pairwise_reward_loss(chosen, rejected, margin, 0.01).item() == pytest.approx(want + 0.01 * center, rel=1e-6)


def test_sequence_logprobs_sum_labelled_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, IGNORE_INDEX, IGNORE_INDEX], [2, 2, 2, 2, 2]])
    logp = torch.log_softmax(logits, -1)
    want0 = logp[0, 1, 3] + logp[0, 2, 1]
    got = sequence_logprobs(logits, labels)
    assert got[0].item() == pytest.approx(want0.item(), rel=1e-6)
    assert sequence_logprobs(logits, labels, average=True)[0].item() == pytest.approx(want0.item() / 2, rel=1e-6)


def test_adapters_disabled_is_the_base_model_exactly(tiny_model_dir):
    from llm_ray.bundle import load_bundle
    from llm_ray.models.lora import adapters_disabled, apply_lora

    base = load_bundle(tiny_model_dir).model
    x = torch.randint(0, base.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        want = base(x)
        apply_lora(base, ["q_proj", "v_proj"], r=4, alpha=8)
        for name, p in base.named_parameters():
            if name.endswith("lora_B"):
                p.add_(0.5)  # a trained adapter changes the output...
        assert not torch.allclose(base(x), want)
        with adapters_disabled(base):  # ...and switched off it is the base, bit for bit
            assert torch.equal(base(x), want)
        assert not torch.allclose(base(x), want)  # back on afterwards


# ---- real runs ---------------------------------------------------------------------------------


def align_recipe(stage: str, tmp_path, name: str, init_from: str, *overrides):
    return load_recipe(str(REPO / f"jobs/recipes/{stage}-tiny.yaml"), [
        f"finetune.init_from={init_from}",
        f"run.storage_path={tmp_path}",
        f"run.name={name}",
        "run.progress_bar=false",
        "train.precision=fp32",  # the equality checks below compare fp32 runs
        *overrides,
    ])


def step_losses(storage, name: str) -> dict[int, float]:
    return {s: row["loss"] for s, row in read_metrics(resolve_storage(str(storage)).child(name)).items()}


@pytest.fixture(scope="module")
def baseline(ray_cluster, tiny_model_dir, tmp_path_factory):
    """``baseline(stage)`` -> (storage, result) of one uninterrupted run of the stage's tiny
    recipe, made once per module and shared by the tests that compare against it."""
    from llm_ray.align.dpo import dpo
    from llm_ray.align.reward import reward

    runs: dict = {}

    def get(stage: str):
        if stage not in runs:
            storage = tmp_path_factory.mktemp(stage)
            runs[stage] = storage, {"reward": reward, "dpo": dpo}[stage](align_recipe(stage, storage, "full", tiny_model_dir))
        return runs[stage]

    return get


@pytest.mark.slow
def test_reward_model_separates_held_out_pairs(baseline):
    from llm_ray.align.reward import score

    _, result = baseline("reward")
    s = result.summary
    print(json.dumps(s))
    assert s["eval_accuracy_after"] > 0.9, s
    assert s["eval_mean_margin_after"] > s["eval_mean_margin_before"] + 1.0, s
    assert s["train_loss_last"] < s["train_loss_first"], s
    assert 0 <= s["eval_ece_after"] <= 1 and s["eval_reward_length_corr_after"] is not None
    assert json.load(open(f"{result.out_dir}/summary.json"))["out_dir"] == result.out_dir
    # the library's score() reads the folder as PPO will: a polite answer beats a rude one
    good, bad = score(result.out_dir, ["What is 3 plus 4?"] * 2,
                      ["Of course. 3 plus 4 is 7. Thank you for asking.", "Go away, stop bugging me."])
    assert good > bad


@pytest.mark.slow
def test_reward_on_two_zero3_workers_matches_one_worker(baseline, tiny_model_dir):
    """Same global batch, seed and data order; ZeRO-3 shards parameters, gradients and optimizer
    states over 2 gloo workers. Only fp32 summation order differs (the gradient all-reduce and
    per-rank micro batches), so losses agree to ~1e-6 at first and drift slowly: 2e-4 bounds 10
    steps with room, while a wrong shard or data order moves the loss by > 1e-2."""
    from llm_ray.align.reward import reward

    storage, _ = baseline("reward")
    reward(align_recipe("reward", storage, "zero3", tiny_model_dir, "parallel.num_workers=2", "parallel.zero_stage=3",
                        "run.stop_at_step=10"))
    one, two = step_losses(storage, "full"), step_losses(storage, "zero3")
    assert one[1] == pytest.approx(two[1], abs=1e-5)
    for step in range(1, 11):
        assert abs(one[step] - two[step]) < 2e-4, (step, one[step], two[step])


@pytest.mark.slow
def test_reward_stop_and_rerun_matches_uninterrupted(baseline, tiny_model_dir):
    from llm_ray.align.reward import reward

    storage, full = baseline("reward")
    first = reward(align_recipe("reward", storage, "resume", tiny_model_dir, "run.stop_at_step=20"))
    assert first.summary["stopped_early"] and first.summary["steps"] == 20
    second = reward(align_recipe("reward", storage, "resume", tiny_model_dir))
    assert second.summary["steps"] == 40
    want, got = step_losses(storage, "full"), step_losses(storage, "resume")
    for step in range(1, 41):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])
    assert second.summary["eval_accuracy_after"] == pytest.approx(full.summary["eval_accuracy_after"])


@pytest.mark.slow
def test_dpo_raises_held_out_implicit_reward_accuracy_and_margin(baseline):
    _, result = baseline("dpo")
    s = result.summary
    print(json.dumps(s))
    assert s["reference"] == "frozen_copy"
    assert s["eval_accuracy_before"] == 0.5 and s["eval_mean_margin_before"] == 0.0  # policy == reference
    assert s["eval_accuracy_after"] >= 0.75, s
    assert s["eval_mean_margin_after"] > 0.05, s
    assert s["eval_logp_margin_after"] > s["eval_logp_margin_before"], s
    assert s["train_loss_first"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: π = π_ref
    assert s["last_rewards/accuracies"] > 0.5 and s["last_rewards/margins"] > 0
    from llm_ray.bundle import load_bundle

    assert load_bundle(result.out_dir).cfg.arch == "decoder"


@pytest.mark.slow
def test_dpo_stop_and_rerun_matches_uninterrupted(baseline, tiny_model_dir):
    from llm_ray.align.dpo import dpo

    storage, _ = baseline("dpo")
    dpo(align_recipe("dpo", storage, "resume", tiny_model_dir, "run.stop_at_step=15"))
    dpo(align_recipe("dpo", storage, "resume", tiny_model_dir))
    want, got = step_losses(storage, "full"), step_losses(storage, "resume")
    for step in range(1, 31):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])


@pytest.mark.slow
def test_lora_dpo_references_agree_and_bad_records_are_quarantined(ray_cluster, tiny_model_dir, tmp_path):
    """LoRA DPO with the adapters-off reference, a separate frozen copy and precomputed log-probs
    of the same starting weights: the same losses step for step. The data mixes every bad record
    kind into the good pairs: each lands in rejects.jsonl with its reason, the good ones train."""
    from llm_ray.align.dpo import dpo

    mixed = tmp_path / "mixed.jsonl"
    good_lines = open(PAIRS).read().splitlines()
    mixed.write_text("\n".join(good_lines + open(BAD_PAIRS).read().splitlines()) + "\n")
    lora = ["finetune.lora.r=4", "finetune.lora.alpha=8", f"finetune.train_path={mixed}", "optim.lr=5e-3",
            "train.max_steps=4", "checkpoint.every_steps=4"]
    results = {ref: dpo(align_recipe("dpo", tmp_path, ref, tiny_model_dir, *lora, f"align.dpo.reference={ref}", *extra))
               for ref, extra in (("adapters_off", []), ("frozen_copy", []),
                                  ("auto", ["align.dpo.precompute_reference=true"]))}
    assert results["auto"].summary["reference"] == "precomputed"
    losses = {ref: step_losses(tmp_path, ref) for ref in results}
    assert losses["adapters_off"][1] == pytest.approx(math.log(2), abs=1e-6)
    for step in range(1, 5):
        assert losses["adapters_off"][step] == pytest.approx(losses["frozen_copy"][step], abs=1e-6), step
        assert losses["auto"][step] == pytest.approx(losses["frozen_copy"][step], abs=1e-5), step
    assert losses["adapters_off"][4] < losses["adapters_off"][1]  # the adapters did train

    s = results["adapters_off"].summary
    rejects = [json.loads(line) for line in open(f"{results['adapters_off'].out_dir}/rejects.jsonl")]
    reasons = {r["reason"] for r in rejects}
    for reason in ("missing_field", "identical_responses", "bad_content", "prompt_too_long", "invalid_json"):
        assert reason in reasons, (reason, reasons)
    assert s["rejected"] == len(rejects) and sum(s["rejected_by_reason"].values()) == len(rejects)
    assert s["train_pairs"] + s["eval_pairs"] >= len(good_lines)  # no good pair was lost


@pytest.mark.slow
def test_grpo_with_the_trained_reward_model_as_reward_pool_raises_its_reward(baseline, tiny_model_dir, tmp_path):
    """The reward pool scores with the folder ``llm-ray reward`` wrote. Eight prompts, so every
    iteration samples the same ones and the reward model's spread over prompts (std ~1.5 here)
    does not hide what the policy learned. The policy trains on two ZeRO-3 workers: each
    iteration's weights are gathered a bucket at a time by both ranks and sent by rank 0."""
    from llm_ray.align.ppo import ppo

    _, rm = baseline("reward")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((REPO / "jobs/data/rl/prompts.jsonl").read_text().splitlines(keepends=True)[:8]))
    ppo(rl_recipe(tiny_model_dir, tmp_path, "grpo-rm", f"finetune.train_path={prompts}", "align.ppo.iterations=12",
                  "align.ppo.kl_coef=0.02", "align.ppo.reward.function=", f"align.ppo.reward.model={rm.out_dir}",
                  "parallel.num_workers=2", "parallel.zero_stage=3", "train.micro_batch_size=8"))
    rows = [json.loads(line) for line in open(tmp_path / "grpo-rm" / "controller" / "rollout.jsonl")]
    rewards = [r["reward_mean"] for r in rows]
    assert len(rewards) == 12 and sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    assert [r["weight_version"] for r in rows] == list(range(12))  # every sync arrived, in order
    mismatch = [m["logprob_mismatch"] for m in read_metrics(resolve_storage(str(tmp_path)).child("grpo-rm")).values()
                if "logprob_mismatch" in m]
    assert len(mismatch) == 12 and max(mismatch) < 1e-4, mismatch  # the rollout ran the gathered weights


@pytest.mark.slow
def test_ppo_critic_starts_from_the_reward_model(baseline, tiny_model_dir, tmp_path):
    """critic_from auto with a reward-model reward: the value model is the reward model's
    backbone and its scalar head (OpenRLHF's default), built from the folder as written."""
    import torch
    from safetensors.torch import load_file

    from llm_ray.align.ppo import critic_run, derived_recipe
    from llm_ray.bundle.heads import load_classifier
    from llm_ray.train import tuning

    _, rm = baseline("reward")
    recipe = rl_recipe(tiny_model_dir, tmp_path, "critic",
                       "align.ppo.estimator=ppo", "align.ppo.samples_per_prompt=1", "align.ppo.prompts_per_iteration=32",
                       "align.ppo.reward.function=", f"align.ppo.reward.model={rm.out_dir}", "align.ppo.critic_lr=1e-4")
    tuned = tuning.start(recipe, "ppo", arch="decoder")
    tuned.recipe = derived_recipe(tuned.recipe)
    critic_tuned, spec = critic_run(tuned)
    critic = spec.build()
    head = load_file(f"{rm.out_dir}/classifier.safetensors")
    assert torch.equal(critic.value_head.weight, head["weight"]) and torch.equal(critic.value_head.bias, head["bias"])
    reward_model = load_classifier(rm.out_dir)[0]
    for (name, p), (_, q) in zip(critic.backbone.named_parameters(), reward_model.backbone.named_parameters()):
        assert torch.equal(p, q), name
    assert critic_tuned.run.uri.endswith("critic-critic") and critic_tuned.recipe.optim.lr == 1e-4
