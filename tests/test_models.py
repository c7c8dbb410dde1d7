"""Model code: shapes, causality, KV cache, padding, tying, MoE, overfitting, FLOP accounting."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from llm_ray.config import ModelConfig, MoEConfig
from llm_ray.models import (
    DecoderBlock,
    DecoderEmbedding,
    DecoderHead,
    DecoderLM,
    EncoderMLM,
    KVCache,
    MoEFeedForward,
    SinusoidalPositions,
    build_model,
    count_params,
    flops_per_token,
)
from llm_ray.generation.sampling import greedy_tokens
from llm_ray.models.attention import attention_mask_4d

V = 64


def gpt2_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, positions="learned",
        norm="layernorm", ffn="gelu", bias=True, tie_embeddings=True,
    )
    return ModelConfig(**{**base, **kw})


def llama_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, positions="rope",
        norm="rmsnorm", ffn="swiglu", bias=False, tie_embeddings=True,
    )
    return ModelConfig(**{**base, **kw})


def bert_cfg(**kw) -> ModelConfig:
    base = dict(
        arch="encoder", vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, positions="learned",
        norm="layernorm", norm_position="post", ffn="gelu", bias=True, tie_embeddings=True,
    )
    return ModelConfig(**{**base, **kw})


def moe_cfg(**moe) -> ModelConfig:
    return llama_cfg(moe=MoEConfig(**{"num_experts": 4, "top_k": 2, **moe}))


def make(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


DECODERS = {
    "gpt2": gpt2_cfg(),
    "llama_gqa": llama_cfg(),
    "mqa": llama_cfg(n_kv_heads=1),
    "sinusoidal": gpt2_cfg(positions="sinusoidal"),
    "post_norm": llama_cfg(norm_position="post"),
    "moe": moe_cfg(),
}


# --- shapes and construction -------------------------------------------------------------


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_builds_and_gives_logits(name):
    model = make(DECODERS[name])
    assert isinstance(model, DecoderLM)
    logits = model(tokens(2, 10))
    assert logits.shape == (2, 10, V)
    assert torch.isfinite(logits).all()


def test_encoder_builds_and_encodes():
    model = make(bert_cfg())
    assert isinstance(model, EncoderMLM)
    x = tokens(2, 10)
    assert model(x).shape == (2, 10, V)
    assert model.encode(x).shape == (2, 10, 32)
    assert all(not block.attn.causal for block in model.layers)


def test_build_model_needs_vocab_size():
    with pytest.raises(ValueError, match="model.vocab_size"):
        build_model(llama_cfg(vocab_size=0))


def test_parts_compose_to_the_model():
    """The pipeline adapter builds embedding, blocks and head alone; chained they are the model."""
    cfg = llama_cfg()
    model = make(cfg)
    emb, head = DecoderEmbedding(cfg), DecoderHead(cfg)
    blocks = [DecoderBlock(cfg, i) for i in range(cfg.n_layers)]
    emb.load_state_dict(model.embedding.state_dict())
    head.load_state_dict(model.head.state_dict())
    for b, ref in zip(blocks, model.layers, strict=True):
        b.load_state_dict(ref.state_dict())
    x = tokens(2, 9)
    h = emb(x)
    for b in blocks:
        h = b(h)  # no position ids: each block computes its own rotary angles
    torch.testing.assert_close(head(h), model(x), atol=1e-6, rtol=0)


def test_standalone_blocks_use_the_cache_offset():
    """A block alone (no position ids from a parent) must offset its rotary angles by the cache."""
    cfg = llama_cfg()
    model = make(cfg)
    x = tokens(2, 8)
    full = model(x)
    cache = KVCache(cfg.n_layers)
    outs = []
    for chunk in (x[:, :5], x[:, 5:6], x[:, 6:]):
        h = model.embedding(chunk)
        for block in model.layers:
            h = block(h, kv_cache=cache)
        outs.append(model.head(h))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)


def test_init_is_deterministic_and_scales_residual_projections():
    cfg = llama_cfg(d_model=256, n_layers=8, n_heads=4, n_kv_heads=None)
    a, b = make(cfg, seed=3), make(cfg, seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n
    block = a.layers[0]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    resid = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert block.ffn.down.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert torch.equal(block.attn_norm.weight, torch.ones(256))


def test_sinusoidal_table_values():
    pe = SinusoidalPositions(8)(torch.arange(3).unsqueeze(0))[0]  # (3, 8)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0] * 4))
    assert pe[1, 0].item() == pytest.approx(math.sin(1.0))
    assert pe[1, 2].item() == pytest.approx(math.sin(1.0 / 10000 ** (2 / 8)))


# --- attention semantics -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "post_norm"])
def test_decoder_is_causal(name):
    model = make(DECODERS[name])
    x = tokens(2, 12)
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % V
    lx, ly = model(x), model(y)
    torch.testing.assert_close(lx[:, :7], ly[:, :7], atol=1e-6, rtol=0)
    assert (lx[:, 7:] - ly[:, 7:]).abs().max() > 1e-4


def test_encoder_is_bidirectional():
    model = make(bert_cfg())
    x = tokens(2, 12)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % V
    assert (model(x)[:, 0] - model(y)[:, 0]).abs().max() > 1e-4


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A q head h reads k/v head h // (n_heads / kv_heads): check against an explicit MHA."""
    gqa = make(llama_cfg(n_kv_heads=2))
    mha = make(llama_cfg(n_kv_heads=None))
    state = gqa.state_dict()
    hd = 32 // 4
    for key, w in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = w.view(2, hd, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    x = tokens(2, 10)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=0)


