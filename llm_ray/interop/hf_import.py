"""Convert a Hugging Face checkpoint (folder or GGUF file) into our model: ``convert() -> Converted``.

``transformers`` reads the checkpoint (safetensors/bin, sharded or not, and GGUF, which it
dequantizes to fp32 and un-permutes); we only rename and reshape tensors (``families.py``).
Every import runs both models on one sample and records the largest difference, so a folder
carries its own parity figure (``config.json`` -> ``parity_max_abs_diff``). Writing the model
folder is ``llm_ray.bundle``'s (``import_hf``, ``bundle.packaged.write_converted``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from llm_ray.config import ModelConfig
from llm_ray.interop.families import InteropError, family_for, rules_for, to_ours

SAMPLE_TEXT = "The capital of France is Paris. The quick brown fox jumps over the lazy dog."
SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


@dataclass
class HFSource:
    """Where transformers finds a checkpoint: a folder, plus ``gguf_file`` for a GGUF file."""

    folder: str
    kwargs: dict = field(default_factory=dict)
    path: str = ""  # the file or folder the user named

    @property
    def format(self) -> str:
        return "gguf" if "gguf_file" in self.kwargs else "hf"

    def files(self) -> list[str]:
        """The files whose content identifies the checkpoint (for the cache key)."""
        if self.format == "gguf":
            return [self.path]
        names = sorted(os.listdir(self.folder))
        keep = [n for n in names if n.endswith((".safetensors", ".bin")) or n in ("config.json", "tokenizer.json")]
        return [os.path.join(self.folder, n) for n in keep]


def locate(source: str) -> HFSource:
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"source {source!r}: no such GGUF file")
        path = os.path.abspath(source)
        return HFSource(os.path.dirname(path), {"gguf_file": os.path.basename(path)}, path)
    if os.path.isdir(source):
        if not os.path.exists(os.path.join(source, "config.json")):
            raise InteropError(f"source: {source} has no config.json (expected a Hugging Face model folder)")
        return HFSource(os.path.abspath(source), {}, os.path.abspath(source))
    raise FileNotFoundError(f"source {source!r}: not a Hugging Face model folder, a .gguf file or a packaged model name")


def _load_hf_model(src: HFSource, hf_config, model_type: str):
    import transformers

    if model_type == "bert":
        # BertForMaskedLM keeps the MLM head; plain BertModel checkpoints (MiniLM) have none.
        archs = hf_config.architectures or []
        cls = transformers.BertForMaskedLM if "BertForMaskedLM" in archs else transformers.BertModel
    else:
        cls = transformers.AutoModelForCausalLM
    return cls.from_pretrained(src.folder, config=hf_config, dtype=torch.float32, **src.kwargs).eval()


def _load_tokenizer(src: HFSource, tokenizer: Optional[str]):
    from transformers import AutoTokenizer

    where, kwargs = (tokenizer, {}) if tokenizer else (src.folder, src.kwargs)
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise InteropError(f"tokenizer: cannot load a tokenizer from {where} ({e}); pass tokenizer=<folder>") from e
    if getattr(tok, "backend_tokenizer", None) is None:
        raise InteropError(f"tokenizer: {where} has no fast tokenizer (tokenizer.json); our models need one")
    if tok.backend_tokenizer.get_vocab_size() == 0 or not tok(SAMPLE_TEXT)["input_ids"]:
        # transformers builds an empty tokenizer from config.json alone rather than failing
        raise InteropError(f"tokenizer: {where} has no tokenizer files (empty vocabulary); pass tokenizer=<folder>")
    return tok


def tokenizer_files(tok) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json dict) from a transformers fast tokenizer."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    # Padding/truncation are call-time choices in transformers; baked into the file they would
    # silently cut every text our stages encode.
    backend.no_padding()
    backend.no_truncation()
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for role in SPECIAL_ROLES:
        value = getattr(tok, role, None)
        if value:
            config[role] = str(value)
    if getattr(tok, "chat_template", None):
        config["chat_template"] = tok.chat_template
    return backend.to_str(), config


@torch.no_grad()
def parity_diff(hf_model, model, cfg: ModelConfig, input_ids: torch.Tensor) -> float:
    """Largest |difference| of logits (decoder) or final hidden states (encoder) on one input."""
    if cfg.arch == "decoder":
        ref, ours = hf_model(input_ids=input_ids).logits, model(input_ids)
    else:
        ref = hf_model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
        ours = model.encode(input_ids)
    return float((ref.float() - ours.float()).abs().max())


@dataclass
class Converted:
    model: torch.nn.Module
    cfg: ModelConfig
    tokenizer_json: str
    tokenizer_config: dict
    provenance: dict


def convert(source: str, tokenizer: Optional[str] = None) -> Converted:
    """Load a Hugging Face checkpoint with transformers and rebuild it as our model (fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_ray.models import build_model

    src = locate(source)
    if src.format == "gguf":
        # Reading a GGUF's metadata is most of its load time: take the config from the model
        # load instead of parsing the file once more (transformers refuses unknown GGUF archs).
        hf_model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=torch.float32, **src.kwargs).eval()
        family = family_for(hf_model.config)
        cfg = family.to_config(hf_model.config)
        tok = _load_tokenizer(src, tokenizer)
    else:
        hf_config = AutoConfig.from_pretrained(src.folder)
        family = family_for(hf_config)
        cfg = family.to_config(hf_config)  # refuses unsupported fields before any weight is read
        tok = _load_tokenizer(src, tokenizer)
        hf_model = _load_hf_model(src, hf_config, family.model_type)

    hf_state = {k.removeprefix("bert."): v for k, v in hf_model.state_dict().items()}
    state = to_ours(rules_for(family.model_type, cfg, set(hf_state)), hf_state)
    model = build_model(cfg)
    if cfg.tie_embeddings:
        state["head.proj.weight"] = state["embedding.tok.weight"]
    elif cfg.arch == "decoder" and "head.proj.weight" not in state:
        raise InteropError("weights: tie_word_embeddings is false but the checkpoint has no lm_head.weight")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    mlm_head = "from checkpoint"
    if cfg.arch == "encoder" and missing and all(k.startswith("head.") for k in missing):
        # A BertModel checkpoint has no MLM head: keep ours freshly initialised (hidden states
        # are exact; MLM logits need fine-tuning). Its projection is tied to the embedding.
        mlm_head = "initialised (checkpoint has none)"
        state.update({k: expected[k] for k in missing})
    model.load_state_dict(state, strict=True)
    model.eval()

    n_tokens = tok.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    if n_tokens > cfg.vocab_size:  # a larger embedding table (padded vocab) is fine, a smaller is not
        raise InteropError(f"tokenizer: {n_tokens} tokens but the model's vocab_size is {cfg.vocab_size}")
    tokenizer_json, tokenizer_config = tokenizer_files(tok)
    input_ids = torch.tensor([tok(SAMPLE_TEXT)["input_ids"][: cfg.max_seq_len]])  # (1, T)
    provenance = {
        "source": src.path,
        "source_format": src.format,
        "hf_model_type": family.model_type,
        "hf_architecture": type(hf_model).__name__,
        "parity_max_abs_diff": parity_diff(hf_model, model, cfg, input_ids),
    }
    if cfg.arch == "encoder":
        provenance["mlm_head"] = mlm_head
    return Converted(model, cfg, tokenizer_json, tokenizer_config, provenance)
