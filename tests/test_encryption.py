"""Encryption at rest (``llm_ray/encryption.py``): AES-256-GCM files refused by name when
modified, moved or read with another key; and an encrypted training run on Ray Train +
DeepSpeed that resumes and exports, whose files hold no key material, and whose tampered
checkpoint is refused in one line."""

from __future__ import annotations

import base64
import json
import os

import pytest

from llm_ray.encryption import EncryptionError, decrypt_bytes, encrypt_bytes, load_key
from tests.conftest import REPO

KEY = bytes(range(32))


def test_files_round_trip_and_any_change_is_refused_by_name(monkeypatch, tmp_path):
    blob = encrypt_bytes(b"weights" * 100, "model.safetensors", KEY)
    assert b"weights" not in blob and decrypt_bytes(blob, "model.safetensors", KEY) == b"weights" * 100
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    for data, name, key in ((bytes(flipped), "model.safetensors", KEY), (blob[:-1], "model.safetensors", KEY),
                            (blob, "other.safetensors", KEY), (blob, "model.safetensors", bytes(32))):
        with pytest.raises(EncryptionError, match=f"{name}: refused"):
            decrypt_bytes(data, name, key)

    monkeypatch.delenv("LLM_RAY_ENCRYPTION_KEY", raising=False)
    monkeypatch.delenv("LLM_RAY_ENCRYPTION_KEY_FILE", raising=False)
    with pytest.raises(EncryptionError, match="LLM_RAY_ENCRYPTION_KEY"):
        load_key()
    monkeypatch.setenv("LLM_RAY_ENCRYPTION_KEY", KEY.hex())
    assert load_key() == KEY
    monkeypatch.setenv("LLM_RAY_ENCRYPTION_KEY", base64.b64encode(KEY).decode())
    assert load_key() == KEY
    monkeypatch.setenv("LLM_RAY_ENCRYPTION_KEY", "too short")
    with pytest.raises(EncryptionError, match="not a 32-byte key") as e:
        load_key()
    assert "too short" not in str(e.value)  # a bad key is not echoed either
    monkeypatch.delenv("LLM_RAY_ENCRYPTION_KEY")
    (tmp_path / "key").write_text(KEY.hex() + "\n")
    monkeypatch.setenv("LLM_RAY_ENCRYPTION_KEY_FILE", str(tmp_path / "key"))
    assert load_key() == KEY


