"""Save and restore training state through Ray Train checkpoints backed by DeepSpeed files.

Pattern from the guide: every rank ``engine.save_checkpoint(tmp)``, barrier, every rank
``ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))``. Ray registers the
checkpoint only once every rank has uploaded, so a crash mid-upload leaves nothing that a resume
would pick up; rank 0 then writes ``COMPLETE`` into it so that tools reading storage directly
(``llm-ray export``) can tell whole checkpoints from partial ones.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from llm_ray.storage import Storage

MANIFEST = "llm_ray_checkpoint.json"
COMPLETE = "COMPLETE"


def normalized_model(model: dict) -> dict:
    """A manifest's model dict with today's defaults filled in: a field added to ModelConfig
    after a checkpoint was written must not make that checkpoint look like another model."""
    from llm_ray.config import ModelConfig, from_dict

    return asdict(from_dict(ModelConfig, model))


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples: int = 0  # global samples consumed: the data position (see data/sampler.py)
    initial_loss: Optional[float] = None  # loss of step 1, carried across resumes


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, state: TrainState, manifest: dict, metrics: dict, rank: int, run: Storage,
                    encrypt: bool = False) -> str:
    """Save on every rank and report to Ray Train; returns the checkpoint's storage URI.
    ``encrypt``: every rank encrypts its files before they leave it (``llm_ray.encryption``);
    the manifest stays readable (shapes and hashes, no weights) and says so."""
    import ray.train

    from llm_ray.encryption import encrypt_tree, key_fingerprint, load_key

    name = checkpoint_dir_name(state.step)
    with tempfile.TemporaryDirectory(prefix="llm-ray-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=name, client_state={"train_state": asdict(state)})
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
        key = load_key() if encrypt else None
        if key is not None:
            encrypt_tree(tmp, key)
        if rank == 0:
            sealed = {"encrypted": True, "key_fingerprint": key_fingerprint(key)} if key is not None else {}
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump({**manifest, "tag": name, "train_state": asdict(state), **sealed}, f, indent=2)
        dist.barrier()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    dist.barrier()  # every rank's files are uploaded once all have returned from report
    if rank == 0:
        run.child(name).write_text(COMPLETE, json.dumps({"step": state.step}))
    return run.child(name).uri


def restore_checkpoint(engine, checkpoint, rank: int, expect: dict) -> TrainState:
    """Load model, optimizer, scheduler, data position and this rank's RNG state (an encrypted
    checkpoint is decrypted into a private temporary folder first, every file authenticated)."""
    with checkpoint.as_directory() as stored, tempfile.TemporaryDirectory(prefix="llm-ray-restore-") as plain:
        with open(os.path.join(stored, MANIFEST)) as f:
            manifest = json.load(f)
        d = decrypted_checkpoint(stored, manifest, plain)
        for key, want in expect.items():
            have = manifest.get(key)
            if key == "model" and have is not None:
                have, want = normalized_model(have), normalized_model(want)
            if have != want:
                raise RuntimeError(
                    f"checkpoint {checkpoint.path} was written with a different {key} "
                    f"({have!r} != {want!r}); use a new run.name or set checkpoint.resume=false"
                )
        load_path, client_state = engine.load_checkpoint(d, tag=manifest["tag"])
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {manifest['tag']} in {checkpoint.path}")
        rng_file = os.path.join(d, "rng", f"rank_{rank:05d}.pt")
        if os.path.exists(rng_file):  # absent when the world size changed: RNG then starts anew
            _set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainState(**client_state["train_state"])


def decrypted_checkpoint(folder: str, manifest: dict, scratch: str) -> str:
    """``folder`` itself, or for an encrypted checkpoint its decrypted copy under ``scratch``;
    EncryptionError naming the file that fails authentication, or the key that does not match."""
    if not manifest.get("encrypted"):
        return folder
    from llm_ray.encryption import check_fingerprint, decrypted_copy, load_key

    decrypted_copy(folder, scratch, check_fingerprint(load_key(), manifest.get("key_fingerprint"), folder))
    return scratch


def latest_complete_checkpoint(run: Storage) -> Optional[Storage]:
    """Newest ``checkpoint_*`` folder of a run that has its COMPLETE marker."""
    for name in reversed(run.listdir()):
        if name.startswith("checkpoint_") and run.child(name).exists(COMPLETE):
            return run.child(name)
    return None
