"""DP-SGD (``train/dp.py``): per-example norms, clipping and noise on real gradients of the tiny
decoder (no Ray), the accountant's ε, recipe refusals; and two data-parallel workers training
privately on Ray Train + DeepSpeed."""

from __future__ import annotations

import math

import pytest
import torch

from llm_ray.config import RecipeError, load_recipe
from tests.conftest import REPO


def _model_and_batch(tiny_model_dir, b=6, t=12):
    from llm_ray.bundle import load_bundle

    model = load_bundle(tiny_model_dir).model.train()
    torch.manual_seed(3)
    ids = torch.randint(5, 200, (b, t))
    labels = torch.cat([ids[:, 1:], torch.full((b, 1), -100)], dim=1)
    labels[0, :8] = -100  # rows with different numbers of scored tokens
    return model, {"input_ids": ids, "labels": labels}


def _explicit_grads(model, batch):
    """Each example's gradient by its own backward (the definition)."""
    from llm_ray.train.objective import CausalLM

    out = []
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad()
        CausalLM().per_example_loss(model, {k: v[i:i + 1] for k, v in batch.items()})[0].backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad()
    return out


def _dp(sigma, clip, accum=1):
    from llm_ray.train.dp import DPSGD
    from llm_ray.train.objective import CausalLM

    return DPSGD(CausalLM(), sigma, clip, rate=0.01, delta=1e-5, accountant="rdp", grad_accum=accum, seed=7)


def test_per_example_norms_and_the_clipped_gradient_match_their_definitions(tiny_model_dir):
    """torch.func's per-example norms equal each example's own backward; the gradient of the DP
    loss (no noise) is the mean of the clipped per-example gradients, each of norm <= C; the
    loss it reports is the plain mean of the per-example losses."""
    from llm_ray.train.dp import clip_weights, per_example_grad_norms
    from llm_ray.train.objective import CausalLM

    model, batch = _model_and_batch(tiny_model_dir)
    grads = _explicit_grads(model, batch)
    want = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gi.values())) for gi in grads])
    norms = per_example_grad_norms(model, CausalLM().per_example_loss, batch)
    assert torch.allclose(norms, want, rtol=1e-4)

    clip = float(norms.median())  # half the examples are clipped
    w = clip_weights(norms, clip)
    for gi, wi in zip(grads, w):
        assert math.sqrt(sum(float((wi * g).pow(2).sum()) for g in gi.values())) <= clip * (1 + 1e-5)
    loss, metrics = _dp(1e-12, clip).loss(model, batch, {})
    loss.backward()
    for name, p in model.named_parameters():
        expect = sum(wi * gi[name] for gi, wi in zip(grads, w)) / len(grads)
        assert torch.allclose(p.grad, expect, atol=1e-6), name
    assert torch.allclose(loss, CausalLM().per_example_loss(model, batch).mean(), atol=1e-6)
    assert 0.3 < float(metrics["clipped_share"]) < 0.7


def test_noise_is_gaussian_with_the_stated_std_added_once_and_reproducible(tiny_model_dir):
    """The gradient minus the clipped mean is noise of std σC/(b·sqrt(accum)) per coordinate; the
    same (seed, step, micro step) draws the same noise, the next micro step other noise."""
    model, batch = _model_and_batch(tiny_model_dir)
    clean = _dp(1e-12, 0.5)
    clean.loss(model, batch, {})[0].backward()
    base = {n: p.grad.clone() for n, p in model.named_parameters()}

    def noise(obj):
        model.zero_grad()
        obj.loss(model, batch, {})[0].backward()
        return torch.cat([(p.grad - base[n]).flatten() for n, p in model.named_parameters()])

    sigma, accum, b = 2.0, 4, batch["input_ids"].shape[0]
    first = noise(_dp(sigma, 0.5, accum))
    assert abs(float(first.std()) / (sigma * 0.5 / (b * math.sqrt(accum))) - 1) < 0.02 and abs(float(first.mean())) < 1e-3
    assert torch.equal(first, noise(_dp(sigma, 0.5, accum)))  # a resumed run draws the same
    obj = _dp(sigma, 0.5, accum)
    noise(obj)
    assert not torch.allclose(noise(obj), first)  # the next micro step: fresh noise