def test_attention_mask_never_leaves_a_query_without_keys():
    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = attention_mask_4d(padding, q_len=5, kv_len=5, causal=True, device=torch.device("cpu"))
    assert mask.shape == (2, 1, 5, 5)
    assert mask.any(-1).all()  # an all-False row gives NaN in some SDPA kernels
    assert mask[0, 0, 0].tolist() == [True, False, False, False, False]  # a pad query sees itself
    assert not mask[0, 0, 2:, :2].any()  # real queries never see the left pads
    assert torch.equal(mask[1, 0], torch.ones(5, 5, dtype=torch.bool).tril())  # plain causal
    # with 2 cached tokens the 3 new queries sit at positions 2..4
    cached = attention_mask_4d(None, q_len=3, kv_len=5, causal=True, device=torch.device("cpu"))
    assert torch.equal(cached[0, 0], torch.ones(5, 5, dtype=torch.bool).tril()[2:])


def test_rope_depends_only_on_relative_positions():
    model = make(llama_cfg())
    x = tokens(2, 10)
    shifted = torch.arange(10).unsqueeze(0) + 17
    torch.testing.assert_close(model(x), model(x, position_ids=shifted), atol=1e-4, rtol=0)
    gpt2 = make(gpt2_cfg())  # learned absolute positions do change with the shift
    assert (gpt2(x) - gpt2(x, position_ids=shifted)).abs().max() > 1e-4


def test_encoder_padding_does_not_leak():
    model = make(bert_cfg())
    x = tokens(2, 10)
    mask = torch.ones_like(x)
    mask[:, 6:] = 0  # right padding
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 5) % V  # different pad ids must not matter
    hx, hy = model.encode(x, mask), model.encode(y, mask)
    torch.testing.assert_close(hx[:, :6], hy[:, :6], atol=1e-6, rtol=0)
    assert (model.encode(x)[:, :6] - model.encode(y)[:, :6]).abs().max() > 1e-4  # unmasked: leaks


# --- KV cache and generation ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "mqa", "sinusoidal", "moe"])
def test_stepwise_cached_logits_equal_full_forward(name):
    model = make(DECODERS[name])
    x = tokens(2, 12)
    full = model(x)
    cache = KVCache(len(model.layers))
    parts = [model(x[:, :5], kv_cache=cache)]  # prefill 5, then one token at a time
    for t in range(5, 12):
        parts.append(model(x[:, t : t + 1], kv_cache=cache))
    assert cache.length == 12
    assert cache.keys[0].shape == (2, model.cfg.kv_heads, 12, model.cfg.head_dim)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "mqa"])
