"""The continuous-batching engine in-process (no Ray): fault isolation, log-probs, n samples,
and the rollout-worker API (versioned ``update_weights``) that RL training builds on."""

from __future__ import annotations

import asyncio

import pytest
import torch

from llm_ray.generation.config import SamplingParams
from llm_ray.serve.engine import ContinuousBatchingEngine
from test_serve import _tiny_model, reference_ids

PROMPTS = ["import the data", "a b c d e f", "the model the loss", "ray worker shard"]


@pytest.fixture(scope="module")
def tiny(tokenizer_paths):
    model, cfg, tok = _tiny_model(tokenizer_paths["bpe"])
    return model, tok


def _engine(model, **kw) -> ContinuousBatchingEngine:
    return ContinuousBatchingEngine(model, eos_ids=[], max_seq_len=256, **kw)


async def _collect(engine, seq) -> list[int]:
    return [t async for t in engine.tokens(seq)]


def test_a_failure_in_one_rows_sampling_fails_that_request_alone(tiny):
    """A logits processor that raises at its third token fails its own request ("error", the
    cause kept); the other rows of the same batch finish with their correct greedy answers and
    the engine stays healthy for the next request."""
    model, tok = tiny
    prompts = [tok.encode(p).ids for p in PROMPTS]

    def broken(out_ids, logits):
        if len(out_ids) == 2:
            raise RuntimeError("injected sampling failure")
        return logits

    async def scenario():
        engine = _engine(model)
        seqs = [engine.submit(p, SamplingParams(max_new_tokens=10), processors=[broken] if i == 1 else None, request_id=f"r{i}")
                for i, p in enumerate(prompts)]
        outs = await asyncio.gather(*(_collect(engine, s) for s in seqs))
        after = engine.submit(prompts[0], SamplingParams(max_new_tokens=10))
        again = await _collect(engine, after)
        engine.shutdown()
        return engine, seqs, outs, again

    engine, seqs, outs, again = asyncio.run(scenario())
    assert seqs[1].finish_reason == "error" and "injected sampling failure" in seqs[1].error
    assert len(outs[1]) == 2  # its tokens before the failure
    for i in (0, 2, 3):
        assert seqs[i].finish_reason == "length"
        assert outs[i] == reference_ids(model, prompts[i], 10)
    assert engine.error is None and again == outs[0]


def test_hostile_sampling_values_give_finite_distributions(tiny):
    """A temperature of 1e-38 and extreme penalties: no inf - inf = NaN reaches the sampler."""
    from llm_ray.generation.logits import make_generators, select_next_tokens

    logits = torch.randn(3, 100) * 5
    params = [
        SamplingParams(do_sample=True, temperature=1e-38, seed=1),
        SamplingParams(do_sample=True, repetition_penalty=0.01, presence_penalty=2, frequency_penalty=2, seed=2),
        SamplingParams(do_sample=True, top_k=2**31 - 1, seed=2**64 - 1),
    ]
    ids = select_next_tokens(logits, params, [[1, 2, 3]] * 3, make_generators(params), outputs=[[4, 4]] * 3)
    assert int(ids[0]) == int(logits[0].argmax())  # a vanishing temperature is greedy
    assert ((0 <= ids) & (ids < 100)).all()


def test_presence_frequency_penalties_and_logit_bias_follow_openai(tiny):
    """logit[j] += bias[j] - count[j] * frequency - (count[j] > 0) * presence, counts over the
    generated tokens only."""
    from llm_ray.generation.logits import process_logits

    logits = torch.randn(1, 50)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={7: 3.0, 9: -100.0})
    out = process_logits(logits, [p], outputs=[[4, 4, 4, 5]])
    want = logits.clone()[0]
    want[7] += 3.0
    want[9] -= 100.0
    want[4] -= 3 * 0.25 + 0.5
    want[5] -= 1 * 0.25 + 0.5
    torch.testing.assert_close(out[0], want)