def test_reported_epsilon_is_the_accountants_and_target_epsilon_sets_the_noise():
    from opacus.accountants import RDPAccountant

    from llm_ray.train.dp import epsilon, noise_for_target

    acc = RDPAccountant()
    for _ in range(50):
        acc.step(noise_multiplier=1.1, sample_rate=0.02)
    assert epsilon(1.1, 0.02, 50, 1e-5, "rdp") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    sigma = noise_for_target(3.0, 1e-5, 0.02, 50, "rdp")
    assert epsilon(sigma, 0.02, 50, 1e-5, "rdp") <= 3.0 < epsilon(sigma * 0.9, 0.02, 50, 1e-5, "rdp")


@pytest.mark.parametrize("override,key", [
    ("parallel.zero_stage=3", "parallel.zero_stage"), ("optim.grad_clip=1.0", "optim.grad_clip"),
    ("model.dropout=0.1", "model.dropout"), ("privacy.dp.target_epsilon=3", "privacy.dp.noise_multiplier"),
])
def test_dp_recipes_it_cannot_honour_are_refused_naming_the_key(override, key):
    ok = ["privacy.dp.enabled=true", "privacy.dp.noise_multiplier=1.0", "optim.grad_clip=0"]
    load_recipe(str(REPO / "jobs/recipes/tiny-cpu.yaml"), ok)
    with pytest.raises(RecipeError) as e:
        load_recipe(str(REPO / "jobs/recipes/tiny-cpu.yaml"), ok + [override])
    assert e.value.key == key, str(e.value)


def test_dp_sgd_on_two_workers_trains_and_reports_the_accountants_epsilon(ray_cluster, tokenizer_paths, tmp_path):
    from llm_ray.train.dp import epsilon
    from llm_ray.train.launcher import prepare_source, pretrain
    from llm_ray.train.metrics import read_metrics
    from llm_ray.storage import resolve_storage
    from tests.conftest import tiny_overrides

    recipe = load_recipe(str(REPO / "jobs/recipes/tiny-cpu.yaml"), tiny_overrides(tmp_path, "dp", tokenizer_paths["bpe"]) + [
        "parallel.num_workers=2", "parallel.zero_stage=2", "train.max_steps=12", "train.global_batch_size=16",
        "train.micro_batch_size=4", "optim.lr=3e-3", "optim.grad_clip=0", "optim.warmup_steps=0", "checkpoint.every_steps=12",
        "privacy.dp.enabled=true", "privacy.dp.noise_multiplier=0.8", "privacy.dp.max_grad_norm=1.0"])
    result = pretrain(recipe)
    metrics = read_metrics(resolve_storage(str(tmp_path)).child("dp"))
    assert sorted(metrics) == list(range(1, 13))
    assert metrics[12]["loss"] < metrics[1]["loss"]
    _, source = prepare_source(recipe, resolve_storage(str(tmp_path)).child("dp-data"))
    rate = 16 / source.num_samples  # shuffled fixed-size batches: q = B / N
    assert metrics[1]["dp_sample_rate"] == pytest.approx(rate) and metrics[1]["noise_multiplier"] == pytest.approx(0.8)
    for step in (1, 12):
        assert metrics[step]["epsilon"] == pytest.approx(epsilon(0.8, rate, step, 1e-5, "rdp"), rel=1e-6)
    assert metrics[12]["epsilon"] > metrics[1]["epsilon"] > 0 and 0 <= metrics[12]["clipped_share"] <= 1
    assert result.summary["privacy"]["epsilon"] == pytest.approx(metrics[12]["epsilon"]) and result.summary["privacy"]["steps"] == 12