def test_cached_greedy_equals_uncached(name):
    model = make(DECODERS[name])
    x = tokens(3, 6)
    cached = greedy_tokens(model, x, 12, use_cache=True)
    uncached = greedy_tokens(model, x, 12, use_cache=False)
    assert cached.shape == (3, 18)
    assert torch.equal(cached[:, :6], x)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_left_padded_batch_matches_each_prompt_alone(name):
    model = make(DECODERS[name])
    short, long = tokens(1, 4, seed=2), tokens(1, 9, seed=3)
    pad = 9 - 4
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long], 0)
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    torch.testing.assert_close(model(batch, attention_mask=mask)[0, pad:], model(short)[0], atol=1e-5, rtol=0)
    for use_cache in (True, False):
        out = greedy_tokens(model, batch, 8, attention_mask=mask, use_cache=use_cache)
        assert torch.equal(out[0, pad:], greedy_tokens(model, short, 8)[0])
        assert torch.equal(out[1], greedy_tokens(model, long, 8)[0])


def test_cache_remembers_padding():
    """After a masked prefill, new tokens may come without a mask: the cache keeps the pads'."""
    model = make(llama_cfg())
    x = tokens(2, 10)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    full = model(x, attention_mask=mask)
    cache = KVCache(model.cfg.n_layers)
    model(x[:, :7], attention_mask=mask[:, :7], kv_cache=cache)
    step = model(x[:, 7:9], kv_cache=cache)  # no mask: the 2 new tokens are real
    last = model(x[:, 9:], attention_mask=mask[:, 9:], kv_cache=cache)  # mask of the new token only
    assert cache.padding_mask(0).shape == (2, 10)
    torch.testing.assert_close(torch.cat([step, last], 1), full[:, 7:], atol=1e-5, rtol=0)


def test_bf16_forward_and_generation():
    model = make(moe_cfg()).to(torch.bfloat16)
    x = tokens(2, 8)
    logits = model(x)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert greedy_tokens(model, x, 4).shape == (2, 12)


def test_generation_stops_at_eos():
    model = make(llama_cfg())
    x = tokens(1, 5)
    first = greedy_tokens(model, x, 1)[0, -1].item()
    out = greedy_tokens(model, x, 10, eos_id=first)
    assert out.shape == (1, 6) and out[0, -1].item() == first
    assert model.training is False
    model.train()
    greedy_tokens(model, x, 2)
    assert model.training  # mode restored


# --- tying and parameter counts --------------------------------------------------------------


def test_tied_and_untied_embeddings():
    tied, untied = make(llama_cfg()), make(llama_cfg(tie_embeddings=False))
    assert tied.head.proj.weight is tied.embedding.tok.weight
    assert untied.head.proj.weight is not untied.embedding.tok.weight
    assert count_params(untied) - count_params(tied) == V * 32
    assert count_params(tied, non_embedding=True) == count_params(untied, non_embedding=True)
    enc = make(bert_cfg())
    assert enc.head.proj.weight is enc.embedding.tok.weight


def test_count_params_non_embedding():
    model = make(gpt2_cfg(tie_embeddings=False))
    emb = V * 32 + 64 * 32 + 32 * V  # tokens, learned positions, head projection
    assert count_params(model) - count_params(model, non_embedding=True) == emb


# --- mixture of experts ----------------------------------------------------------------------


def test_moe_layer_placement():
    model = make(llama_cfg(n_layers=4, moe=MoEConfig(num_experts=4, every_n_layers=2)))
    kinds = [isinstance(block.ffn, MoEFeedForward) for block in model.layers]
    assert kinds == [False, True, False, True]


