"""Secure aggregation, the federated data split and FedProx's term: pure functions, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.exceptions import InvalidTag

from llm_ray.config import RecipeError, load_recipe
from llm_ray.models.losses import proximal_term
from llm_ray.privacy.federated_client import clip_and_noise, split_documents, topic_histogram
from llm_ray.privacy.secagg import (SecAggClient, SecAggError, SecAggServer, decode, encode, prg, shamir_combine,
                                    shamir_split)

FRAC = 24


def _round(updates: dict[int, np.ndarray], threshold: int, drop_after_sharing=(), round_id=1):
    """Run the whole protocol; clients in ``drop_after_sharing`` vanish before sending inputs.
    Returns (the server's decoded sum, the masked inputs the server saw)."""
    clients = {i: SecAggClient(i, round_id) for i in updates}
    keys = {i: c.public_keys() for i, c in clients.items()}
    server = SecAggServer(round_id, threshold, keys)
    incoming = server.route({i: c.share_keys(keys, threshold) for i, c in clients.items()})
    for v, c in clients.items():
        c.receive_shares(incoming[v])
    shared = sorted(clients)
    masked = {i: clients[i].mask(encode(x, FRAC), shared) for i, x in updates.items() if i not in drop_after_sharing}
    alive, gone = sorted(masked), sorted(drop_after_sharing)
    shares = {u: clients[u].unmask_shares(alive, gone) for u in alive}
    return decode(server.aggregate(masked, shares, shared), FRAC), masked


def test_shamir_any_threshold_shares_rebuild_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir_split(secret, [1, 2, 3, 4, 5], 3)
    assert shamir_combine({x: shares[x] for x in (1, 3, 5)}) == secret
    assert shamir_combine({x: shares[x] for x in (2, 4, 5)}) == secret
    with pytest.raises(SecAggError, match="do not rebuild"):  # two points fit any secret
        shamir_combine({x: shares[x] for x in (1, 2)})


def test_secure_sum_equals_the_plain_sum_within_quantisation():
    rng = np.random.default_rng(0)
    updates = {i: rng.normal(0, 0.05, 50_000) * (i + 1) for i in range(4)}
    total, masked = _round(updates, threshold=3)
    plain = sum(updates.values())
    assert np.abs(total - plain).max() <= 4 * 2.0 ** -(FRAC + 1)  # one rounding per client
    for i, y in masked.items():  # what the server saw of each client is nothing like its update
        assert np.abs(decode(y, FRAC) - updates[i]).max() > 1e3


def test_a_client_dropping_after_the_key_exchange_is_unmasked_from_the_others_shares():
    rng = np.random.default_rng(1)
    updates = {i: rng.normal(0, 1.0, 10_000) for i in range(4)}
    total, _ = _round(updates, threshold=3, drop_after_sharing=(1,))
    assert np.allclose(total, updates[0] + updates[2] + updates[3], atol=1e-6)


def _uniform_chi2(words: np.ndarray) -> float:
    """Chi-square statistic of the words' top bytes against 256 equal bins."""
    counts = np.bincount((words >> np.uint64(56)).astype(np.int64), minlength=256)
    expected = len(words) / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _ks_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    return float(np.abs(np.searchsorted(np.sort(a), grid, side="right") / len(a)
                        - np.searchsorted(np.sort(b), grid, side="right") / len(b)).max())


def test_the_servers_view_of_a_masked_update_is_independent_of_the_update():
    """Two very different updates of client 0 (zeros; a large ramp) give masked words that are
    uniform and indistinguishable from each other, and uncorrelated with the update."""
    n = 40_000
    ramp = np.linspace(-50, 50, n)
    others = {1: np.zeros(n), 2: np.zeros(n)}
    _, seen_zero = _round({0: np.zeros(n), **others}, threshold=2)
    _, seen_ramp = _round({0: ramp, **others}, threshold=2)
    y0, y1 = seen_zero[0], seen_ramp[0]
    chi2_critical = 330.5  # df 255, p = 0.001
    assert _uniform_chi2(y0) < chi2_critical and _uniform_chi2(y1) < chi2_critical
    u0, u1 = y0.astype(np.float64) / 2.0**64, y1.astype(np.float64) / 2.0**64
    assert _ks_two_sample(u0, u1) < 1.95 * np.sqrt(2 / n)  # KS critical value, alpha = 0.001
    assert abs(np.corrcoef(ramp, u1)[0, 1]) < 5 / np.sqrt(n)
    # the same update unmasked would be trivially visible: the test can tell when masks are off
    assert _uniform_chi2(encode(ramp, FRAC)) > 10 * chi2_critical


def test_clients_refuse_to_reveal_both_secrets_of_one_client_or_a_sum_below_threshold():
    clients = {i: SecAggClient(i, 3) for i in range(3)}
    keys = {i: c.public_keys() for i, c in clients.items()}
    incoming = SecAggServer(3, 2, keys).route({i: c.share_keys(keys, 2) for i, c in clients.items()})
    for v, c in clients.items():
        c.receive_shares(incoming[v])
    clients[0].unmask_shares([0, 1], [2])
    with pytest.raises(SecAggError, match="both secrets of client 2"):
        clients[0].unmask_shares([0, 2], [1])  # 2's self mask now, after its key: would unmask 2
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        clients[1].unmask_shares([1], [0, 2])


def test_a_tampered_share_is_refused_and_the_server_needs_threshold_answers():
    clients = {i: SecAggClient(i, 1) for i in range(3)}
    keys = {i: c.public_keys() for i, c in clients.items()}
    server = SecAggServer(1, 3, keys)
    incoming = server.route({i: c.share_keys(keys, 3) for i, c in clients.items()})
    blob = bytearray(incoming[0][1])
    blob[-1] ^= 1
    with pytest.raises(InvalidTag):
        clients[0].receive_shares({1: bytes(blob)})
    with pytest.raises(SecAggError, match="threshold is 3"):
        server.aggregate({0: np.zeros(4, np.uint64), 1: np.zeros(4, np.uint64)}, {}, [0, 1, 2])


def test_fixed_point_encoding_wraps_sums_and_refuses_overflow():
    a, b = np.array([1.5, -2.25, 1e-3]), np.array([-3.0, 0.25, 2e-3])
    assert np.allclose(decode(encode(a, FRAC) + encode(b, FRAC), FRAC), a + b, atol=2.0**-FRAC)
    with pytest.raises(SecAggError, match="fixed-point range"):
        encode(np.array([2.0**40]), FRAC)
    assert not np.array_equal(prg(b"k" * 32, 8), prg(b"j" * 32, 8))


def test_dirichlet_split_partitions_the_corpus_non_iid_and_deterministically():
    n, clients, topics = 2000, 4, 8
    shards = split_documents(n, clients, "dirichlet", 0.3, topics, seed=7)
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))  # every document, once
    assert all(len(s) > 0 for s in shards)
    assert all(np.array_equal(a, b) for a, b in zip(shards, split_documents(n, clients, "dirichlet", 0.3, topics, seed=7)))

    def spread(parts):  # mean total-variation distance between a client's topic mix and the corpus'
        mixes = [np.array(topic_histogram(p, n, topics)) / len(p) for p in parts]
        return float(np.mean([0.5 * np.abs(m - 1 / topics).sum() for m in mixes]))

    assert spread(shards) > 0.3 > 0.05 > spread(split_documents(n, clients, "iid", 0.3, topics, seed=7))


def test_client_dp_clips_the_update_to_the_bound():
    delta = np.full(100, 1.0)  # norm 10
    clipped, norm = clip_and_noise(delta, clip_norm=0.5, noise_std=0.0)
    assert norm == pytest.approx(10.0) and np.linalg.norm(clipped) == pytest.approx(0.5)
    noisy, _ = clip_and_noise(delta, 0.5, noise_std=1.0)
    assert np.std(noisy - clipped) == pytest.approx(1.0, rel=0.3)


def test_proximal_term_is_the_squared_distance_to_the_anchor():
    w = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    w0 = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    assert float(proximal_term(w, w0)) == pytest.approx(1 + 4 + 4)


def test_federated_recipe_errors_name_their_key():
    with pytest.raises(RecipeError, match="min_clients"):
        load_recipe("jobs/recipes/federated-tiny.yaml", ["federated.min_clients=5"])
    with pytest.raises(RecipeError, match="secure_aggregation.threshold"):
        load_recipe("jobs/recipes/federated-tiny.yaml", ["federated.secure_aggregation.threshold=4"])
    with pytest.raises(RecipeError, match="fail_client"):
        load_recipe("jobs/recipes/federated-tiny.yaml", ["federated.fail_client=4"])
