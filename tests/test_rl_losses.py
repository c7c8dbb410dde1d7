"""PPO, value, GRPO and GAE losses against their formulas, written out element by element on
fixed tensors (no Ray): the loop over tokens here is the paper's definition."""

from __future__ import annotations

import math

import pytest
import torch

from llm_ray.models.losses import (
    entropy_from_logits,
    gae,
    group_advantages,
    kl_penalty,
    masked_whiten,
    policy_loss,
    value_loss,
)

torch.manual_seed(0)
B, T = 3, 6
MASK = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)


def _tokens(mask=MASK):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def test_gae_equals_the_recursion_written_per_row():
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    gamma, lam = 0.97, 0.9
    adv, ret = gae(rewards, values, MASK, gamma, lam)
    for b in range(B):
        span = [t for t in range(T) if MASK[b, t]]
        a_next, expect = 0.0, {}
        for i in reversed(range(len(span))):
            t = span[i]
            v_next = values[b, span[i + 1]].item() if i + 1 < len(span) else 0.0  # the episode ends
            delta = rewards[b, t].item() + gamma * v_next - values[b, t].item()
            a_next = delta + gamma * lam * a_next
            expect[t] = a_next
        for t in range(T):
            want = expect.get(t, 0.0)
            assert adv[b, t].item() == pytest.approx(want, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(want + values[b, t].item() if t in expect else 0.0, abs=1e-5)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    adv, ret = gae(rewards, values, MASK, 1.0, 1.0)
    for b, t in _tokens():
        to_go = sum(rewards[b, s].item() for s in range(t, T) if MASK[b, s])
        assert ret[b, t].item() == pytest.approx(to_go, abs=1e-5)
        assert adv[b, t].item() == pytest.approx(to_go - values[b, t].item(), abs=1e-5)


def test_policy_loss_is_the_clipped_surrogate():
    logp, old = torch.randn(B, T) * 0.3, torch.randn(B, T) * 0.3
    adv = torch.randn(B, T)
    eps, eps_high = 0.2, 0.28
    loss, m = policy_loss(logp, old, adv, MASK, eps, eps_high)
    terms, clipped, kl = [], 0, []
    for b, t in _tokens():
        r = math.exp(logp[b, t].item() - old[b, t].item())
        a = adv[b, t].item()
        u, c = -a * r, -a * min(max(r, 1 - eps), 1 + eps_high)
        terms.append(max(u, c))
        clipped += c > u
        kl.append(1 / r - 1 + math.log(r))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert m["clip_fraction"].item() == pytest.approx(clipped / len(terms))
    assert m["approx_kl"].item() == pytest.approx(sum(kl) / len(kl), rel=1e-4)
    seq, _ = policy_loss(logp, old, adv, MASK, eps, eps_high, aggregate="seq_mean")
    per_row = []
    for b in range(B):
        row = [max(-adv[b, t].item() * math.exp(logp[b, t].item() - old[b, t].item()),
                   -adv[b, t].item() * min(max(math.exp(logp[b, t].item() - old[b, t].item()), 1 - eps), 1 + eps_high))
               for t in range(T) if MASK[b, t]]
        per_row.append(sum(row) / len(row))
    assert seq.item() == pytest.approx(sum(per_row) / B, rel=1e-5)


def test_policy_gradient_at_ratio_one_is_minus_advantage_times_score():
    logp = torch.randn(B, T, requires_grad=True)
    adv = torch.randn(B, T)
    loss, m = policy_loss(logp, logp.detach(), adv, MASK)
    loss.backward()
    n = MASK.sum().item()
    assert torch.allclose(logp.grad, torch.where(MASK, -adv / n, torch.zeros_like(adv)), atol=1e-6)
    assert m["clip_fraction"].item() == 0 and m["approx_kl"].item() == pytest.approx(0, abs=1e-7)


def test_value_loss_is_the_clipped_square():
    v, old, ret = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    c = 0.2
    loss, m = value_loss(v, old, ret, MASK, c)
    terms, n_clip = [], 0
    for b, t in _tokens():
        vc = old[b, t].item() + min(max(v[b, t].item() - old[b, t].item(), -c), c)
        e1, e2 = (v[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2
        terms.append(max(e1, e2))
        n_clip += e2 > e1
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), rel=1e-5)
    assert m["value_clip_fraction"].item() == pytest.approx(n_clip / len(terms))
    plain, _ = value_loss(v, old, ret, MASK, None)
    assert plain.item() == pytest.approx(0.5 * sum((v[b, t].item() - ret[b, t].item()) ** 2 for b, t in _tokens()) / len(terms), rel=1e-5)


def test_group_advantages_are_centred_and_scaled_per_prompt():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4)
    g1 = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(adv[:4], (g1 - 0.5) / (g1.std() + 1e-6))
    assert torch.equal(adv[4:], torch.zeros(4))  # one answer for all: nothing to learn from
    assert torch.allclose(group_advantages(rewards, 4, scale=False)[:4], g1 - 0.5)