def test_dense_aux_loss_is_zero_scalar():
    loss = make(llama_cfg()).aux_loss()
    assert loss.shape == () and loss.item() == 0.0


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_aux_loss_and_gradients(top_k):
    cfg = moe_cfg(top_k=top_k, capacity_factor=2.0)
    model = make(cfg).train()
    x = tokens(4, 16)
    logits = model(x)
    aux = model.aux_loss()
    assert aux.item() > 0 and aux.requires_grad
    # Each layer's loss is >= 1 (1 = perfectly balanced), so the sum is >= coef * n_layers.
    assert aux.item() >= cfg.moe.aux_loss_coef * cfg.n_layers - 1e-6
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    lm.backward(retain_graph=True)
    moe = model.layers[0].ffn
    assert moe.router.weight.grad.abs().sum() > 0  # the gate weights carry LM-loss gradient
    assert sum(e.down.weight.grad.abs().sum() for e in moe.experts) > 0
    model.zero_grad()
    aux.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_moe_capacity_drops_assignments():
    x = tokens(4, 16)
    roomy = make(moe_cfg(capacity_factor=4.0))
    roomy(x)
    assert all(block.ffn.last_dropped.item() == 0 for block in roomy.layers)
    tight = make(moe_cfg(capacity_factor=0.25))
    tight(x)
    moe = tight.layers[0].ffn
    n_assign = 4 * 16 * 2
    assert moe.capacity(64) == math.ceil(0.25 * 64 * 2 / 4)
    assert moe.last_dropped.item() >= n_assign - 4 * moe.capacity(64)


def test_moe_beyond_capacity_contributes_nothing():
    """Capacity 1 per expert: each chosen expert serves one assignment, the rest pass through."""
    cfg = moe_cfg(capacity_factor=1e-3)
    torch.manual_seed(0)
    moe = MoEFeedForward(cfg)
    x = torch.randn(1, 40, 32)
    y = moe(x)
    assert moe.capacity(40) == 1
    chosen = F.softmax(moe.router(x[0]), -1).topk(2, -1).indices.unique().numel()  # experts used
    assert moe.last_dropped.item() == 40 * 2 - chosen
    served = (y[0].abs().sum(-1) > 0).sum().item()  # tokens that got any expert output
    assert 1 <= served <= chosen


def test_moe_gate_weights_sum_to_one():
    """With identical experts and room for all, the mixture must equal one expert's output."""
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_cfg(top_k=2, capacity_factor=4.0))
    for expert in moe.experts[1:]:
        expert.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(2, 8, 32)
    torch.testing.assert_close(moe(x), moe.experts[0](x), atol=1e-6, rtol=1e-5)


# --- training sanity -------------------------------------------------------------------------


def _overfit(model, loss_fn, steps=30, lr=1e-2):
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model)
        opt.zero_grad()
        (loss + model.aux_loss()).backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.parametrize("cfg", [gpt2_cfg(), llama_cfg(), moe_cfg()], ids=["gpt2", "llama", "moe"])
def test_decoder_overfits_one_batch(cfg):
    x = tokens(4, 16)

    def loss_fn(model):
        logits = model(x)
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))

    first, last = _overfit(make(cfg), loss_fn)
    assert last < 0.7 * first, (first, last)


def test_encoder_overfits_masked_positions():
    x = tokens(4, 16)
    masked = torch.zeros_like(x, dtype=torch.bool)
    masked[:, [2, 7, 11]] = True
    inp = x.masked_fill(masked, V - 1)  # V-1 plays [MASK]

    def loss_fn(model):
        return F.cross_entropy(model(inp)[masked], x[masked])

    first, last = _overfit(make(bert_cfg()), loss_fn)
    assert last < 0.7 * first, (first, last)


# --- FLOPs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [llama_cfg(), gpt2_cfg(tie_embeddings=False)], ids=["tied", "untied"])
def test_flops_per_token_dense(cfg):
    model, T = make(cfg), 128
    want = 6 * count_params(model, non_embedding=True) + 6 * 32 * V + 12 * cfg.n_layers * 32 * T
    assert flops_per_token(cfg, T) == want


def test_flops_per_token_counts_only_active_experts():
    cfg = moe_cfg(num_experts=8, top_k=2)
    dense = dataclasses.replace(cfg, moe=MoEConfig())
    model = make(cfg)
    expert_params = sum(p.numel() for p in model.layers[0].ffn.experts[0].parameters())
    router = 32 * 8
    # per layer: the MoE adds top_k - 1 experts' worth of compute and a router over dense
    extra = cfg.n_layers * ((2 - 1) * expert_params + router)
    assert flops_per_token(cfg, 64) == flops_per_token(dense, 64) + 6 * extra
