"""The seams later stages build on: named linears that a wrapper can replace, the tied head as one shared
parameter, `causal` in the forward context, `device`/`dtype`, and the cache protocol's call order."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from lmstack import ModelConfig, build_model
from lmstack.model.attention import Attention, ForwardContext

BIASED = ModelConfig(
    vocab_size=89, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64, family="llama",
    qkv_bias=True, out_bias=True, mlp_bias=True,
)  # fmt: skip
CONFIGS = {
    "gated": BIASED,
    "plain_mlp": dataclasses.replace(BIASED, mlp="gelu_tanh", norm="layernorm", position="learned"),
    "moe": dataclasses.replace(BIASED, n_experts=4, n_experts_per_token=2),
    "tied": dataclasses.replace(BIASED, tie_embeddings=True),
}
IDS = torch.randint(0, 89, (2, 12), generator=torch.Generator().manual_seed(0))


def _model(config: ModelConfig) -> nn.Module:
    """Wide random weights (std 0.2; biases and norm gains perturbed) so logits are O(1-10)."""
    model = build_model(config, seed=0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2, generator=gen)
            else:
                p.add_(torch.randn(p.shape, dtype=p.dtype, generator=gen) * 0.1)
    return model.eval()


class Affine(nn.Module):
    """A stand-in for a LoRA or quantized wrapper: out = inner(x) · scale + shift."""

    def __init__(self, inner: nn.Module, scale: float, shift: torch.Tensor):
        super().__init__()
        self.inner, self.scale, self.shift = inner, scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale + self.shift


SWAPS = [
    ("gated", "blocks.0.attn.q"),
    ("gated", "blocks.0.attn.k"),
    ("gated", "blocks.0.attn.v"),
    ("gated", "blocks.1.attn.o"),
    ("gated", "blocks.0.mlp.gate"),
    ("gated", "blocks.0.mlp.up"),
    ("gated", "blocks.1.mlp.down"),
    ("plain_mlp", "blocks.0.mlp.up"),
    ("plain_mlp", "blocks.0.mlp.down"),
    ("moe", "blocks.0.mlp.experts.1.gate"),
    ("moe", "blocks.0.mlp.experts.2.up"),
    ("moe", "blocks.1.mlp.experts.0.down"),
]


@pytest.mark.parametrize(("config", "name"), SWAPS)
def test_wrapping_a_named_linear_equals_changing_its_weights(config, name):
    """attr assignment of a wrapper takes effect: inner(x)·s + δ is the Linear with weight·s, bias·s + δ."""
    model = _model(CONFIGS[config])
    parent_name, _, attr = name.rpartition(".")
    linear = model.get_submodule(name)
    assert type(linear) is nn.Linear and linear.bias is not None
    scale, shift = 1.5, torch.randn(linear.out_features, dtype=torch.float64, generator=torch.Generator())
    reference = copy.deepcopy(model)
    with torch.no_grad():
        ref_linear = reference.get_submodule(name)
        ref_linear.weight.mul_(scale)
        ref_linear.bias.mul_(scale).add_(shift)
        before = model(IDS)
        setattr(model.get_submodule(parent_name), attr, Affine(linear, scale, shift))
        got, want = model(IDS), reference(IDS)
    torch.testing.assert_close(got, want)
    assert before.abs().max() > 1.0 and (got - before).abs().max() > 1e-2  # the swap reached the output


@pytest.mark.parametrize("config", ["gated", "tied"])
def test_wrapping_the_lm_head(config):
    model = _model(CONFIGS[config])
    shift = torch.randn(model.config.vocab_size, dtype=torch.float64, generator=torch.Generator())
    with torch.no_grad():
        before = model(IDS)
        model.lm_head = Affine(model.lm_head, 2.0, shift)
        got = model(IDS)
    torch.testing.assert_close(got, before * 2.0 + shift)
    if config == "tied":
        assert model.lm_head.inner.weight is model.tok_emb.weight


def test_tied_head_is_one_parameter_through_state_dict_to_and_meta_loading():
    tied = _model(CONFIGS["tied"])
    untied = _model(CONFIGS["gated"])
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.num_parameters() - tied.num_parameters() == 89 * 32
    assert "lm_head.weight" not in tied.state_dict() and "lm_head.weight" in untied.state_dict()
    want = tied(IDS)
    on_meta = build_model(CONFIGS["tied"], device="meta")
    for copy_ in (copy.deepcopy(tied), copy.deepcopy(tied).to(torch.float32), on_meta.to_empty(device="cpu")):
        assert copy_.lm_head.weight is copy_.tok_emb.weight
    # built on meta, then the tensors assigned: the head must follow the new embedding
    meta = build_model(CONFIGS["tied"], device="meta", dtype=torch.float64)
    missing, unexpected = meta.load_state_dict(tied.state_dict(), strict=True, assign=True)
    assert not missing and not unexpected
    assert meta.lm_head.weight is meta.tok_emb.weight and meta.lm_head.weight.device.type == "cpu"
    torch.testing.assert_close(meta.eval()(IDS), want)
    # an in-place load into a real model keeps the tie too
    fresh = build_model(CONFIGS["tied"], dtype=torch.float64).eval()
    fresh.load_state_dict(tied.state_dict())
    assert fresh.lm_head.weight is fresh.tok_emb.weight
    torch.testing.assert_close(fresh(IDS), want)


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flash"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_takes_causal_from_the_context(impl, causal):
    config = dataclasses.replace(BIASED, position="learned")
    attn = Attention(config, 0, impl).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.2, generator=gen)
    B, T, H, D = 2, 7, config.n_heads, config.head_dim
    x = torch.randn(B, T, config.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(T).expand(B, T)
    ctx = ForwardContext(positions, None, None, None, None, causal=causal, plain_causal=causal)
    with torch.no_grad():
        got = attn(x, ctx)
        # the formula, each key/value head repeated for its query heads
        q = attn.q(x).view(B, T, H, D).transpose(1, 2)
        k = attn.k(x).view(B, T, -1, D).transpose(1, 2).repeat_interleave(H // config.n_kv_heads, 1)
        v = attn.v(x).view(B, T, -1, D).transpose(1, 2).repeat_interleave(H // config.n_kv_heads, 1)
        scores = q @ k.transpose(-1, -2) / D**0.5
        if causal:
            scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        want = attn.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(got, want)


def test_the_decoder_sets_causal():
    model = _model(CONFIGS["gated"])
    seen = []
    model.blocks[1].attn.register_forward_pre_hook(lambda module, args: seen.append(args[1].causal))
    with torch.no_grad():
        model(IDS)
    assert seen == [True]


class _PackedLinear(nn.Module):
    """What an int4-packed linear holds: integer storage and a scale, no floating weight of its own."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer(
            "packed", torch.zeros(linear.out_features, linear.in_features // 2, dtype=torch.uint8)
        )
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.int32), requires_grad=False)


