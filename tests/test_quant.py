"""Stored weight quantization (no Ray): the integer formats against their definitions, and a
quantized model folder that is smaller on disk and loads back as a close float model."""

from __future__ import annotations

import os

import pytest
import torch

from llm_ray.models.quant import (
    dequantize_int4_groups,
    dequantize_int8_rows,
    quantize_int4_groups,
    quantize_int8_rows,
)


def test_int8_rows_are_round_of_w_over_the_row_absmax_scale():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    w[3] = 0  # an all-zero row must not divide by zero
    q, s = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and s.shape == (6, 1)
    want = torch.round(w[0] / (w[0].abs().max() / 127))
    assert torch.equal(q[0].float(), want) and int(q.abs().max()) == 127
    assert torch.equal(q[3], torch.zeros(10, dtype=torch.int8))
    err = (dequantize_int8_rows(q, s) - w).abs()
    assert bool((err <= s / 2 + 1e-7).all())  # at most half a step per weight


def test_int4_groups_pack_two_weights_per_byte_within_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(4, 32)
    packed, s = quantize_int4_groups(w, group_size=8)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 16) and s.shape == (4, 4)
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(4, 32).float() - 8  # low nibble first
    want = torch.round(w.reshape(4, 4, 8) / (w.reshape(4, 4, 8).abs().amax(2, keepdim=True) / 7)).reshape(4, 32)
    assert torch.equal(nibbles, want) and nibbles.abs().max() == 7
    err = (dequantize_int4_groups(packed, s) - w).abs().reshape(4, 4, 8)
    assert bool((err <= s[..., None] / 2 + 1e-6).all())
    with pytest.raises(ValueError, match="groups of 7"):
        quantize_int4_groups(w, group_size=7)


@pytest.mark.parametrize("scheme,min_ratio", [("int8", 3.5), ("int4", 6.0)])
def test_a_quantized_folder_is_smaller_and_loads_as_a_close_model(tiny_model_dir, tmp_path, scheme, min_ratio):
    """Every matrix — the tied embedding included — is stored as integers: the file shrinks by
    the scheme's ratio less the scales and the float norms; the loaded model's logits stay close."""
    from llm_ray.bundle import load_bundle, save_bundle

    original = load_bundle(tiny_model_dir)
    out = save_bundle(original.model, original.cfg, original.tokenizer.to_str(), str(tmp_path / scheme),
                      quantization={"scheme": scheme, "group_size": 32})
    ratio = os.path.getsize(f"{tiny_model_dir}/model.safetensors") / os.path.getsize(f"{out}/model.safetensors")
    assert ratio >= min_ratio, ratio
    loaded = load_bundle(out)
    meta = loaded.config["quantization"]
    assert meta["scheme"] == scheme and "embedding.tok.weight" in meta["tensors"], meta
    assert meta["tied"] == {"head.proj.weight": "embedding.tok.weight"}
    ids = torch.randint(5, 200, (2, 24))
    with torch.no_grad():
        want, got = original.model(ids), loaded.model(ids)
    assert not torch.equal(want, got)  # the integers really are what was loaded
    rel = (got - want).norm() / want.norm()
    assert rel < (0.02 if scheme == "int8" else 0.2), float(rel)
    for name, p in loaded.model.named_parameters():  # norms stay exactly float
        if "norm" in name:
            assert torch.equal(p, dict(original.model.named_parameters())[name]), name
