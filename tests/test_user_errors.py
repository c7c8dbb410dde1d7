"""User errors end in one line naming the recipe key, exit status 2, before Ray starts.

The CLI runs as a subprocess (as a user runs it) under a fresh ``RAY_TMPDIR``: an empty one
afterwards shows that no Ray session was started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import CORPUS, REPO, tiny_overrides

LLM_RAY = str(Path(sys.executable).parent / "llm-ray")
RECIPE = str(REPO / "jobs" / "recipes" / "tiny-cpu.yaml")


def refused(tmp_path: Path, key: str, *overrides: str, recipe: str = RECIPE, stage: str = "pretrain") -> str:
    """Run ``llm-ray STAGE``; assert it refuses with one line about ``key``; return the line."""
    # Short, under /tmp: Ray's socket paths must stay under 108 bytes should it start after all.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    args = [LLM_RAY, stage, recipe] + [a for o in overrides for a in ("--set", o)]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        started = any(ray_tmp.iterdir())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llm-ray: invalid recipe: {key}"), proc.stderr
    assert not started, "a Ray session was started before the error"
    return lines[0]


@pytest.fixture
def base(tmp_path, tokenizer_paths) -> list[str]:
    return tiny_overrides(tmp_path / "runs", "err", tokenizer_paths["bpe"])


def test_missing_data_paths(tmp_path, base):
    line = refused(tmp_path, "data.paths", *base, f"data.paths=[{tmp_path / 'no-such-folder'}]")
    assert "no-such-folder" in line


def test_shards_without_manifest(tmp_path, base):
    (tmp_path / "empty-dataset").mkdir()
    line = refused(tmp_path, "data.shards", *base, "data.source=shards", f"data.shards={tmp_path / 'empty-dataset'}")
    assert "manifest.json" in line


def test_vocab_size_smaller_than_the_tokenizer(tmp_path, base):
    line = refused(tmp_path, "model.vocab_size", *base, "model.vocab_size=100")
    assert "512" in line


def test_recipe_that_is_not_utf8(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("model:\n  d_model: 64  # caf\u00e9\n".encode("latin-1"))
    line = refused(tmp_path, "", recipe=str(recipe))
    assert str(recipe) in line and "not UTF-8" in line


@pytest.mark.slow
def test_resume_with_another_tokenizer_is_refused(ray_cluster, tokenizer_paths, tmp_path):
    """The run's own tokenizer.json must not hide that the recipe now names another tokenizer."""
    from llm_ray.config import load_recipe
    from llm_ray.data.tokenizer import save_tokenizer, train_tokenizer
    from llm_ray.train.launcher import pretrain

    runs = tmp_path / "runs"
    first = pretrain(load_recipe(RECIPE, tiny_overrides(runs, "tok", tokenizer_paths["bpe"])
                                 + ["train.precision=fp32", "run.stop_at_step=5"]))
    assert first.summary["steps"] == 5
    other = str(tmp_path / "other-bpe.json")
    save_tokenizer(train_tokenizer([str(CORPUS)], "bpe", 300), other)
    line = refused(tmp_path, "data.tokenizer", *tiny_overrides(runs, "tok", other), "train.precision=fp32")
    assert first.run_dir in line and "run.name" in line


def test_records_that_break_the_template_or_tokenizer_are_rejects(tokenizer_paths):
    """Any exception while encoding one record makes it a reject (reason encode_error), never stops the run."""
    from tokenizers import Tokenizer

    from llm_ray.data.sft import ChatTemplate, build_examples, chat_messages, encode_chat

    tok = Tokenizer.from_file(tokenizer_paths["bpe"])
    good = {"prompt": "What is 1 plus 1?", "response": "1 plus 1 is 2."}
    surrogate = {"prompt": "a lone \ud800 surrogate", "response": "ok"}  # the tokenizer raises TypeError
    empty_user = {"prompt": "", "response": "ok"}  # this template divides by the content's length
    template = ChatTemplate("{% for m in messages %}{{ m['content'] }}{{ 100 // (m['content'] | length) }}"
                            "{% endfor %}")
    records = list(enumerate([good, surrogate, empty_user, good], start=1))
    ex = build_examples(records, "mem.jsonl", lambda r: encode_chat(chat_messages(r), template, tok, 32, 0))
    assert len(ex) == 2
    assert [(r["line"], r["reason"]) for r in ex.rejects] == [(2, "encode_error"), (3, "encode_error")]
    assert "TypeError" in ex.rejects[0]["detail"] and "ZeroDivisionError" in ex.rejects[1]["detail"]


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_preference_stages_refuse_bad_input_before_ray(tmp_path, tiny_model_dir, stage):
    recipe = str(REPO / "jobs" / "recipes" / f"{stage}-tiny.yaml")
    ok = [f"finetune.init_from={tiny_model_dir}", f"run.storage_path={tmp_path / 'runs'}"]
    refused(tmp_path, "finetune.init_from", f"finetune.init_from={tmp_path / 'nothing'}", recipe=recipe, stage=stage)
    line = refused(tmp_path, "finetune.train_path", *ok, f"finetune.train_path={tmp_path / 'none.jsonl'}",
                   recipe=recipe, stage=stage)
    assert "none.jsonl" in line
    (tmp_path / "bad.jsonl").write_text('{"prompt": "Q?", "chosen": "same", "rejected": "same"}\n{not json\n')
    line = refused(tmp_path, "finetune.train_path", *ok, f"finetune.train_path={tmp_path / 'bad.jsonl'}",
                   recipe=recipe, stage=stage)
    assert "identical_responses" in line and "invalid_json" in line  # why nothing was usable
    key = {"reward": "align.reward.center_coef", "dpo": "align.dpo.beta"}[stage]
    refused(tmp_path, key, *ok, f"{key}=-1", recipe=recipe, stage=stage)
    if stage == "dpo":
        refused(tmp_path, "align.dpo.reference", *ok, "align.dpo.reference=adapters_off", recipe=recipe, stage=stage)
        refused(tmp_path, "align.dpo.label_smoothing", *ok, "align.dpo.loss=ipo", "align.dpo.label_smoothing=0.1",
                recipe=recipe, stage=stage)


def test_encrypted_checkpoints_without_a_key(tmp_path, base, monkeypatch):
    monkeypatch.delenv("LLM_RAY_ENCRYPTION_KEY", raising=False)
    monkeypatch.delenv("LLM_RAY_ENCRYPTION_KEY_FILE", raising=False)
    line = refused(tmp_path, "checkpoint.encrypt", *base, "checkpoint.encrypt=true")
    assert "LLM_RAY_ENCRYPTION_KEY" in line


def test_dp_sgd_with_zero3(tmp_path, base):
    refused(tmp_path, "parallel.zero_stage", *base, "privacy.dp.enabled=true", "privacy.dp.noise_multiplier=1.0",
            "optim.grad_clip=0", "parallel.zero_stage=3")