def test_kl_estimators_match_their_definitions_and_k3_is_unbiased():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    lr = ref - logp
    assert torch.allclose(kl_penalty(logp, ref, "k1"), -lr)
    assert torch.allclose(kl_penalty(logp, ref, "k2"), 0.5 * lr ** 2)
    assert torch.allclose(kl_penalty(logp, ref, "k3"), lr.exp() - 1 - lr)
    # Samples from p: the mean of k1 and k3 approaches KL(p || q).
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    exact = (p * (p / q).log()).sum().item()
    for est in ("k1", "k3"):
        assert kl_penalty(p.log()[x], q.log()[x], est).mean().item() == pytest.approx(exact, rel=0.03)
    assert (kl_penalty(p.log()[x], q.log()[x], "k3") >= 0).all()


def test_entropy_and_whitening():
    logits = torch.randn(2, 3, 5)
    p = logits.softmax(-1)
    assert torch.allclose(entropy_from_logits(logits), -(p * p.log()).sum(-1), atol=1e-6)
    x = torch.randn(B, T) * 3 + 2
    w = masked_whiten(x, MASK)
    vals = w[MASK]
    assert vals.mean().item() == pytest.approx(0, abs=1e-6) and vals.std().item() == pytest.approx(1, rel=1e-4)
    assert torch.equal(w[~MASK], torch.zeros_like(w[~MASK]))


@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.1)])
def test_distillation_loss_is_hintons_soft_targets_plus_hard_ce(temperature, alpha):
    """Against torch's own kl_div (batchmean over scored positions) and cross entropy, written out."""
    import torch.nn.functional as F

    from llm_ray.models.losses import IGNORE_INDEX, distillation_loss

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11) * 2
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = IGNORE_INDEX
    loss, kl, ce = distillation_loss(s, t, labels, temperature, alpha)
    keep = labels != IGNORE_INDEX
    want_kl = F.kl_div(F.log_softmax(s[keep] / temperature, -1), F.log_softmax(t[keep] / temperature, -1),
                       reduction="batchmean", log_target=True) * temperature ** 2
    want_ce = F.cross_entropy(s[keep], labels[keep])
    assert torch.allclose(kl, want_kl, atol=1e-6) and torch.allclose(ce, want_ce, atol=1e-6)
    assert torch.allclose(loss, alpha * want_kl + (1 - alpha) * want_ce, atol=1e-6)
    same, _, _ = distillation_loss(t, t, labels, temperature, 1.0)
    assert abs(float(same)) < 1e-6  # a student equal to its teacher pays nothing


def test_hidden_cosine_loss_counts_unmasked_positions_only():
    from llm_ray.models.losses import hidden_cosine_loss

    h = torch.randn(2, 4, 8)
    other = h.clone()
    other[1, 3] = -h[1, 3]  # opposite at one masked-out position: 1 - cos = 2 there
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    assert float(hidden_cosine_loss(other, h, mask)) < 1e-6
    assert float(hidden_cosine_loss(other, h, torch.ones_like(mask))) == pytest.approx(2 / 8, abs=1e-6)