def test_logprobs_n_samples_and_versioned_weight_updates(tiny):
    """Greedy log-probs equal log_softmax of the model's logits; n seeded samples share one
    prefill and reproduce; update_weights switches outputs to the new model's, tagged with its
    version, both when in-flight rows finish first and when they are re-run."""
    model, tok = tiny
    prompt = tok.encode(PROMPTS[2]).ids
    other, _, _ = _tiny_model_variant(tok)

    async def scenario():
        engine = _engine(model)
        greedy = (await engine.generate(prompt, [SamplingParams(max_new_tokens=8, logprobs=3)]))[0]
        samples = [SamplingParams(do_sample=True, temperature=1.0, seed=5 + i, max_new_tokens=8) for i in range(3)]
        first = await engine.generate(prompt, samples)
        steps_before = engine.steps
        second = await engine.generate(prompt, samples)
        # In flight while the weights change: "rerun" preempts it and generate() runs it again.
        running = asyncio.ensure_future(engine.generate(prompt, [SamplingParams(max_new_tokens=60)]))
        while not engine.active:
            await asyncio.sleep(0)
        await engine.update_weights(1, dict(other.named_parameters()), in_flight="rerun")
        rerun = (await running)[0]
        after = (await engine.generate(prompt, [SamplingParams(max_new_tokens=8)]))[0]
        engine.shutdown()
        return greedy, first, second, rerun, after, steps_before

    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        greedy, first, second, rerun, after, _ = asyncio.run(scenario())
    finally:
        model.load_state_dict(state)
    # log-probs: the model's log_softmax at each step of the greedy continuation
    ids = torch.tensor([prompt + greedy.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).float(), dim=-1)[0]
    want = [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(greedy.token_ids)]
    assert greedy.token_ids == reference_ids(model, prompt, 8)
    assert max(abs(a - b) for a, b in zip(greedy.logprobs, want)) < 1e-4
    assert all(g.weight_version == 0 for g in first)
    assert [o.token_ids for o in first] == [o.token_ids for o in second]  # seeded: reproducible
    assert len({tuple(o.token_ids) for o in first}) > 1  # three different samples
    assert all(len(o.sampler_logprobs) == 8 for o in first)
    assert rerun.weight_version == 1 and rerun.token_ids == reference_ids(other, prompt, 60)
    assert after.weight_version == 1 and after.token_ids == reference_ids(other, prompt, 8)
    assert after.token_ids != greedy.token_ids


def _tiny_model_variant(tok):
    """Another random model of the same shapes (the 'updated policy')."""
    from llm_ray.config import ModelConfig
    from llm_ray.models import build_model

    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model, cfg, tok


def test_update_weights_refuses_unknown_names_and_shapes_and_changes_nothing(tiny):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.named_parameters()}
    name, p = next(iter(model.named_parameters()))

    async def scenario():
        engine = _engine(model)
        with pytest.raises(KeyError, match="no parameter"):
            await engine.update_weights(1, {"nope.weight": p})
        with pytest.raises(ValueError, match=name):
            await engine.update_weights(1, {name: torch.zeros(3)})
        engine.shutdown()
        return engine.weight_version

    assert asyncio.run(scenario()) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())


def test_a_prefix_cache_hit_returns_exactly_the_tokens_of_a_miss(tiny):
    """Prompts sharing a long system prefix: the later ones prefill only their suffix (from
    cached blocks, batched with other prompts whose cached prefixes differ in length) and their
    greedy tokens equal the uncached engine's and the single-sequence decode."""
    model, tok = tiny
    system = tok.encode("You are a terse assistant for the data model and the training loop. " * 3).ids
    prompts = [system + tok.encode(q).ids for q in ("what is a shard", "resume the checkpoint", "a b c", "the loss")]
    prompts.append(tok.encode("unrelated prompt with no shared prefix at all").ids)

    async def run(prefix_tokens: int):
        engine = _engine(model, prefix_cache_tokens=prefix_tokens)
        first = await engine.generate(prompts[0], [SamplingParams(max_new_tokens=12)])  # fills the cache
        rest = await asyncio.gather(*(engine.generate(p, [SamplingParams(max_new_tokens=12)]) for p in prompts[1:]))
        engine.shutdown()
        return [first[0].token_ids] + [r[0].token_ids for r in rest], engine.prefix_cache

    cached, pc = asyncio.run(run(4096))
    plain, off = asyncio.run(run(0))
    assert cached == plain == [reference_ids(model, p, 12) for p in prompts]
    assert pc.hit_tokens >= 3 * (len(system) // 16) * 16 and 0 < pc.hit_rate < 1
    assert off.hit_tokens == 0 and pc.cached_tokens <= 4096


def test_prefix_cache_is_bounded_in_tokens_and_evicts_least_recent(tiny):
    from llm_ray.serve.prefix_cache import PrefixCache

    pc = PrefixCache(capacity_tokens=64, block_size=16)
    kv = lambda n: [(torch.randn(2, n, 4), torch.randn(2, n, 4))]  # noqa: E731
    a, b = list(range(100, 149)), list(range(200, 249))  # 49 tokens: 3 full blocks each
    pc.store(a, kv(49))
    assert pc.lookup(a)[0] == 48 and pc.cached_tokens == 48
    pc.store(b, kv(49))  # 96 > 64 tokens: a's chain goes first, from its end
    assert pc.cached_tokens <= 64 and pc.lookup(b)[0] == 48
    n_a, _ = pc.lookup(a)
    assert n_a < 48


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny):
    """A 150-token prompt with a 32-token budget per step goes in 5 chunks; the request already
    decoding gets a token at each of those steps instead of waiting for the whole prefill, and
    both answers equal the single-sequence decode."""
    model, tok = tiny
    short = tok.encode("the model").ids
    long = (tok.encode("import the data model train serve loss step token batch cache ray worker shard ").ids * 12)[:150]

    async def scenario():
        engine = _engine(model, prefill_tokens_per_step=32)
        s = engine.submit(short, SamplingParams(max_new_tokens=40))
        first = await s.queue.get()  # s is decoding
        assert first.token_id is not None
        before = len(s.output_ids)
        lg = engine.submit(long, SamplingParams(max_new_tokens=6))
        ev = await lg.queue.get()  # the long prompt's first token
        during = len(s.output_ids) - before
        rest_long = [ev.token_id] + [t async for t in engine.tokens(lg)]
        rest_short = [t async for t in engine.tokens(s)]
        engine.shutdown()
        return during, rest_long, [first.token_id] + rest_short, lg

    during, got_long, got_short, lg = asyncio.run(scenario())
    assert during >= 4  # decode steps ran while the long prompt went in chunk by chunk
    assert lg.n_prefilled == 150
    assert got_long == reference_ids(model, long, 6)
    assert got_short == reference_ids(model, short, 40)


