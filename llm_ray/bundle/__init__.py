"""The model folder: the one on-disk form every later stage reads (generate, eval, sft, reward, dpo, serve).

    folder.py    ModelBundle, load_bundle / save_bundle, resolve_model_path, the file names
    heads.py     save_classifier / load_classifier (a model folder plus a classifier or reward head)
    packaged.py  the packaged models (``smollm2``, ``minilm``) and the converted-model cache
    hf.py        import_hf / export_hf: Hugging Face checkpoints in and out of model folders

Layering: this package sits above ``llm_ray.models``, ``llm_ray.interop`` and the tokenizer
(``llm_ray.data.tokenizer``) and composes them; none of those imports it. transformers is
imported only when a conversion runs.
"""

from llm_ray.bundle.folder import (
    CONFIG,
    TOKENIZER,
    TOKENIZER_CONFIG,
    WEIGHTS,
    ModelBundle,
    load_bundle,
    resolve_model_path,
    save_bundle,
)
from llm_ray.bundle.heads import load_classifier, save_classifier
from llm_ray.bundle.hf import export_hf, import_hf

__all__ = [
    "CONFIG",
    "TOKENIZER",
    "TOKENIZER_CONFIG",
    "WEIGHTS",
    "ModelBundle",
    "export_hf",
    "import_hf",
    "load_bundle",
    "load_classifier",
    "resolve_model_path",
    "save_bundle",
    "save_classifier",
]
