"""Generation: settings validation, logits rules against transformers' processors, cached ==
uncached, seeded sampling, stop strings, chat templates, and SmolLM2 greedy / beam search
token-for-token equal to transformers' ``generate``."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llm_ray.bundle import load_bundle
from llm_ray.config import ModelConfig
from llm_ray.generation.api import generate, left_pad
from llm_ray.generation.beam import beam_search
from llm_ray.generation.chat import CHATML_TEMPLATE, bundle_special_tokens, render_chat
from llm_ray.generation.config import GenerationConfig, SamplingParams
from llm_ray.generation.logits import make_generators, process_logits, select_next_tokens
from llm_ray.generation.sampling import decode
from llm_ray.models import build_model

V = 97


def tiny_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    return build_model(ModelConfig(**{**base, **kw})).eval()


def padded_prompts(seed: int = 1):
    """Three prompts of lengths 4, 7 and 6, left-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, V, (n,), generator=g).tolist() for n in (4, 7, 6)]
    return left_pad(rows, pad_id=0)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_bundle(smollm2_dir)


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", 0), ("repetition_penalty", 0.0)],
)
def test_bad_sampling_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "kw,field",
    [({"num_beams": 0}, "num_beams"), ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
     ({"early_stopping": "sometimes"}, "early_stopping"), ({"num_beams": 2, "do_sample": True}, "do_sample")],
)
def test_bad_beam_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        GenerationConfig(**kw)


# --- logits rules -------------------------------------------------------------------------------


def test_repetition_penalty_equals_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g) * 3
    history = torch.randint(0, V, (4, 9), generator=g)
    ours = process_logits(logits, SamplingParams(repetition_penalty=1.3), history)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, logits)


def test_temperature_top_k_top_p_equal_transformers_warpers():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, V, generator=g) * 2
    p = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8)
    ref = TemperatureLogitsWarper(0.7)(None, logits.clone())
    ref = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(20)(None, ref))
    ours = process_logits(logits, p)
    # Ours divides logits - max by the temperature (finite for tiny temperatures): the same
    # distribution and the same kept tokens, shifted logits.
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours.log_softmax(-1), ref.log_softmax(-1))


def test_each_row_follows_its_own_params():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, V, generator=g)
    history = [[5, 6], [], [7]]
    params = [
        SamplingParams(),  # greedy
        SamplingParams(do_sample=True, top_k=1, seed=3),  # sampling, but only one token allowed
        SamplingParams(repetition_penalty=50.0),  # greedy with a huge penalty on token 7
    ]
    logits[2, 7] = logits[2].max() + 1.0  # token 7 would win without the penalty
    out = select_next_tokens(logits, params, history, make_generators(params))
    assert out[0] == logits[0].argmax() and out[1] == logits[1].argmax()
    assert out[2] != 7


def test_seeded_sampling_is_reproducible_and_stays_in_the_top_k_and_top_p_support():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, V, generator=g) * 2
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist())  # smallest set reaching 0.5

    def draws(p, n=200):
        gens = make_generators([p])
        return [int(select_next_tokens(logits, [p], None, gens)) for _ in range(n)]

    p = SamplingParams(do_sample=True, top_k=5, seed=11)
    first = draws(p)
    assert first == draws(p)  # same seed, same tokens
    assert first != draws(p.replace(seed=12))
    assert set(first) <= top5 and len(set(first)) > 1
    nucleus_draws = draws(SamplingParams(do_sample=True, top_p=0.5, seed=4))
    assert set(nucleus_draws) <= nucleus


# --- the loops on a small random model ----------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [SamplingParams(max_new_tokens=10),
     SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.2, seed=5)],
    ids=["greedy", "sampling"],
)
def test_cached_generation_equals_uncached(params):
    model = tiny_model()
    ids, mask = padded_prompts()
    rows = [params.replace(seed=None if params.seed is None else params.seed + i) for i in range(3)]
    cached = decode(model, ids, rows, mask, eos_ids=[3])
    uncached = decode(model, ids, rows, mask, eos_ids=[3], use_cache=False)
    assert cached.tokens == uncached.tokens
    assert all(len(t) == 10 or t[-1] == 3 for t in cached.tokens)


def test_left_padded_row_generates_as_if_alone():
    model = tiny_model()
    ids, mask = padded_prompts()
    batch = decode(model, ids, SamplingParams(max_new_tokens=8), mask)
    alone = decode(model, ids[:1, 3:], SamplingParams(max_new_tokens=8))  # row 0 has 3 pads
    assert batch.tokens[0] == alone.tokens[0]


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_cached_beam_search_equals_uncached(early_stopping):
    model = tiny_model(seed=3)
    ids, mask = padded_prompts()
    cfg = GenerationConfig(max_new_tokens=8, num_beams=3, length_penalty=0.7, early_stopping=early_stopping, num_return_sequences=2)
    a = beam_search(model, ids, cfg, mask, eos_ids=[5, 9])
    b = beam_search(model, ids, cfg, mask, eos_ids=[5, 9], use_cache=False)
    assert a.tokens == b.tokens
    assert all(s[0] >= s[1] for s in a.scores)  # best first