@pytest.mark.parametrize("schema", [None, {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["answer", "count"],
    "additionalProperties": False,
}])
def test_json_constrained_decoding_parses_and_validates(tiny, schema):
    """response_format json_object / json_schema: a random model's output, constrained by the
    llguidance grammar, parses as JSON (and validates against the schema) and ends on eos."""
    import json

    import jsonschema

    from llm_ray.generation.grammar import JsonConstraint, grammar_tokenizer, json_grammar

    model, tok = tiny
    eos = tok.token_to_id("<|endoftext|>")
    ll = grammar_tokenizer(tok, [eos])
    grammar = json_grammar(schema)
    # A random model never closes a free-form string by itself: nudge the closing characters
    # (OpenAI's logit_bias composes with the grammar mask) so the object ends within the budget.
    closing = {i: 8.0 for t, i in tok.get_vocab().items() if t and set(t) <= set('"}')}

    async def scenario():
        engine = ContinuousBatchingEngine(model, eos_ids=[eos], max_seq_len=256)
        outs = []
        for seed in range(3):
            params = SamplingParams(do_sample=True, seed=seed, max_new_tokens=120, logit_bias=closing)
            seq = engine.submit(tok.encode("reply in json").ids, params, processors=[JsonConstraint(ll, grammar)])
            ids = [t async for t in engine.tokens(seq)]
            outs.append((tok.decode(ids), seq.finish_reason))
        engine.shutdown()
        return outs

    for text, finish in asyncio.run(scenario()):
        value = json.loads(text)
        assert isinstance(value, dict) and finish == "stop", text
        if schema is not None:
            jsonschema.validate(value, schema)


def test_batch_cache_rows_joining_and_leaving_decode_like_alone(tiny):
    """Sequences join a running batch at different steps and leave at different lengths; each
    row's greedy tokens equal its single-sequence decode."""
    import torch

    from llm_ray.serve.batch_cache import BatchKVCache

    model, tok = tiny
    prompts = [tok.encode(p).ids for p in ("import the", "a b c d e f g h", "x", "the model the data the loss")]
    lengths = [12, 5, 9, 7]
    refs = [reference_ids(model, p, n) for p, n in zip(prompts, lengths)]
    joins = {0: [0, 1], 2: [2], 4: [3]}
    cache, active, outs = BatchKVCache(len(model.layers)), [], {}
    with torch.inference_mode():
        for step in range(40):
            for i in joins.get(step, []):
                fresh = BatchKVCache(len(model.layers))
                outs[i] = [int(model(torch.tensor([prompts[i]]), kv_cache=fresh)[0, -1].argmax())]
                cache.merge(fresh)
                active.append(i)
            if not active:
                break
            logits = model(torch.tensor([[outs[i][-1]] for i in active]), kv_cache=cache)[:, -1]
            for row, i in enumerate(active):
                outs[i].append(int(logits[row].argmax()))
            keep = [r for r, i in enumerate(active) if len(outs[i]) < lengths[i]]
            cache.keep(keep)
            active = [active[r] for r in keep]
            assert cache.batch_size == len(active)
    assert [outs[i][: lengths[i]] for i in range(4)] == refs


def test_streamed_tokens_coalesce_within_the_interval(tiny):
    """The first tokens go out at once (the step that prefills also decodes: 1 or 2 tokens);
    later ones that arrive within the interval share one message; with no interval each goes
    as it comes. The ids are the same either way."""
    model, tok = tiny

    async def batches(engine, interval_s):
        seq = engine.submit(tok.encode("the model").ids, SamplingParams(max_new_tokens=20), ignore_eos=True)
        return [b async for b in engine.token_batches(seq, interval_s=interval_s)]

    async def scenario():
        engine = _engine(model)
        slow = await batches(engine, 60.0)
        fast = await batches(engine, 0.0)
        engine.shutdown()
        return slow, fast

    slow, fast = asyncio.run(scenario())
    want = reference_ids(model, tok.encode("the model").ids, 20)
    assert len(slow) == 2 and len(slow[0]) <= 2
    assert sum(slow, []) == sum(fast, []) == want
    assert len(fast) > 2 and all(fast)
