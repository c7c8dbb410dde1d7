"""Serving: real Ray Serve, real HTTPS, a tiny random decoder (seconds to load).

One Serve instance for the module, over HTTPS with a test CA made here, with three
applications: ``/main`` (API keys on, batch 32), ``/small`` (one batch slot, one queue place:
overload on purpose; it serves an int8 quantized copy of the model folder run on int8 matmuls,
``llm-ray compress``'s int8_dynamic output) and ``/limited`` (a key stored only as its sha256,
3 requests a minute).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port
from tests.tls_ca import make_test_ca

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-1"
LIMITED_KEY = "test-key-limited"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = [
    f"{w} {i}" for i, w in enumerate(
        "import the data model train serve loss step token batch cache ray worker shard "
        "checkpoint resume text with from for and of to in a is that it on by be as at".split()
    )
]


def _tiny_model(tokenizer_path: str):
    """A random 2-layer GQA decoder with weights scaled up so greedy outputs vary token to token
    (at init scale every row repeats one token and a mix-up between rows would go unseen)."""
    import torch

    from llm_ray.config import ModelConfig
    from llm_ray.data.tokenizer import load_tokenizer
    from llm_ray.models import build_model

    tok = load_tokenizer(tokenizer_path)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model, cfg, tok


@pytest.fixture(scope="module")
def tiny_dir(tokenizer_paths, tmp_path_factory) -> str:
    from llm_ray.bundle import save_bundle

    model, cfg, tok = _tiny_model(tokenizer_paths["bpe"])
    tok_config = {"chat_template": CHAT_TEMPLATE, "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    return save_bundle(model, cfg, tok.to_str(), str(tmp_path_factory.mktemp("serve") / "tiny"), tokenizer_config=tok_config)


@pytest.fixture(scope="module")
def bundle(tiny_dir):
    from llm_ray.bundle import load_bundle

    return load_bundle(tiny_dir)


@pytest.fixture(scope="module")
def int8_dir(bundle, tiny_dir):
    """The tiny folder with its matrices stored as int8, loaded to run int8 activations too
    (what ``llm-ray compress`` writes for int8_dynamic)."""
    from llm_ray.bundle import save_bundle

    tok_config = json.loads(open(f"{tiny_dir}/tokenizer_config.json").read())
    return save_bundle(bundle.model, bundle.cfg, bundle.tokenizer.to_str(), f"{tiny_dir}-int8", tokenizer_config=tok_config,
                       quantization={"scheme": "int8", "activations": "int8_dynamic"})


TLS: dict = {}  # the module's test CA, filled by the server fixture


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_dir, int8_dir, tmp_path_factory):
    """Base URLs of the three applications on one Serve proxy speaking HTTPS only."""
    from ray import serve

    from llm_ray.config.serve import ServeConfig
    from llm_ray.serve.app import deployment_for

    TLS.update(make_test_ca(tmp_path_factory.mktemp("tls")))
    port = free_port()
    tls = dict(tls_certfile=TLS["cert"], tls_keyfile=TLS["key"])
    common = dict(model=tiny_dir, model_name="tiny", dtype="fp32", cpus_per_replica=0, num_replicas=1, port=port, host="127.0.0.1", **tls)
    main = ServeConfig(**common, api_keys=[KEY], max_batch_size=32, max_queue=64)
    serve.start(http_options=main.http_options())
    small = ServeConfig(**{**common, "model": int8_dir}, app_name="small", max_batch_size=1, max_queue=1, max_ongoing_requests=32, retry_after_s=2)
    limited = ServeConfig(**common, app_name="limited", api_key_sha256=[hashlib.sha256(LIMITED_KEY.encode()).hexdigest()],
                          rate_limit_per_minute=3)
    serve.run(deployment_for(main), name="main", route_prefix="/main")
    serve.run(deployment_for(small), name="small", route_prefix="/small")
    serve.run(deployment_for(limited), name="limited", route_prefix="/limited")
    base = f"https://127.0.0.1:{port}"
    yield {"main": f"{base}/main", "small": f"{base}/small", "limited": f"{base}/limited", "port": port}
    serve.shutdown()


def call(url: str, body=None, key: str | None = KEY, method: str | None = None):
    """(status, headers, body text) of one real HTTP request."""
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    context = ssl.create_default_context(cafile=TLS["ca"]) if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(req, timeout=120, context=context) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def sse_events(text: str) -> list:
    """The data of each server-sent event; the last must be [DONE]."""
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-300:]
    return [json.loads(e) for e in events[:-1]]


def reference(bundle, prompt, max_new: int):
    """The generation API's greedy answer (a prompt string or a chat): its GenerationResult."""
    from llm_ray.generation.api import generate
    from llm_ray.generation.config import GenerationConfig

    return generate(bundle, prompt, GenerationConfig(max_new_tokens=max_new))[0]


