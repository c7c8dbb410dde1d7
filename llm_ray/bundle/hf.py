"""Hugging Face checkpoints in and out of model folders (the ``llm-ray import`` / ``export-hf`` commands).

- ``import_hf(source, out_dir=None)``: a Hugging Face folder (Llama family, GPT-2, BERT), a
  ``.gguf`` file or a packaged name (``smollm2``, ``minilm``) -> an llm_ray model folder.
- ``export_hf(model_dir, out_dir)``: an llm_ray decoder folder -> a folder that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads (Llama or GPT-2 layout).

``llm_ray.interop`` converts (``convert``, ``export``); this module reads and writes the folders.
Both need the ``interop`` extra; transformers is imported only when a conversion runs.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional


def import_hf(source: str, out_dir: Optional[str] = None, tokenizer: Optional[str] = None) -> str:
    """Import ``source`` and return the model folder.

    Without ``out_dir`` the folder lives in the conversion cache (converted once per source
    content); with it, the model folder and ``summary.json`` are written there.
    """
    from llm_ray.bundle.packaged import PACKAGES, import_cached, packaged_model, write_converted
    from llm_ray.interop import convert

    if source in PACKAGES and not os.path.exists(source):
        folder = packaged_model(source)
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
    """Export a decoder model folder (or packaged name) to Hugging Face format; returns the
    summary. A quantized folder exports its dequantized float weights."""
    from llm_ray.bundle.folder import load_bundle
    from llm_ray.interop import export

    return export(load_bundle(model_dir, float_weights=True), out_dir, verify=verify)
