"""Encryption at rest for prepared data: ``prepare.encrypt`` seals every shard (and rejects/)
client-side with AES-256-GCM, every shard reader decrypts in memory and refuses a tampered or
swapped shard by name; and ``run.s3_sse`` asks S3 for server-side encryption on every object
written (PUT, multipart, copy, move, directory markers), checked with boto3 on a moto server.

One prepare run each way shares the module: the same corpus prepared plaintext to a local folder
and sealed to S3 with SSE-KMS, so that the batches of the two can be compared.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from llm_ray.encryption import KEY_ENV, KEY_FILE_ENV, MAGIC, EncryptionError, key_fingerprint
from tests.conftest import REPO, tiny_overrides

KEY = bytes(range(100, 132))
KMS_KEY_ID = "arn:aws:kms:us-east-1:123456789012:key/test-key"
REJECT_SNIPPET = "not json but secret-ish raw input"


def _corpus(folder) -> None:
    rng = random.Random(3)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "pa", "do", "fe"]
    docs = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(150))
            for _ in range(40)]
    lines = [json.dumps({"text": d}) for d in docs] + [f"{{'text': {REJECT_SNIPPET}"]  # one malformed line
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")


def _recipe(tmp, tokenizer, inputs, output, *extra):
    from llm_ray.config import load_recipe

    return load_recipe(str(REPO / "jobs/recipes/tiny-cpu.yaml"), tiny_overrides(tmp, "unused", tokenizer) + [
        f"prepare.inputs=[{inputs}]", f"prepare.output={output}", "prepare.sequences_per_shard=64",
        "prepare.clean.min_chars=100", *extra])


def _use_key(mp: pytest.MonkeyPatch, key_file) -> None:
    """The key by file, as in production: Ray workers get the file's path, never the key."""
    mp.delenv(KEY_ENV, raising=False)
    mp.setenv(KEY_FILE_ENV, str(key_file))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret") / "key"
    path.write_text(base64.b64encode(KEY).decode())
    return path


@pytest.fixture
def keyed(monkeypatch, key_file):
    _use_key(monkeypatch, key_file)


@pytest.fixture(scope="module")
def prepared(ray_cluster, s3_endpoint, tokenizer_paths, key_file, tmp_path_factory):
    """(plain local folder, sealed s3:// uri, bucket): one corpus prepared both ways."""
    import uuid

    import boto3

    from llm_ray.data.pipeline import prepare

    root = tmp_path_factory.mktemp("encdata")
    _corpus(root / "raw")
    bucket = f"sealed-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    plain = prepare(_recipe(root, tokenizer_paths["bpe"], root / "raw", root / "plain")).summary
    with pytest.MonkeyPatch.context() as mp:
        _use_key(mp, key_file)
        sealed = prepare(_recipe(root, tokenizer_paths["bpe"], root / "raw", f"s3://{bucket}/prepared",
                                 "prepare.encrypt=true", f"run.s3_endpoint={s3_endpoint}", "run.s3_sse=aws:kms",
                                 f"run.s3_sse_kms_key_id={KMS_KEY_ID}")).summary
    assert plain["sequences"] == sealed["sequences"] > 0 and plain["shards"] == sealed["shards"] >= 2
    return plain["output"], sealed["output"], bucket


def _objects(endpoint, bucket, prefix="") -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _sse(endpoint, bucket, key) -> tuple:
    import boto3

    head = boto3.client("s3", endpoint_url=endpoint).head_object(Bucket=bucket, Key=key)
    return head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")