def test_beam_search_with_one_beam_is_greedy():
    model = tiny_model(seed=4)
    ids, mask = padded_prompts()
    beams = beam_search(model, ids, GenerationConfig(max_new_tokens=8, num_beams=1), mask)
    greedy = decode(model, ids, SamplingParams(max_new_tokens=8), mask)
    assert [h[0] for h in beams.tokens] == greedy.tokens


# --- SmolLM2 against transformers ---------------------------------------------------------------


def _hf_prompts(tok):
    """Two chats (answers end in <|im_end|>) and a plain prompt, of different lengths."""
    chats = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "Name one planet."}]]
    rows = [tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True) for c in chats]
    rows = [list(r["input_ids"]) if hasattr(r, "keys") else list(r) for r in rows]
    rows.append(tok("Once upon a time, in a small village near the sea,").input_ids)
    return left_pad(rows, pad_id=2)


def _generated(ref: torch.Tensor, T: int, eos: int = 2) -> list[list[int]]:
    """HF's rows without the prompt, cut after the first eos (HF pads after it)."""
    out = []
    for row in ref[:, T:].tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def test_smollm2_greedy_equals_transformers(smollm2, smollm2_hf_session):
    hf, tok = smollm2_hf_session
    ids, mask = _hf_prompts(tok)
    with torch.inference_mode():
        ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=2, eos_token_id=2)
    ours = decode(smollm2.model, ids, SamplingParams(max_new_tokens=16), mask, eos_ids=smollm2.eos_ids)
    assert ours.tokens == _generated(ref, ids.shape[1])
    assert "stop" in ours.finish_reasons  # a chat answer ended in eos: the eos path is covered


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", [(3, 0.6, True), (4, 1.5, False), (4, 2.0, "never")])
def test_smollm2_beam_search_equals_transformers(smollm2, smollm2_hf_session, num_beams, length_penalty, early_stopping):
    hf, tok = smollm2_hf_session
    ids, mask = _hf_prompts(tok)
    kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=2, max_new_tokens=10)
    with torch.inference_mode():
        ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=2, eos_token_id=2, **kw)
    out = beam_search(smollm2.model, ids, GenerationConfig(**kw), mask, eos_ids=smollm2.eos_ids, pad_id=2)
    assert [h for hyps in out.tokens for h in hyps] == _generated(ref, ids.shape[1])


def test_smollm2_chat_template_equals_transformers(smollm2, smollm2_hf_session):
    _, tok = smollm2_hf_session
    chats = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."}],
    ]
    for chat in chats:
        for agp in (True, False):
            ref = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=agp)
            assert render_chat(chat, smollm2.chat_template, agp, bundle_special_tokens(smollm2)) == ref


def test_chatml_fallback_and_bad_messages():
    text = render_chat([{"role": "user", "content": "hi"}], None)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat([{"role": "user", "content": "hi"}], CHATML_TEMPLATE, add_generation_prompt=False).endswith("<|im_end|>\n")
    with pytest.raises(ValueError, match=r"^messages\[0\]"):
        render_chat([{"role": "user"}], None)


def test_generate_api_chat_stop_strings_and_seeds(smollm2):
    [answer] = generate(smollm2, [{"role": "user", "content": "What is the capital of France?"}], GenerationConfig(max_new_tokens=20))
    assert "Paris" in answer.text and answer.finish_reason == "stop" and answer.token_ids[-1] in smollm2.eos_ids

    free = generate(smollm2, "The capital of France is", GenerationConfig(max_new_tokens=8))[0]
    assert "." in free.text  # the stop string below does occur
    cut = generate(smollm2, "The capital of France is", GenerationConfig(max_new_tokens=8, stop=["."]))[0]
    assert cut.finish_reason == "stop" and "." not in cut.text
    assert free.text.startswith(cut.text) and len(cut.token_ids) < len(free.token_ids)

    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.0, top_p=0.9, seed=7)
    prompts = ["Once upon a time", "My favourite food is"]
    first = [r.token_ids for r in generate(smollm2, prompts, cfg)]
    assert first == [r.token_ids for r in generate(smollm2, prompts, cfg)]


def test_generate_command_writes_summary(smollm2_dir, tmp_path, capsys):
    from llm_ray.cli import main

    main(["generate", smollm2_dir, "--prompt", "What is 2+2?", "--chat", "--num-beams", "2", "--length-penalty", "0.8",
          "--max-new-tokens", "12", "--out", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["num_beams"] == 2 and "4" in summary["results"][0]["text"]

    with pytest.raises(SystemExit) as e:
        main(["generate", smollm2_dir, "--prompt", "x", "--top-p", "0"])
    assert e.value.code == 2
    assert "top_p:" in capsys.readouterr().err