def test_device_and_dtype_properties():
    model = build_model(BIASED, dtype=torch.bfloat16)
    assert model.device == torch.device("cpu") and model.dtype == torch.bfloat16
    assert build_model(BIASED, device="meta").device.type == "meta"
    model = model.to(torch.float64)
    assert model.dtype == torch.float64
    model.blocks[0].attn.q = _PackedLinear(model.blocks[0].attn.q)
    model.lm_head = _PackedLinear(model.lm_head)
    assert model.dtype == torch.float64


class RecordingCache:
    """A concatenating cache written from the protocol's docstring, logging every call."""

    def __init__(self, n_layers: int):
        self.seen_tokens, self.calls = 0, []
        self.k, self.v = [None] * n_layers, [None] * n_layers
        self.pos = None

    def begin(self, positions, valid):
        assert valid is None
        self.calls.append("begin")
        self.pos = positions if self.pos is None else torch.cat((self.pos, positions), 1)
        self.seen_tokens += positions.shape[1]

    def update(self, layer, k, v):
        self.calls.append(layer)
        self.k[layer] = k if self.k[layer] is None else torch.cat((self.k[layer], k), 2)
        self.v[layer] = v if self.v[layer] is None else torch.cat((self.v[layer], v), 2)
        return self.k[layer], self.v[layer], self.pos, None


def test_cache_protocol_begin_once_then_update_per_layer():
    model = _model(CONFIGS["gated"])
    cache = RecordingCache(model.config.n_layers)
    with torch.no_grad():
        prefill = model(IDS[:, :9], cache=cache)
        steps = [model(IDS[:, t : t + 1], cache=cache) for t in range(9, 12)]
        full = model(IDS)
    assert cache.calls == ["begin", 0, 1] * 4
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), full)
