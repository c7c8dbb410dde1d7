"""Canary exposure (``llm_ray/privacy/canary.py``): the exposure math on hand-built scorers, the
canaries against the PII scrubber, exact planting, the cached-prefix scorer against a full
forward, one-line refusals; and one real run (Ray Train + DeepSpeed) of a plain and a DP-SGD
arm on the same planted corpus and steps, where DP must lower the repeated canaries' exposure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llm_ray.config import PIIConfig, RecipeError
from llm_ray.config.canary import CanaryConfig, ExposureConfig, load_canary_spec
from llm_ray.privacy.canary import (
    Canary,
    SecretScorer,
    canary_stage,
    check_scrubber_catches,
    exact_ranks,
    exposure_of_rank,
    make_canaries,
    measure_exposure,
    plant,
    random_baseline,
    scrub_documents,
    write_documents,
)
from tests.conftest import CORPUS, REPO

SPEC = str(REPO / "jobs" / "recipes" / "canary-tiny.yaml")
BASE = str(REPO / "jobs" / "recipes" / "tiny-cpu.yaml")


def _table_scorer(table: np.ndarray):
    """A hand-built scorer: secret "0042" has NLL table[42]."""
    return lambda secrets: table[[int(s) for s in secrets]]


def _at_ranks(table: np.ndarray, ranks) -> list[Canary]:
    order = np.argsort(table)
    return [Canary(f"{order[r - 1]:04d}", "", 1) for r in ranks]


def test_exact_exposure_is_log_space_over_rank_and_a_random_rank_averages_log2_e():
    table = np.random.default_rng(0).permutation(10_000).astype(float)  # distinct NLLs: rank = place
    ranks = [1, 10, 100, 10_000]
    m = measure_exposure(_table_scorer(table), _at_ranks(table, ranks), ExposureConfig(), digits=4, seed=0)
    assert m["method"] == "exact" and list(m["rank"]) == ranks
    assert np.allclose(m["exposure"], [math.log2(10_000 / r) for r in ranks])  # 13.29 ... 0 bits
    assert exact_ranks(np.array([2.0]), np.array([1.0, 2.0, 2.0, 2.0, 3.0]))[0] == 3  # ties: mid rank
    # log2 N - log2(N!)/N is the mean exposure over every rank of 1..N, about log2 e for large N
    n = 1000
    assert random_baseline(n) == pytest.approx(np.mean(exposure_of_rank(np.arange(1, n + 1), n)), rel=1e-9)
    assert random_baseline(10_000) == pytest.approx(math.log2(math.e), abs=0.01)


def test_skew_normal_estimate_is_close_to_the_exact_exposure_where_both_apply():
    """Within 0.4 bits at ranks >= 100 of 10^4; further out the empirical tail of the table is
    itself too noisy to compare with (rank 10 ± sqrt(10) is ± 0.4 bits)."""
    table = np.random.default_rng(1).normal(30.0, 4.0, size=10_000)
    canaries = _at_ranks(table, [100, 1000, 5000])
    exact = measure_exposure(_table_scorer(table), canaries, ExposureConfig(), digits=4, seed=0)
    approx = measure_exposure(_table_scorer(table), canaries, ExposureConfig(exact_max=10, samples=3000), digits=4, seed=0)
    assert approx["method"] == "skewnorm"
    assert np.abs(approx["exposure"] - exact["exposure"]).max() < 0.4, (approx["exposure"], exact["exposure"])
    assert np.abs(exact["estimate"] - exact["exposure"]).max() < 0.4  # the exact path's own estimate
    # no estimate beats rank 1: a canary far below every sample is capped at log2 |R|
    far = measure_exposure(lambda s: np.where(np.array(s) == canaries[0].secret, -1e9, _table_scorer(table)(s)),
                           canaries[:1], ExposureConfig(exact_max=10, samples=3000), digits=4, seed=0)
    assert far["exposure"][0] == pytest.approx(math.log2(10_000))


def test_canaries_are_distinct_seeded_and_every_one_is_caught_by_the_pii_scrubber():
    from llm_ray.data.pii import scrub_pii

    cfg = CanaryConfig(digits=4, per_repeat=3, repeats=[1, 4, 16], controls=5, seed=3)
    canaries = make_canaries(cfg)
    assert [c.repeats for c in canaries] == [1] * 3 + [4] * 3 + [16] * 3 + [0] * 5
    assert len({c.secret for c in canaries}) == 14 and all(len(c.secret) == 4 and c.secret.isdigit() for c in canaries)
    assert canaries == make_canaries(cfg) and canaries != make_canaries(CanaryConfig(seed=4, per_repeat=3, controls=5))
    check_scrubber_catches(canaries)
    for c in canaries:
        assert scrub_pii(c.text, PIIConfig())[0] == "my phone number is <PHONE>"
    with pytest.raises(RecipeError) as e:  # a format pii.py does not detect is refused by name
        check_scrubber_catches(make_canaries(CanaryConfig(template="my pin is {secret}")))
    assert e.value.key == "canaries.template"


def test_planting_inserts_each_canary_exactly_its_repeats_as_whole_documents(tmp_path):
    from llm_ray.data.text_files import read_documents

    documents = read_documents([str(CORPUS)])[:60]
    canaries = make_canaries(CanaryConfig(per_repeat=2, repeats=[1, 3, 7], controls=4))
    planted = plant(documents, canaries, seed=5)
    assert len(planted) == len(documents) + 2 * (1 + 3 + 7)
    for c in canaries:
        assert planted.count(c.text) == c.repeats and sum(c.secret in d for d in planted) == c.repeats
    assert [d for d in planted if d not in {c.text for c in canaries}] == documents  # order kept
    seven = next(c for c in canaries if c.repeats == 7)
    assert np.diff([i for i, d in enumerate(planted) if d == seven.text]).max() > 1  # its copies spread out
    assert planted == plant(documents, canaries, seed=5) != plant(documents, canaries, seed=6)
    path = write_documents(str(tmp_path / "planted.txt"), planted)
    assert read_documents([path]) == planted  # the file splits back into the same documents
    scrubbed, counts = scrub_documents(planted)
    assert scrubbed.count("my phone number is <PHONE>") == 2 * 11 and counts["phone"] >= 2 * 11
    assert not any(c.secret in d for c in canaries for d in scrubbed if d.startswith("my phone"))


def test_cached_prefix_scorer_equals_a_full_forward():
    """Context once into a KV cache, candidates on top (right-padded to the longest in the batch):
    the NLLs of one full forward each."""
    import torch

    from llm_ray.data.tokenizer import train_tokenizer
    from llm_ray.models import build_model
    from llm_ray.models.losses import sequence_logprobs
    from tests.conftest import tiny_cfg

    tok = train_tokenizer([str(CORPUS)], "bpe", 2048)  # merges some digit pairs: secrets of 4 and 5 tokens
    torch.manual_seed(0)
    model = build_model(tiny_cfg(tok.get_vocab_size())).eval()
    sep = tok.token_to_id("<|endoftext|>")
    scorer = SecretScorer(model, tok, "my phone number is 020 7946 {secret}", sep, batch_size=7)
    secrets = [f"{i:04d}" for i in (0, 7, 42, 1234, 5000, 9999, 1990, 2024, 31, 808, 77)]
    got = scorer(secrets)
    context, tails = scorer._split(secrets)
    assert len({len(t) for t in tails}) > 1  # candidates of different token lengths in one batch
    for secret, tail, nll in zip(secrets, tails, got):
        ids = torch.tensor([[sep, *context, *tail]])
        labels = torch.full_like(ids, -100)
        labels[0, len(context) : len(context) + len(tail)] = torch.tensor(tail)
        with torch.no_grad():
            want = -sequence_logprobs(model(ids), labels).item()
        assert nll == pytest.approx(want, abs=1e-4), secret


def test_bad_specs_are_one_line_errors_naming_the_key_before_ray(tmp_path):
    for override, key in [("canaries.repeats=[0]", "canaries.repeats"), ("arms=[plain,plain]", "arms"),
                          ("canaries.template='020 7946 {secret} x'", "canaries.template"), ("arms=[dp,laplace]", "arms[1]")]:
        with pytest.raises(RecipeError) as e:
            load_canary_spec(SPEC, [override])
        assert e.value.key == key, str(e.value)
    # the DP arm's refusal of a global clip comes from the arm's recipe, before any Ray work
    with pytest.raises(RecipeError) as e:
        canary_stage(load_canary_spec(SPEC, ["train_set=[optim.grad_clip=1.0]", f"train_recipe={BASE}"]), str(tmp_path / "out"))
    assert e.value.key == "optim.grad_clip" and "arm dp" in e.value.message
    assert not (tmp_path / "out" / "runs").exists()
    (tmp_path / "used" / "runs" / "plain").mkdir(parents=True)  # a folder holding an earlier stage's runs
    with pytest.raises(RecipeError) as e:
        canary_stage(load_canary_spec(SPEC, [f"train_recipe={BASE}"]), str(tmp_path / "used"))
    assert e.value.key == "--out"
    # through the CLI: exit 2, one line on stderr
    proc = subprocess.run([str(Path(sys.executable).parent / "llm-ray"), "canary", SPEC, "--set", "canaries.template=my pin is {secret}",
                           "--out", str(tmp_path / "cli")], capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("llm-ray: invalid recipe: canaries.template"), proc.stderr


def test_dp_sgd_lowers_the_exposure_of_repeated_canaries_on_the_same_corpus_and_steps(ray_cluster, tokenizer_paths, tmp_path):
    """A 2-layer d=64 decoder, 150 steps of 16 sequences on 100 documents plus the canaries: the
    plain model memorises the 16x canaries (about 11-12 of 13.3 bits here); DP-SGD (σ = 1) keeps
    them near the never-inserted controls."""
    train = [f"data.paths=[{CORPUS}]", f"data.tokenizer.path={tokenizer_paths['bpe']}", "data.seq_len=32", "model.d_model=64", "model.n_layers=2",
             "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64", "optim.lr=6e-3", "optim.warmup_steps=2",
             "optim.grad_clip=0", "train.precision=fp32", "train.peak_tflops=1", "train.global_batch_size=16",
             "train.micro_batch_size=16", "train.max_steps=150", "checkpoint.every_steps=1000", "run.progress_bar=false"]
    spec = load_canary_spec(SPEC, ["arms=[plain,dp]", "max_documents=100", "canaries.repeats=[1,16]", f"train_set={json.dumps(train)}",
                                   f"train_recipe={BASE}", "exposure.batch_size=2048"])
    result = canary_stage(spec, str(tmp_path / "canary"))
    arms = result.summary["arms"]
    plain, dp = arms["plain"], arms["dp"]
    assert plain["steps"] == dp["steps"] == 150 and 0 < dp["epsilon"] < float("inf")
    assert json.loads((tmp_path / "canary" / "summary.json").read_text())["arms"]["dp"]["epsilon"] == dp["epsilon"]
    assert "| plain |" in (tmp_path / "canary" / "report.md").read_text()
    repeated_plain, repeated_dp = plain["exposure"]["16"]["mean"], dp["exposure"]["16"]["mean"]
    assert repeated_plain > plain["controls"]["mean"] + 4, plain  # memorised: far above never-seen secrets
    assert repeated_plain > plain["exposure"]["1"]["mean"] + 3, plain  # and more so with repetition
    assert repeated_plain - repeated_dp > 4, (plain["exposure"], dp["exposure"])
