"""Stored weight quantization (no Ray): the integer formats against their definitions, and a
quantized model folder that is smaller on disk and loads back as a close float model."""

from __future__ import annotations

import os

import pytest
import torch

from llm_ray.models.quant import (
    dequantize_int4_groups,
    dequantize_int8_rows,
    dequantize_state_dict,
    quantize_int4_groups,
    quantize_int8_rows,
    quantize_state_dict,
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


@pytest.mark.parametrize("scheme,min_ratio,activations", [("int8", 3.5, None), ("int4", 6.0, None), ("int8", 3.5, "int8_dynamic")])
def test_a_quantized_folder_is_smaller_and_loads_as_a_close_model(tiny_model_dir, tmp_path, scheme, min_ratio, activations):
    """Every matrix — the tied embedding included — is stored as integers: the file shrinks by
    the scheme's ratio less the scales and the float norms; the loaded model's logits stay close
    (int8_dynamic: its linears run int8 matmuls on rounded activations, and stay close too)."""
    from llm_ray.bundle import load_bundle, save_bundle
    from llm_ray.models.quant import Int8DynamicLinear

    original = load_bundle(tiny_model_dir)
    quantization = {"scheme": scheme, "group_size": 32, **({"activations": activations} if activations else {})}
    out = save_bundle(original.model, original.cfg, original.tokenizer.to_str(), str(tmp_path / scheme), quantization=quantization)
    ratio = os.path.getsize(f"{tiny_model_dir}/model.safetensors") / os.path.getsize(f"{out}/model.safetensors")
    assert ratio >= min_ratio, ratio
    loaded = load_bundle(out)
    meta = loaded.config["quantization"]
    assert meta["scheme"] == scheme and "embedding.tok.weight" in meta["tensors"], meta
    assert meta["tied"] == {"head.proj.weight": "embedding.tok.weight"}
    dynamic = [n for n, m in loaded.model.named_modules() if isinstance(m, Int8DynamicLinear)]
    assert len(dynamic) == (7 * original.cfg.n_layers + 1 if activations else 0)  # q k v o gate up down per block, the head
    ids = torch.randint(5, 200, (2, 24))
    with torch.no_grad():
        want, got = original.model(ids), loaded.model(ids)
    assert not torch.equal(want, got)  # the integers really are what was loaded
    rel = (got - want).norm() / want.norm()
    assert rel < (0.2 if scheme == "int4" else 0.03 if activations else 0.02), float(rel)
    for name, p in loaded.model.named_parameters():  # norms stay exactly float
        if "norm" in name:
            assert torch.equal(p, dict(original.model.named_parameters())[name]), name


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fake_quant_forward_is_the_stored_folder_and_its_gradient_passes_straight_through(tiny_model_dir, tmp_path, scheme):
    """QAT's converter: the fake-quantized model computes what the folder stored quantized
    computes once loaded (same rounding, same scales), its gradient reaches the float weights
    unchanged (straight-through), and finalize gives back plain modules with the same names."""
    from llm_ray.bundle import load_bundle, save_bundle
    from llm_ray.models.converters import FakeQuant, FakeQuantLinear
    from llm_ray.models.quant import fake_quantize

    w = torch.randn(6, 64, requires_grad=True)
    q = fake_quantize(w, scheme, 32)
    stored, _ = quantize_state_dict({"w": w.detach()}, scheme, 32)
    assert torch.equal(q.detach(), dequantize_state_dict(stored, scheme)["w"])
    (q * torch.arange(64.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(64.0).expand(6, 64))

    b = load_bundle(tiny_model_dir)
    names = set(b.model.state_dict())
    converter = FakeQuant(scheme, 32)
    model = converter.convert(b.model)
    assert isinstance(model.layers[0].attn.q_proj, FakeQuantLinear) and set(model.state_dict()) == names
    assert model.head.proj.weight is model.embedding.tok.weight  # still tied
    ids = torch.randint(5, b.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        fake = model(ids)
        plain = converter.finalize(model)
        assert type(plain.layers[0].attn.q_proj) is torch.nn.Linear and set(plain.state_dict()) == names
        folder = save_bundle(plain, b.cfg, b.tokenizer.to_str(), str(tmp_path / scheme), quantization={"scheme": scheme, "group_size": 32})
        assert torch.allclose(load_bundle(folder).model(ids), fake, atol=1e-5)
        assert not torch.allclose(plain(ids), fake, atol=1e-3)  # the float model differs: rounding is real


def test_int8_dynamic_linear_is_the_integer_product_of_its_rounded_operands():
    """y = (x_q @ w_q^T) s_x s_w + b, with x_q the per-token int8 rounding: the same as the
    float product of the dequantized operands, and close to the float linear."""
    from llm_ray.models.quant import Int8DynamicLinear, apply_int8_dynamic

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    q = Int8DynamicLinear(linear)
    x = torch.randn(2, 5, 96)
    rows = x.reshape(-1, 96)
    sx = rows.abs().amax(1, keepdim=True) / 127
    wq, sw = quantize_int8_rows(linear.weight)
    ref = (torch.round(rows / sx) * sx) @ dequantize_int8_rows(wq, sw).t() + linear.bias
    with torch.no_grad():
        y = q(x)
        assert y.shape == (2, 5, 40) and torch.allclose(y.reshape(-1, 40), ref, atol=1e-4)
        assert (y - linear(x)).norm() / linear(x).norm() < 0.02
        model = apply_int8_dynamic(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
        assert [type(m).__name__ for m in model] == ["Int8DynamicLinear", "ReLU", "Int8DynamicLinear"]
