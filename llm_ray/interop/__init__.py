"""Hugging Face interop (optional extra ``interop``: transformers, gguf, accelerate).

- ``import_hf(source, out_dir=None)``: a Hugging Face folder (Llama family, GPT-2, BERT), a
  ``.gguf`` file or a packaged name (``smollm2``, ``minilm``) -> an llm_ray model folder.
- ``export_hf(model_dir, out_dir)``: an llm_ray decoder folder -> a folder that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads (Llama or GPT-2 layout).

Importing this package registers the packaged models with ``llm_ray.models.bundle.PACKAGED``
so ``load_bundle("smollm2")`` works; transformers is imported only when a conversion runs.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Optional

from llm_ray.interop.families import InteropError
from llm_ray.interop.packaged import PACKAGES, cache_root, import_cached, packaged_model
from llm_ray.models.bundle import PACKAGED

for _name in PACKAGES:
    PACKAGED[_name] = functools.partial(packaged_model, _name)


def import_hf(source: str, out_dir: Optional[str] = None, tokenizer: Optional[str] = None) -> str:
    """Import ``source`` and return the model folder.

    Without ``out_dir`` the folder lives in the conversion cache (converted once per source
    content); with it, the model folder and ``summary.json`` are written there.
    """
    from llm_ray.interop.hf_import import convert, write_converted

    if source in PACKAGED and not os.path.exists(source):
        folder = PACKAGED[source]()
        if out_dir is None:
            return folder
        shutil.copytree(folder, out_dir, dirs_exist_ok=True)
        with open(os.path.join(folder, "summary.json")) as f:
            summary = {**json.load(f), "out_dir": os.path.abspath(out_dir)}
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        return os.path.abspath(out_dir)
    if out_dir is None:
        name = os.path.basename(os.path.normpath(source)).removesuffix(".gguf")
        return import_cached(source, name, tokenizer)
    write_converted(convert(source, tokenizer), out_dir)
    return os.path.abspath(out_dir)


def export_hf(model_dir: str, out_dir: str, verify: bool = True) -> dict:
    """Export a decoder model folder to Hugging Face format; returns the summary."""
    from llm_ray.interop.hf_export import export_hf as _export

    return _export(model_dir, out_dir, verify=verify)


__all__ = ["InteropError", "cache_root", "export_hf", "import_hf"]