def test_sealed_shards_hold_no_plaintext_and_read_as_the_same_batches(prepared, s3_endpoint, keyed, tokenizer_paths):
    from pathlib import Path

    from tokenizers import Tokenizer

    from llm_ray.compress.prune import shard_calibration_ids
    from llm_ray.data.streaming import ShardSource
    from llm_ray.storage import resolve_storage

    plain_dir, sealed_uri, bucket = prepared
    objects = _objects(s3_endpoint, bucket, "prepared/")
    manifest = json.loads(objects["prepared/manifest.json"])
    assert manifest["encrypted"] and manifest["key_fingerprint"] == key_fingerprint(KEY)
    assert "encrypted" not in json.loads((Path(plain_dir) / "manifest.json").read_text())

    # At rest: the plaintext shard shows Parquet's magic and its column names; the sealed one neither.
    plain_shard = next((Path(plain_dir) / "shards").iterdir()).read_bytes()
    assert plain_shard.startswith(b"PAR1") and b"input_ids" in plain_shard
    shards = {k: v for k, v in objects.items() if k.startswith("prepared/shards/")}
    assert len(shards) == len(manifest["shards"])
    for data in shards.values():
        assert data.startswith(MAGIC) and b"PAR1" not in data and b"input_ids" not in data
    assert REJECT_SNIPPET in (Path(plain_dir) / "rejects/malformed_json.jsonl").read_text()
    sealed_rejects = objects["prepared/rejects/malformed_json.jsonl"]
    assert sealed_rejects.startswith(MAGIC) and REJECT_SNIPPET.encode() not in sealed_rejects
    forms = (KEY, KEY.hex().encode(), base64.b64encode(KEY))
    written = list(objects.values()) + [p.read_bytes() for p in Path(plain_dir).rglob("*") if p.is_file()]
    assert not any(f in data for data in written for f in forms)
    # run.s3_sse: every object the pipeline wrote asked for SSE-KMS under the recipe's key id
    assert all(_sse(s3_endpoint, bucket, k) == ("aws:kms", KMS_KEY_ID) for k in objects)

    # Decrypted in memory, the sealed dataset streams exactly the plaintext one's batches.
    plain = ShardSource(plain_dir, "causal_lm", 7)
    sealed = ShardSource(sealed_uri, "causal_lm", 7, s3_endpoint=s3_endpoint)
    for step in range(3):
        for rank in range(2):
            a, b = (s.micro_batch(0, step, rank, 2, 4) for s in (plain, sealed))
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # ... and through Ray Data, in a reader actor that has only the key file's path
    streamed = list(sealed.iterate(5, 0, 1, 4, 1, 3))
    assert all(np.array_equal(s["input_ids"], plain.micro_batch(5, k, 0, 1, 4)["input_ids"]) for k, s in enumerate(streamed))

    tok = Tokenizer.from_file(tokenizer_paths["bpe"])
    calib = [shard_calibration_ids(resolve_storage(u, s3_endpoint), tok, 300, 16) for u in (plain_dir, sealed_uri)]
    assert calib[0].shape == (18, 16) and np.array_equal(calib[0].numpy(), calib[1].numpy())


def test_a_flipped_byte_or_a_plaintext_shard_is_refused_naming_the_shard(prepared, s3_endpoint, keyed):
    from pathlib import Path

    import boto3

    from llm_ray.data.streaming import ShardSource

    plain_dir, sealed_uri, bucket = prepared
    sealed = ShardSource(sealed_uri, "causal_lm", 7, s3_endpoint=s3_endpoint)
    name = sealed.shard_names[1]
    shards, _ = sealed.order.locate(np.arange(sealed.num_samples))
    first = int(np.flatnonzero(shards == 1)[0])  # the first position that reads this shard
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    key = f"prepared/shards/{name}"
    original = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 1
    plaintext = next((Path(plain_dir) / "shards").iterdir()).read_bytes()
    try:
        for body, why in ((bytes(flipped), "refused, it fails authentication"), (plaintext, "not an encrypted file")):
            s3.put_object(Bucket=bucket, Key=key, Body=body)
            with pytest.raises(EncryptionError) as e:
                sealed.micro_batch(first, 0, 0, 1, 1)
            assert str(e.value) == f"{sealed_uri}/shards/{name}: {why}" + (
                " (modified, truncated, moved, or another key)" if "authentication" in why else "")
    finally:
        s3.put_object(Bucket=bucket, Key=key, Body=original)
    assert sealed.micro_batch(first, 0, 0, 1, 1)["input_ids"].shape == (1, 32)


def test_sealed_shards_without_the_key_or_with_another_are_one_line_errors(prepared, s3_endpoint, tokenizer_paths,
                                                                          monkeypatch, tmp_path):
    from tokenizers import Tokenizer

    from llm_ray.compress.prune import check_calibration_shards
    from llm_ray.storage import resolve_storage
    from llm_ray.train.launcher import prepare_source

    _, sealed_uri, _ = prepared
    recipe = _recipe(tmp_path, tokenizer_paths["bpe"], "unused", "unused", "data.source=shards",
                     f"data.shards={sealed_uri}", f"run.s3_endpoint={s3_endpoint}")
    run = resolve_storage(str(tmp_path / "runs")).child("r")
    tok = Tokenizer.from_file(tokenizer_paths["bpe"])
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    for env, expect in ((None, f"{sealed_uri} holds encrypted shards: encryption needs a key: set {KEY_ENV}"),
                        (bytes(32).hex(), f"{sealed_uri} is encrypted with another key (fingerprint {key_fingerprint(KEY)}")):
        if env:
            monkeypatch.setenv(KEY_ENV, env)
        for read in (lambda: prepare_source(recipe, run), lambda: check_calibration_shards(resolve_storage(sealed_uri, s3_endpoint), tok)):
            with pytest.raises(EncryptionError) as e:  # the training source (before Ray) and compress calibration
                read()
            assert str(e.value).startswith(expect) and "\n" not in str(e.value)