def encode(bundle, text: str) -> list[int]:
    return bundle.tokenizer.encode(text).ids


def test_engine_deadline_aborts_the_sequence_and_frees_its_row(bundle):
    """A request past its deadline raises RequestTimeoutError and leaves the batch; the engine
    keeps serving the next request correctly."""
    import asyncio

    from llm_ray.generation.config import SamplingParams
    from llm_ray.serve.engine import ContinuousBatchingEngine, QueueFullError, RequestTimeoutError

    async def scenario():
        engine = ContinuousBatchingEngine(bundle.model, bundle.eos_ids, bundle.cfg.max_seq_len, max_batch_size=4, max_queue=0)
        late = engine.submit(encode(bundle, "the data"), SamplingParams(max_new_tokens=50), ignore_eos=True)
        with pytest.raises(RequestTimeoutError):
            async for _ in engine.tokens(late, deadline=time.monotonic() - 1):
                pass
        assert late.aborted
        prompt = "the model"
        seq = engine.submit(encode(bundle, prompt), SamplingParams(max_new_tokens=12))
        got = [t async for t in engine.tokens(seq)]
        await asyncio.sleep(0.05)  # one more loop turn retires finished rows
        assert engine.active == [] and engine.cache.batch_size == 0
        # Four slots busy and no queue: the fifth request is refused at once.
        busy = [engine.submit(encode(bundle, "a"), SamplingParams(max_new_tokens=200), ignore_eos=True) for _ in range(4)]
        with pytest.raises(QueueFullError):
            engine.submit(encode(bundle, "b"), SamplingParams(max_new_tokens=4))
        for b in busy:
            engine.abort(b)
        engine.shutdown()
        return seq, got

    seq, got = asyncio.run(scenario())
    ref = reference(bundle, "the model", 12)
    assert bundle.tokenizer.decode(got, skip_special_tokens=True) == ref.text


def reference_ids(model, prompt_ids: list[int], n: int) -> list[int]:
    import torch

    from llm_ray.generation.config import SamplingParams
    from llm_ray.generation.sampling import decode

    return decode(model, torch.tensor([prompt_ids]), SamplingParams(max_new_tokens=n)).tokens[0]


