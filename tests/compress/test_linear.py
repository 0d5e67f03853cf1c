"""QuantLinear: the packed CPU kernels against dequantise-then-matmul, and `swap` on a model.

Tolerance of the fast paths. They round the activations to bfloat16 (8 significant bits, relative
error <= 2^-9 per element), int8's scales and int4's scale/offset pairs too, and return a bfloat16
result (another 2^-9). Against the float32 reference the error is therefore a small multiple of 2^-9
of the output's magnitude: we allow 2^-6 of the largest |reference| output. Against a reference fed
the same bfloat16-rounded inputs and constants, only accumulation and output rounding remain: 2^-7.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmstack.compress import QuantLinear, QuantScheme, quantization_config, quantize
from lmstack.compress.linear import QUANT_TENSORS
from lmstack.compress.swap import TARGETS
from lmstack.config import ModelConfig
from lmstack.errors import InputError
from lmstack.model import build_model
from lmstack.quant import (
    int4_dequantize,
    int4_quantize,
    int8_dequantize,
    int8_quantize,
    nf4_dequantize,
    nf4_quantize,
)
from lmstack.quant.integer import int4_unpack

SCHEMES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


@pytest.fixture(autouse=True)
def pytorch_kernels(monkeypatch):
    """These tests are about PyTorch's packed kernels and the reference path, which run where our own
    kernels cannot be built; ours are tested in test_kernels.py."""
    monkeypatch.setattr("lmstack.compress.kernels.available", lambda: False)


def _linear(in_features: int, out_features: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(lin.weight, std=0.2)
    if bias:
        nn.init.normal_(lin.bias, std=0.2)
    return lin


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


@pytest.mark.parametrize("method,group_size", SCHEMES)
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_kernel_matches_dequantize_then_matmul(method, group_size, rows, bias):
    lin = _linear(256, 192, bias)
    q = QuantLinear.from_linear(lin, QuantScheme.make(method, group_size))
    x = torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(1))
    assert q._uses_packed_kernel(x)
    with torch.no_grad():
        fast, ref = q(x), q.reference_forward(x)
    assert fast.shape == ref.shape == (2, rows, 192) and fast.dtype == torch.float32
    bound = ref.abs().max() * 2**-6
    assert (fast - ref).abs().max() <= bound
    # the same computation with the kernel's own bfloat16 roundings: only accumulation is left
    if method == "int8":
        w = q.qweight.float() * _bf16(q.scales)[:, None]
    else:
        codes = int4_unpack(q.qweight).float()
        s = _bf16(q.scales).repeat_interleave(group_size, 1)
        offset = _bf16((8 - q.zeros.float()) * q.scales).repeat_interleave(group_size, 1)
        w = (codes - 8) * s + offset
    same_rounding = _bf16(x) @ w.t() + (0 if lin.bias is None else q.bias)
    assert (fast - same_rounding).abs().max() <= ref.abs().max() * 2**-7


def test_dequantize_is_the_pure_quantizers():
    lin = _linear(128, 64, bias=False)
    w = lin.weight.detach()
    q8 = QuantLinear.from_linear(lin, QuantScheme.make("int8"))
    assert torch.equal(q8.dequantize(), int8_dequantize(int8_quantize(w)))
    q4 = QuantLinear.from_linear(lin, QuantScheme.make("int4", 32))
    assert torch.equal(q4.dequantize(), int4_dequantize(int4_quantize(w, 32)))
    # and the quantization error stays within each scheme's bound: half a step
    assert ((q8.dequantize() - w).abs() <= q8.scales[:, None] / 2 + 1e-7).all()
    assert ((q4.dequantize() - w).abs() <= q4.scales.repeat_interleave(32, 1) / 2 + 1e-7).all()


@pytest.mark.parametrize("shape", [(64, 128), (40, 24)])  # 40*24 is not a multiple of the 64-block
def test_nf4_dequantize_is_the_pure_quantizer(shape):
    lin = _linear(shape[1], shape[0], bias=False)
    q = QuantLinear.from_linear(lin, QuantScheme.make("nf4"))
    assert torch.equal(q.dequantize(), nf4_dequantize(nf4_quantize(lin.weight.detach(), block=64)))


def test_nf4_and_gradient_calls_take_the_reference_path():
    lin = _linear(128, 64, bias=True)
    nf4 = QuantLinear.from_linear(lin, QuantScheme.make("nf4"))
    x = torch.randn(3, 128)
    assert not nf4._uses_packed_kernel(x)
    assert torch.equal(nf4(x), nf4.reference_forward(x))
    assert (nf4.dequantize() - lin.weight).abs().max() < 0.2 * lin.weight.abs().max()
    q8 = QuantLinear.from_linear(lin, QuantScheme.make("int8"))
    xg = x.clone().requires_grad_()
    y = q8(xg)  # packed kernels have no backward: gradients flow through the dequantised matrix
    y.sum().backward()
    assert torch.allclose(xg.grad, q8.dequantize().sum(0).expand(3, -1), atol=1e-5)


def test_int4_output_width_the_kernel_cannot_tile_falls_back():
    q = QuantLinear.from_linear(_linear(64, 40, bias=False), QuantScheme.make("int4", 32))
    x = torch.randn(2, 64)
    assert not q._uses_packed_kernel(x)
    assert torch.equal(q(x), q.reference_forward(x))


def test_unaligned_int8_weight_is_realigned_before_the_kernel():
    """A tensor read from safetensors can sit at any byte offset; the int8 kernel needs 64-byte alignment."""
    q = QuantLinear.from_linear(_linear(128, 128, bias=False), QuantScheme.make("int8"))
    storage = torch.zeros(128 * 128 + 8, dtype=torch.int8)
    shifted = storage[8:].view(128, 128)
    shifted.copy_(q.qweight)
    q.qweight = shifted
    assert q.qweight.data_ptr() % 64
    x = torch.randn(16, 128)
    with torch.no_grad():
        assert (q(x) - q.reference_forward(x)).abs().max() <= q.reference_forward(x).abs().max() * 2**-6


def test_bfloat16_model_dtype():
    lin = _linear(128, 64, bias=True).to(torch.bfloat16)
    q = QuantLinear.from_linear(lin, QuantScheme.make("int4", 32))
    assert q.scales.dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16
    ref = q.reference_forward(x.float().to(torch.bfloat16))
    assert (y.float() - ref.float()).abs().max() <= ref.float().abs().max() * 2**-5


# ---- swap on a model ----------------------------------------------------------------------------
def _config(**kw) -> ModelConfig:
    base = dict(family="llama", vocab_size=320, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                max_seq_len=64)  # fmt: skip
    return ModelConfig(**{**base, **kw})


def _model(config: ModelConfig, std: float = 0.05) -> nn.Module:
    model = build_model(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.reset_parameters(std)
    return model.eval()


def test_swap_replaces_exactly_the_projections():
    model = quantize(_model(_config(tie_embeddings=True)), "int8")
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == {f"blocks.{i}.{part}.{t}" for i in range(2) for part, ts in
                         (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for t in ts}  # fmt: skip
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.tok_emb.weight
    assert isinstance(model.tok_emb, nn.Embedding)
    record = quantization_config(model)
    modules = record.pop("modules")
    assert record == {"quant_method": "lmstack", "scheme": "int8", "bits": 8, "group_size": None}
    assert modules == [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def test_moe_experts_are_quantized_and_the_router_is_not():
    model = quantize(_model(_config(n_experts=4, n_experts_per_token=2)), "int4", group_size=32)
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert "blocks.0.mlp.experts.3.down" in names and "blocks.1.mlp.experts.0.gate" in names
    assert isinstance(model.blocks[0].mlp.router, nn.Linear)
    assert all(n.rsplit(".", 1)[-1] in TARGETS for n in names)


def test_include_head():
    model = quantize(_model(_config(tie_embeddings=False)), "int4", group_size=64, include_head=True)
    assert isinstance(model.lm_head, QuantLinear)


@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 32)])
def test_include_head_quantizes_a_tied_head_and_keeps_the_embedding_float(method, group_size):
    float_model = _model(_config(tie_embeddings=True), std=0.2)
    embedding = float_model.tok_emb.weight.detach().clone()
    ids = torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = float_model.features(ids)
    model = quantize(float_model, method, group_size=group_size, include_head=True)
    head = model.lm_head
    assert isinstance(head, QuantLinear) and torch.equal(model.tok_emb.weight, embedding)
    # the head is the shared matrix quantized; the lookup still reads the float rows
    reference = _quantize_like(embedding, method, group_size)
    assert torch.equal(head.dequantize(torch.float32), reference)
    assert "lm_head" in quantization_config(model)["modules"]
    state = model.state_dict()
    assert "tok_emb.weight" in state and "lm_head.qweight" in state and "lm_head.weight" not in state
    with torch.no_grad():
        logits = model(ids)
        blocks_only = model.features(ids)
    assert not torch.equal(blocks_only, hidden)  # the blocks are quantized too, as without the head
    torch.testing.assert_close(logits, blocks_only @ reference.t(), atol=2**-6 * logits.abs().max(), rtol=0)
    # model.to(...) must not re-tie the head to the embedding
    model.to(torch.float32)
    assert isinstance(model.lm_head, QuantLinear)


def _quantize_like(w: torch.Tensor, method: str, group_size: int | None) -> torch.Tensor:
    if method == "int8":
        return int8_dequantize(int8_quantize(w), torch.float32)
    return int4_dequantize(int4_quantize(w, group_size), torch.float32)


def test_refusals_leave_the_model_untouched():
    model = _model(_config(d_model=96, n_heads=4, n_kv_heads=2, d_ff=192))
    with pytest.raises(
        InputError, match=r"group size 64 does not divide the input width 96 .* use --group-size 32"
    ):
        quantize(model, "int4", group_size=64)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(InputError, match="drop the group size"):
        quantize(model, "int8", group_size=32)
    with pytest.raises(InputError, match="use one of int8, int4, nf4"):
        quantize(model, "int3")
    quantize(model, "int8")
    with pytest.raises(InputError, match=r"already quantized \(int8\) — quantize its float checkpoint"):
        quantize(model, "int4", group_size=32)


def _fake_quantized(model: nn.Module) -> nn.Module:
    """The float model whose projections hold the dequantised matrices: what a quantized model computes."""
    fake = build_model(model.config, seed=0).eval()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            state[f"{name}.weight"] = module.dequantize(torch.float32)
    float_state = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in QUANT_TENSORS}
    fake.load_state_dict({**float_state, **state})
    return fake


@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 32), ("int4", 128), ("nf4", 64)])
def test_model_logits(method, group_size):
    """The quantized model computes the fake-quantized float model (up to the kernels' bfloat16), and
    stays near the float model: relative L2 error of the logits under a per-scheme bound measured on
    these random weights (std 0.05; random matrices are the worst case for 4 bits, trained ones fare
    better — see bench/compress.py for perplexity)."""
    config = _config(tie_embeddings=False)
    float_model = _model(config)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _model(config)
    quantize(model, method, group_size=group_size)
    with torch.no_grad():
        logits, ref, fake = model(ids), float_model(ids), _fake_quantized(model)(ids)
    kernel_tol = 0 if method == "nf4" else 2**-5  # nf4 runs the reference path: exact
    assert (logits - fake).abs().max() <= kernel_tol * fake.abs().max() + 1e-5
    rel = ((logits - ref).norm() / ref.norm()).item()
    assert rel < {"int8": 0.05, "int4": 0.35, "nf4": 0.35}[method], rel
    if method == "int4" and group_size == 32:
        coarse = quantize(_model(config), "int4", group_size=128)
        with torch.no_grad():
            assert rel < ((coarse(ids) - ref).norm() / ref.norm()).item()  # smaller groups, smaller error
