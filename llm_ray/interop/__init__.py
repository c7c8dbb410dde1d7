"""Hugging Face interop (optional extra ``interop``: transformers, gguf, accelerate).

- ``convert(source, tokenizer=None) -> Converted``: a Hugging Face folder (Llama family, GPT-2,
  BERT) or a ``.gguf`` file rebuilt as our model (fp32), with its tokenizer files and provenance.
- ``export(bundle, out_dir, verify=True) -> summary``: a loaded decoder bundle -> a folder that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads (Llama or GPT-2 layout).

Converters only: reading and writing our model folders (``import_hf``, ``export_hf``, the
packaged models and the conversion cache) is ``llm_ray.bundle``'s, which calls these.
transformers is imported only when a conversion runs.
"""

from __future__ import annotations

from llm_ray.interop.families import InteropError
from llm_ray.interop.hf_export import export
from llm_ray.interop.hf_import import Converted, convert

__all__ = ["Converted", "InteropError", "convert", "export"]