# -- HTTP --------------------------------------------------------------------------------------------
def test_completions_match_the_generation_api(server, bundle):
    prompt = "The import statement"
    ref = reference(bundle, prompt, 20)
    want, want_finish = ref.text, ref.finish_reason
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0}
    status, _, text = call(f"{server['main']}/v1/completions", body)
    assert status == 200, text
    out = json.loads(text)
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    assert out["choices"][0]["text"] == want and want
    assert out["choices"][0]["finish_reason"] == want_finish
    assert out["usage"]["prompt_tokens"] == ref.num_prompt_tokens

    status, headers, text = call(f"{server['main']}/v1/completions", {**body, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == want_finish

    # A stop string cuts the answer before it and ends the generation.
    stop = want[len(want) // 2 : len(want) // 2 + 2]
    status, _, text = call(f"{server['main']}/v1/completions", {**body, "stop": [stop]})
    out = json.loads(text)
    assert out["choices"][0]["text"] == want[: want.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_chat_completions_match_the_generation_api(server, bundle):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the data model?"}]
    ref = reference(bundle, messages, 24)
    want, want_finish = ref.text, ref.finish_reason
    body = {"model": "tiny", "messages": messages, "max_tokens": 24, "temperature": 0}
    status, _, text = call(f"{server['main']}/v1/chat/completions", body)
    assert status == 200, text
    out = json.loads(text)
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert out["choices"][0]["finish_reason"] == want_finish
    assert out["usage"]["prompt_tokens"] == ref.num_prompt_tokens

    status, _, text = call(f"{server['main']}/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    chunks = sse_events(text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == want
    assert chunks[-1]["usage"]["prompt_tokens"] == ref.num_prompt_tokens


def test_32_concurrent_requests_each_get_their_own_answer(server, bundle):
    """Different prompts and lengths share forward passes; each answer equals the request's
    single-sequence greedy answer (a row mix-up or a position error shows as a different text)."""
    jobs = [(p, 8 + (i % 5) * 4) for i, p in enumerate(PROMPTS[:32])]
    wants = [reference(bundle, p, n).text for p, n in jobs]

    def one(job):
        p, n = job
        return call(f"{server['main']}/v1/completions", {"prompt": p, "max_tokens": n, "temperature": 0})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, jobs))
    assert all(status == 200 for status, _, _ in results), [r[2] for r in results if r[0] != 200][:2]
    got = [json.loads(text)["choices"][0]["text"] for _, _, text in results]
    assert len(set(wants)) > 16  # the prompts really produce different answers
    assert got == wants


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("/v1/chat/completions", b'{"messages": [', None),
        ("/v1/completions", b"[1, 2]", None),
        ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("/v1/chat/completions", {"model": "tiny"}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ("/v1/completions", {"model": "tiny"}, "prompt"),
        ("/v1/completions", {"prompt": "the " * 400}, "prompt"),
        ("/v1/completions", {"prompt": "the data", "max_tokens": 1000}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "temperature": 2.5}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "temperature": -0.1}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ],
)
def test_bad_input_answers_400_naming_the_problem(server, route, body, param):
    status, headers, text = call(server["main"] + route, body)
    assert status == 400, text
    err = json.loads(text)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    if param:
        assert param.split("[")[0].split(".")[0] in err["message"]


def test_api_keys_models_and_health(server):
    status, headers, text = call(f"{server['main']}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, key=None)
    assert status == 401 and json.loads(text)["error"]["type"] == "authentication_error"
    assert headers.get("www-authenticate") == "Bearer"
    status, _, _ = call(f"{server['main']}/v1/models", key="wrong-key")
    assert status == 401
    status, _, text = call(f"{server['main']}/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(text)["data"]] == ["tiny"]
    status, _, text = call(f"{server['main']}/health", key=None)  # probes carry no key
    assert status == 200 and json.loads(text)["status"] == "ok"
    status, _, _ = call(f"{server['small']}/v1/models", key=None)  # no keys configured: open
    assert status == 200


def test_a_quantized_model_folder_answers_through_the_endpoint(server, int8_dir):
    """/small serves the int8 folder on int8 matmuls: its greedy answer is the generation API's
    on that folder."""
    from llm_ray.bundle import load_bundle
    from llm_ray.models.quant import Int8DynamicLinear

    quantized = load_bundle(int8_dir)
    assert quantized.config["quantization"]["scheme"] == "int8" and isinstance(quantized.model.head.proj, Int8DynamicLinear)
    status, _, text = call(f"{server['small']}/v1/completions", {"prompt": "The import statement", "max_tokens": 12,
                                                                 "temperature": 0}, key=None)
    assert status == 200, text
    assert json.loads(text)["choices"][0]["text"] == reference(quantized, "The import statement", 12).text


def test_overloaded_replica_answers_503_with_retry_after(server):
    """One batch slot and one queue place: of 8 simultaneous long requests the ones that find
    both taken get 503 + Retry-After at once; the admitted ones complete."""
    body = {"prompt": "the data", "max_tokens": 200, "temperature": 0, "ignore_eos": True}

    def one(_):
        return call(f"{server['small']}/v1/completions", body)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    codes = sorted(r[0] for r in results)
    assert 503 in codes and 200 in codes, codes
    assert set(codes) <= {200, 503}, codes
    for status, headers, text in results:
        if status == 503:
            assert headers.get("retry-after") == "2"
            assert json.loads(text)["error"]["code"] == "queue_full"
        else:
            assert json.loads(text)["usage"]["completion_tokens"] == 200


def test_request_past_its_timeout_answers_408(server, tiny_dir):
    """A deadline shorter than any generation: 408 in the OpenAI error shape, or an error event
    once a stream has begun; the row is freed (the replica reports nothing running after)."""
    from ray import serve

    from llm_ray.config.serve import ServeConfig
    from llm_ray.serve.app import deployment_for

    cfg = ServeConfig(model=tiny_dir, model_name="tiny", app_name="late", dtype="fp32", cpus_per_replica=0, num_replicas=1, request_timeout_s=0.001)
    serve.run(deployment_for(cfg), name="late", route_prefix="/late")
    try:
        url = server["main"].replace("/main", "/late")
        body = {"prompt": "the data", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        status, _, text = call(f"{url}/v1/completions", body, key=None)
        assert status == 408, text
        assert json.loads(text)["error"]["code"] == "timeout"
        status, _, text = call(f"{url}/v1/completions", {**body, "stream": True}, key=None)
        assert status == 200
        events = sse_events(text)
        assert events[-1]["error"]["code"] == "timeout"
        deadline = time.monotonic() + 10
        while json.loads(call(f"{url}/health", key=None)[2])["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert json.loads(call(f"{url}/health", key=None)[2])["running"] == 0
    finally:
        serve.delete("late")


HI = [{"role": "user", "content": "hi"}]
HOSTILE = [  # each crashed the replica or answered 500 before; now a 4xx naming the field
    ("/v1/completions", {"prompt": "hi", "top_k": 2**63}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 1e-30}, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages[0].content[0].text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]}, "messages[0].content[0].text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0].type"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800 lone"}]}', "messages[0].content"),
    ("/v1/completions", b'{"prompt": "a\\udfff"}', "prompt"),
    ("/v1/completions", b'{"prompt": "a", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}", None),
    ("/v1/chat/completions", {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "xml"}}, "response_format"),
    ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": HI, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": HI, "n": 33}, "n"),
    ("/v1/chat/completions", {"messages": HI, "logit_bias": {"99999999": 5}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": HI, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
]


def test_hostile_requests_fail_alone_and_the_replica_keeps_serving(server, bundle):
    """Every input that once crashed the engine or answered 500 gets a 400 in OpenAI's shape
    naming the field, and an ordinary request sent right after it succeeds with its answer."""
    ref = reference(bundle, "The import statement", 6).text
    normal = {"prompt": "The import statement", "max_tokens": 6, "temperature": 0}
    for route, body, param in HOSTILE:
        status, _, text = call(server["main"] + route, body)
        assert status == 400, (param, text[:300])
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
        status, _, text = call(f"{server['main']}/v1/completions", normal)
        assert status == 200 and json.loads(text)["choices"][0]["text"] == ref, (param, text[:300])
    # Sampling at the edges of the bounds works (no inf or NaN reaches the sampler).
    for extreme in ({"temperature": 1e-38}, {"repetition_penalty": 0.01}, {"top_k": 2**31 - 1, "seed": 2**64 - 1}, {"frequency_penalty": -2}):
        status, _, text = call(f"{server['main']}/v1/completions", {"prompt": "hi", "max_tokens": 4, **extreme})
        assert status == 200, (extreme, text[:300])
    status, _, text = call(f"{server['main']}/health", key=None)
    assert status == 200 and json.loads(text)["status"] == "ok"


def test_every_route_error_is_in_the_openai_shape(server):
    for method, path, body, want in [
        ("GET", "/v1/chat/completions", None, 405),
        ("POST", "/v1/models", {}, 405),
        ("GET", "/v1/nowhere", None, 404),
        ("POST", "/v1/completions", b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}', 413),
    ]:
        status, _, text = call(server["main"] + path, body, method=method)
        assert status == want, (path, text[:200])
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err


def test_the_openai_client_drives_chat_streaming_logprobs_and_n(server, bundle):
    """The official client: chat, a stream ending in a usage chunk, greedy log-probs equal to
    log_softmax of our model's logits, and n=3 seeded samples that reproduce."""
    import openai
    import torch

    ca = ssl.create_default_context(cafile=TLS["ca"])
    client = openai.OpenAI(base_url=f"{server['main']}/v1", api_key=KEY, max_retries=0, http_client=openai.DefaultHttpxClient(verify=ca))
    messages = [{"role": "user", "content": "What is the data model?"}]
    want = reference(bundle, messages, 10)
    out = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0,
                                         logprobs=True, top_logprobs=3, user="test-user")
    choice = out.choices[0]
    assert choice.message.content == want.text and out.usage.completion_tokens == 10
    assert out.system_fingerprint == "llm-ray-w0"
    entries = choice.logprobs.content
    assert len(entries) == 10 and all(len(e.top_logprobs) == 3 for e in entries)
    # each token's exact bytes (a piece of a multi-byte character included) add up to the text
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8") == choice.message.content
    # The model's log-softmax at each generated position, from one forward over prompt + answer.
    from llm_ray.generation.chat import render_bundle_chat

    prompt_ids = bundle.tokenizer.encode(render_bundle_chat(bundle, messages), add_special_tokens=False).ids
    gen_ids = want.token_ids[:10]
    with torch.no_grad():
        lp = torch.log_softmax(bundle.model(torch.tensor([prompt_ids + gen_ids])).float(), dim=-1)[0]
    ref_lp = [float(lp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(gen_ids)]
    assert max(abs(e.logprob - r) for e, r in zip(entries, ref_lp)) < 1e-4
    assert all(abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6 for e in entries)  # greedy: the top one

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10

    kw = dict(model="tiny", messages=messages, max_tokens=8, temperature=1.0, n=3, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1 and 3 <= a.usage.completion_tokens <= 24  # usage counts all n choices
    streamed = list(client.chat.completions.create(**kw, stream=True))
    by_choice = {i: "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i) for i in range(3)}
    assert [by_choice[i] for i in range(3)] == texts

    # response_format: a schema-constrained answer validates (the random model is nudged to
    # close strings with logit_bias, which composes with the grammar mask).
    import jsonschema

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "count"], "additionalProperties": False}
    closing = {str(i): 8 for t, i in bundle.tokenizer.get_vocab().items() if t and set(t) <= set('"}')}
    for fmt in ({"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}, {"type": "json_object"}):
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=120, temperature=1.0, seed=3,
                                             response_format=fmt, logit_bias=closing)
        value = json.loads(out.choices[0].message.content)
        assert isinstance(value, dict) and out.choices[0].finish_reason == "stop"
        if fmt["type"] == "json_schema":
            jsonschema.validate(value, schema)

    # Completions: legacy logprobs (token strings, token_logprobs, top_logprobs dicts).
    comp = client.completions.create(model="tiny", prompt="The import statement", max_tokens=5, temperature=0, logprobs=2)
    lps = comp.choices[0].logprobs
    n_out = comp.usage.completion_tokens
    assert len(lps.tokens) == len(lps.token_logprobs) == len(lps.top_logprobs) == n_out > 0
    assert all(len(t) == 2 and max(t.values()) == pytest.approx(lp) for t, lp in zip(lps.top_logprobs, lps.token_logprobs))  # greedy


def test_200_concurrent_clients_retrying_503_all_get_their_answer(server, bundle):
    """200 clients at once against one replica (32 batch slots, 64 queue places): those turned
    away get 503 + Retry-After, wait that long and retry; every one gets its own greedy answer,
    none is lost or answered 5xx otherwise."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(200)]
    wants = {p: reference(bundle, p, 6).text for p in set(prompts)}
    statuses: list[int] = []

    def one(p):
        for _ in range(60):
            status, headers, text = call(f"{server['main']}/v1/completions", {"prompt": p, "max_tokens": 6, "temperature": 0})
            statuses.append(status)
            if status != 503:
                return status, text
            time.sleep(float(headers.get("retry-after", "1")))  # what the client is told to do
        return status, text

    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, prompts))
    assert all(st == 200 for st, _ in results), [t[:200] for st, t in results if st != 200][:3]
    assert [json.loads(t)["choices"][0]["text"] for _, t in results] == [wants[p] for p in prompts]
    assert set(statuses) <= {200, 503}


def test_smollm2_chat_over_http(server, smollm2_dir):
    """The out-of-the-box model: SmolLM2 behind the endpoint answers as the generation API does."""
    from ray import serve

    from llm_ray.bundle import load_bundle
    from llm_ray.config.serve import ServeConfig
    from llm_ray.serve.app import deployment_for

    cfg = ServeConfig(model=smollm2_dir, model_name="smollm2", app_name="smol", dtype="fp32", cpus_per_replica=0, num_replicas=1)
    serve.run(deployment_for(cfg), name="smol", route_prefix="/smol")
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        ref = reference(load_bundle(smollm2_dir), messages, 12)
        url = server["main"].replace("/main", "/smol")
        status, _, text = call(f"{url}/v1/chat/completions", {"model": "smollm2", "messages": messages, "max_tokens": 12, "temperature": 0})
        assert status == 200, text
        answer = json.loads(text)["choices"][0]["message"]["content"]
        assert answer == ref.text and "Paris" in answer
    finally:
        serve.delete("smol")


def test_metrics_reach_prometheus(server, ray_cluster):
    """TTFT, tokens, batch size and queue depth are exported by Ray's metrics agent."""
    call(f"{server['main']}/v1/completions", {"prompt": "the data", "max_tokens": 4, "temperature": 0})
    node = ray_cluster._private.worker.global_worker.node
    url = f"http://127.0.0.1:{node.metrics_export_port}/metrics"
    want = ["llm_ray_serve_time_to_first_token_s", "llm_ray_serve_generated_tokens", "llm_ray_serve_batch_size", "llm_ray_serve_queue_depth"]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if all(name in text for name in want):
            break
        time.sleep(2)
    missing = [name for name in want if name not in text]
    assert not missing, missing


def test_the_endpoint_speaks_tls_only_and_clients_must_trust_its_ca(server):
    """The openai client over https with the test CA answers; plain http on the same port and a
    client that does not trust the CA both fail."""
    import openai

    ca = ssl.create_default_context(cafile=TLS["ca"])
    client = openai.OpenAI(base_url=f"{server['main']}/v1", api_key=KEY, max_retries=0, http_client=openai.DefaultHttpxClient(verify=ca))
    assert client.completions.create(model="tiny", prompt="the data", max_tokens=3, temperature=0).usage.completion_tokens == 3
    with pytest.raises(openai.APIConnectionError):  # the system trust store does not know our CA
        openai.OpenAI(base_url=f"{server['main']}/v1", api_key=KEY, max_retries=0).models.list()
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/main/v1/models", timeout=10)


def test_keys_stored_hashed_and_a_per_key_rate_limit_answering_429(server):
    """/limited holds only the sha256 of its key: that key gets in, /main's key does not; its
    4th request within a minute is a 429 in OpenAI's shape with Retry-After."""
    status, _, text = call(f"{server['limited']}/v1/models", key=KEY)
    assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    for _ in range(3):
        assert call(f"{server['limited']}/v1/models", key=LIMITED_KEY)[0] == 200
    status, headers, text = call(f"{server['limited']}/v1/models", key=LIMITED_KEY)
    error = json.loads(text)["error"]
    assert status == 429 and error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert 0 < int(headers["retry-after"]) <= 60
    assert call(f"{server['main']}/v1/models")[0] == 200  # another app, another key: not limited


def test_prompts_stay_out_of_the_logs(server, ray_cluster):
    """A request's text appears in no file of the Ray session's logs (log_prompts is off), while
    the replica's log line for the same request (its user) is there: the search sees that log."""
    marker, user = "zebra-quartz-7731", "user-marker-5512"
    status, _, _ = call(f"{server['main']}/v1/completions", {"prompt": f"say {marker}", "max_tokens": 2, "user": user})
    assert status == 200
    logs = Path(ray_cluster._private.worker.global_worker.node.get_session_dir_path()) / "logs"

    def files_with(text: str) -> list:
        return [p for p in logs.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]

    deadline = time.monotonic() + 30
    while not files_with(user) and time.monotonic() < deadline:  # log files are flushed asynchronously
        time.sleep(0.5)
    assert files_with(user), "the replica's request log line was not found"
    assert not files_with(marker)