def test_prepare_encrypt_without_a_key_is_a_recipe_error_before_ray_starts(tokenizer_paths, tmp_path):
    import os

    _corpus(tmp_path / "raw")
    code = ("import sys, ray\nfrom llm_ray.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as e:\n    print('exit', e.code, 'ray started:', ray.is_initialized())\n")
    sets = [f"prepare.inputs=[{tmp_path / 'raw'}]", f"prepare.output={tmp_path / 'out'}", "prepare.encrypt=true",
            f"data.tokenizer.path={tokenizer_paths['bpe']}"]
    env = {k: v for k, v in os.environ.items() if k not in (KEY_ENV, KEY_FILE_ENV)}
    proc = subprocess.run([sys.executable, "-c", code, "data", "prepare", "jobs/recipes/tiny-cpu.yaml",
                           *[a for s in sets for a in ("--set", s)]], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "exit 2 ray started: False", proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"llm-ray: invalid recipe: prepare.encrypt: encryption needs a key: set {KEY_ENV} "
        f"(64 hex digits or base64 of 32 bytes) or {KEY_FILE_ENV}"]
    assert not (tmp_path / "out").exists()


def test_s3_sse_rides_on_every_kind_of_write_and_only_when_asked(s3_endpoint, s3_bucket, tmp_path):
    import pickle

    from llm_ray.config import RecipeError, load_recipe
    from llm_ray.storage import ServerSideEncryption, resolve_storage

    (tmp_path / "ckpt/sub").mkdir(parents=True)
    (tmp_path / "ckpt/model.pt").write_bytes(b"w" * 1000)
    (tmp_path / "ckpt/sub/rank_0.pt").write_bytes(b"r")
    big = np.random.default_rng(0).bytes(9 << 20)  # past one 8 MiB part: a multipart upload
    for prefix, sse, want in (("sse", ServerSideEncryption("AES256"), ("AES256", None)), ("plain", None, (None, None))):
        store = pickle.loads(pickle.dumps(resolve_storage(f"s3://{s3_bucket}/{prefix}", s3_endpoint, sse)))  # as Ray ships it
        store.write_text("summary.json", "{}")
        store.write_bytes("big.bin", big)
        store.upload_dir(str(tmp_path / "ckpt"), "checkpoint_1")  # pyarrow.fs.copy_files: what Ray Train uploads with
        store.fs.copy_file(f"{store.root}/summary.json", f"{store.root}/copy.json")
        store.fs.move(f"{store.root}/copy.json", f"{store.root}/moved.json")
        keys = sorted(k[len(prefix) + 1:] for k in _objects(s3_endpoint, s3_bucket, prefix + "/"))
        # folder markers ("x/") differ: pyarrow's own writes leave more of them than ours
        assert [k for k in keys if k and not k.endswith("/")] == ["big.bin", "checkpoint_1/model.pt", "checkpoint_1/sub/rank_0.pt",
                                                            "moved.json", "summary.json"]
        assert all(_sse(s3_endpoint, s3_bucket, f"{prefix}/{k}") == want for k in keys), prefix  # markers too
        assert store.read_text("moved.json") == "{}" and store.fs.open_input_file(f"{store.root}/big.bin").read() == big
        store.fs.delete_dir(f"{store.root}/checkpoint_1")  # Ray Train pruning old checkpoints
        assert store.listdir() == ["big.bin", "moved.json", "summary.json"]

    for sets, key in ((["run.s3_sse=DES"], "run.s3_sse"), (["run.s3_sse=AES256", "run.s3_sse_kms_key_id=k"], "run.s3_sse_kms_key_id")):
        with pytest.raises(RecipeError) as e:
            load_recipe(str(REPO / "jobs/recipes/tiny-cpu.yaml"), sets)
        assert e.value.key == key