def test_an_encrypted_run_resumes_exports_leaks_no_key_and_refuses_a_flipped_byte(ray_cluster, tokenizer_paths, tmp_path, monkeypatch):
    from llm_ray.config import load_recipe
    from llm_ray.bundle import load_bundle
    from llm_ray.encryption import MAGIC
    from llm_ray.train.export import export_model
    from llm_ray.train.launcher import pretrain
    from llm_ray.train.metrics import read_metrics
    from llm_ray.storage import resolve_storage
    from tests.conftest import tiny_overrides

    key_file = tmp_path / "secret" / "key"
    key_file.parent.mkdir()
    key_file.write_text(base64.b64encode(KEY).decode())
    monkeypatch.delenv("LLM_RAY_ENCRYPTION_KEY", raising=False)
    monkeypatch.setenv("LLM_RAY_ENCRYPTION_KEY_FILE", str(key_file))  # the workers get the path, not the key
    runs = tmp_path / "runs"
    base = tiny_overrides(runs, "sealed", tokenizer_paths["bpe"]) + ["checkpoint.encrypt=true", "checkpoint.every_steps=2",
                                                                      "train.max_steps=4", "run.max_failures=0"]
    pretrain(load_recipe(str(REPO / "jobs/recipes/tiny-cpu.yaml"), base + ["run.stop_at_step=2"]))
    result = pretrain(load_recipe(str(REPO / "jobs/recipes/tiny-cpu.yaml"), base))  # resumes from step 2
    run = runs / "sealed"
    assert result.summary["steps"] == 4 and sorted(read_metrics(resolve_storage(str(runs)).child("sealed"))) == [1, 2, 3, 4]

    ckpt = sorted(p for p in run.iterdir() if p.name.startswith("checkpoint_0"))[-1]
    manifest = json.loads((ckpt / "llm_ray_checkpoint.json").read_text())
    assert manifest["encrypted"] and manifest["train_state"]["step"] == 4
    sealed = [p for p in ckpt.rglob("*") if p.is_file() and p.name not in ("llm_ray_checkpoint.json", "COMPLETE")]
    assert sealed and all(p.read_bytes().startswith(MAGIC) for p in sealed)  # DeepSpeed's files and the RNG states
    forms = (KEY, KEY.hex().encode(), base64.b64encode(KEY))
    for p in run.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert not any(f in data for f in forms), p  # summary, recipe, metrics, TensorBoard, checkpoints

    folder = export_model(str(run), str(tmp_path / "model"), encrypt=True).summary["out_dir"]
    assert load_bundle(folder).cfg.n_layers == 2 and (tmp_path / "model" / "model.safetensors").read_bytes().startswith(MAGIC)

    victim = max(sealed, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(EncryptionError) as e:
        pretrain(load_recipe(str(REPO / "jobs/recipes/tiny-cpu.yaml"), [*base, "train.max_steps=6"]))
    assert victim.name in str(e.value) and "fails authentication" in str(e.value)
    assert os.environ["LLM_RAY_ENCRYPTION_KEY_FILE"] == str(key_file)


def test_an_encrypted_model_folder_loads_with_the_key_only_and_refuses_a_flipped_byte(tiny_model_dir, tmp_path, monkeypatch):
    """``save_bundle(encrypt=True)``: weights and tokenizer sealed, config.json readable (no
    key); ``load_bundle`` (eval, generate, serve) gives the same logits with the key, refuses
    without it, and names the file whose byte was flipped; int8 folders too."""
    import torch

    from llm_ray.bundle import load_bundle, save_bundle
    from llm_ray.encryption import MAGIC
    from llm_ray.models.converters import LoadWeights

    monkeypatch.setenv("LLM_RAY_ENCRYPTION_KEY", KEY.hex())
    b = load_bundle(tiny_model_dir)
    ids = torch.randint(5, 200, (2, 10))
    for quantization in (None, {"scheme": "int8"}):
        out = save_bundle(b.model, b.cfg, b.tokenizer.to_str(), str(tmp_path / str(bool(quantization))), quantization=quantization,
                          encrypt=True)
        for name in ("model.safetensors", "tokenizer.json"):
            assert (tmp_path / str(bool(quantization)) / name).read_bytes().startswith(MAGIC)
        config = (tmp_path / str(bool(quantization)) / "config.json").read_text()
        assert '"encryption"' in config and KEY.hex() not in config
        sealed = load_bundle(out)
        with torch.no_grad():
            want = (load_bundle(save_bundle(b.model, b.cfg, b.tokenizer.to_str(), str(tmp_path / "plain"), quantization=quantization))
                    .model(ids))
            assert torch.equal(sealed.model(ids), want)
        assert sealed.tokenizer.to_str() == b.tokenizer.to_str()
    fresh = load_bundle(tiny_model_dir).model
    LoadWeights(str(tmp_path / "False" / "model.safetensors")).convert(fresh)  # a training init from the sealed folder
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), b.model.parameters()))

    monkeypatch.delenv("LLM_RAY_ENCRYPTION_KEY")
    with pytest.raises(EncryptionError, match="needs a key"):
        load_bundle(str(tmp_path / "False"))
    monkeypatch.setenv("LLM_RAY_ENCRYPTION_KEY", KEY.hex())
    weights = tmp_path / "False" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(EncryptionError, match="model.safetensors: refused"):
        load_bundle(str(tmp_path / "False"))
