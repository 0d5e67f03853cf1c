"""Our int8/int4 CPU kernels (lmstack.compress.kernels) against dequantise-then-matmul.

The int8 and int4 kernels multiply the activation rounded to int8 per 32 inputs
(`kernels.quantize_activations`, checked against its definition below) by the exact integer codes,
and the bfloat16 head multiplies x by exactly widened weights; so each differs from its reference
(the dequantised matrix times the activation it multiplies, here in float64) only by float32 rounding
of the sums: for a dot product of length K that error is at most ~K·2^-24 of Σ|x|·|w| (the standard
bound γ_K). We allow 2·(K + 8)·2^-24 of it. A single wrong code or scale moves an output by about
|x|·|w| of one term, ~Σ|x|·|w| / K, far above the bound for the K used here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lmstack.compress import QuantLinear, QuantScheme, kernels, quantize
from lmstack.compress.decode import DecodeHead, FusedQuant
from lmstack.compress.kernels import build
from lmstack.config import ModelConfig
from lmstack.infer import generate
from lmstack.model import build_model
from lmstack.quant import int4_dequantize, int4_quantize, int8_dequantize, int8_quantize

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the C kernels cannot be built here")


def _weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.2


def _x(rows: int, in_features: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed))


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """y equals x @ wᵀ (+ bias), computed in float64, within float32 summation error."""
    ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    magnitude = x.double().abs() @ w.double().abs().t() + (0 if bias is None else bias.double().abs())
    bound = 2 * (x.shape[-1] + 8) * 2**-24 * magnitude
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max()


def _unaligned(t: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    """A contiguous copy of `t` starting `offset_bytes` past an allocation's start."""
    raw = torch.empty(t.numel() * t.element_size() + 128, dtype=torch.uint8)
    view = (
        raw[(-raw.data_ptr()) % 64 + offset_bytes :][: t.numel() * t.element_size()]
        .view(t.dtype)
        .view(t.shape)
    )
    view.copy_(t)
    assert view.data_ptr() % 64 == offset_bytes % 64
    return view


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 16), (7, 48), (13, 100), (192, 256), (5, 769)])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int8_equals_dequantize_then_matmul(shape, rows):
    t = int8_quantize(_weight(*shape, seed=shape[0]))
    x = _x(rows, shape[1])
    y = kernels.int8_matmul(x, kernels.pack_int8(t.q, t.scale))
    _check(y, kernels.quantize_activations(x), int8_dequantize(t))


@needs_kernels
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(1, 128), (13, 256), (40, 384), (197, 768)])
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_int4_equals_dequantize_then_matmul(group_size, shape, rows):
    t = int4_quantize(_weight(*shape, seed=shape[0]), group_size)
    assert torch.equal(t.scale.to(torch.bfloat16).float(), t.scale)  # kept exactly in 2 bytes
    x = _x(rows, shape[1])
    packed = kernels.pack_int4(t.packed, t.scale, t.zero, group_size)
    _check(kernels.int4_matmul(x, packed), kernels.quantize_activations(x), int4_dequantize(t))


@pytest.mark.parametrize("width", [128, 100])
def test_activations_are_rounded_to_int8_per_32_inputs(width):
    x = _x(3, width) * torch.linspace(0.01, 10, width)  # blocks of very different magnitudes
    xq = kernels.quantize_activations(x)
    assert xq.shape == x.shape
    padded = torch.nn.functional.pad(torch.stack([x, xq]), (0, -width % 32))  # a partial block: zeros
    blocks, qblocks = padded[0].reshape(3, -1, 32), padded[1].reshape(3, -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    assert ((qblocks - blocks).abs() <= step / 2 * (1 + 1e-6)).all()  # round to nearest step
    codes = qblocks / step
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127 + 1e-3


@needs_kernels
def test_bias_and_leading_dimensions():
    w, bias = _weight(33, 96, seed=2), torch.randn(33)
    x = _x(6, 96).reshape(2, 3, 96)
    t8 = int8_quantize(w)
    y = kernels.int8_matmul(x, kernels.pack_int8(t8.q, t8.scale), bias)
    assert y.shape == (2, 3, 33)
    _check(y.reshape(6, 33), kernels.quantize_activations(x.reshape(6, 96)), int8_dequantize(t8), bias)
    t4 = int4_quantize(w, 32)
    y = kernels.int4_matmul(x, kernels.pack_int4(t4.packed, t4.scale, t4.zero, 32), bias)
    _check(y.reshape(6, 33), kernels.quantize_activations(x.reshape(6, 96)), int4_dequantize(t4), bias)


@needs_kernels
@pytest.mark.parametrize("offset", [1, 4, 12])
def test_unaligned_pointers(offset):
    """Tensors read from a safetensors file, or slices, may start anywhere; the kernels load unaligned."""
    w, x = _weight(21, 160, seed=3), _x(2, 160)
    x_off = _unaligned(x, offset - offset % 4)  # a float32 tensor is at least 4-byte aligned
    t8 = int8_quantize(w)
    p8 = kernels.pack_int8(t8.q, t8.scale)
    p8 = dataclasses.replace(p8, weight=_unaligned(p8.weight, offset), scale=_unaligned(p8.scale, 4))
    _check(kernels.int8_matmul(x_off, p8), kernels.quantize_activations(x), int8_dequantize(t8))
    t4 = int4_quantize(w, 32)
    p4 = kernels.pack_int4(t4.packed, t4.scale, t4.zero, 32)
    p4 = dataclasses.replace(p4, weight=_unaligned(p4.weight, offset), zero=_unaligned(p4.zero, offset))
    _check(kernels.int4_matmul(x_off, p4), kernels.quantize_activations(x), int4_dequantize(t4))


@needs_kernels
def test_thread_counts_give_identical_results(monkeypatch):
    """Rows are split between threads; each output is one thread's sum, so the count changes nothing."""
    monkeypatch.setattr(kernels, "PARALLEL_MIN_WEIGHTS", 0)  # this small matrix too is split
    w, x = _weight(301, 512, seed=4), _x(3, 512)
    t8, t4 = int8_quantize(w), int4_quantize(w, 64)
    p8, p4 = kernels.pack_int8(t8.q, t8.scale), kernels.pack_int4(t4.packed, t4.scale, t4.zero, 64)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((kernels.int8_matmul(x, p8), kernels.int4_matmul(x, p4)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    _check(results[1][0], kernels.quantize_activations(x), int8_dequantize(t8))
    _check(results[1][1], kernels.quantize_activations(x), int4_dequantize(t4))


@pytest.fixture
def portable_kernels(monkeypatch):
    """The same source built without AVX-512 (its plain C loops), in place of the vector build."""
    if build._compiler() is None or not build.supported_cpu():
        pytest.skip("no C compiler, or a CPU the vector build does not run on")
    lib = build.load_source(build.SOURCE, ("-mno-avx512f",))
    if lib is None:
        pytest.skip("the portable build failed")
    for name, argtypes in build.SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    assert lib.lm_kernel_simd() == 0 and lib.lm_kernel_abi() == build.ABI
    monkeypatch.setattr(kernels, "load", lambda: lib)
    return lib


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_portable_build_equals_dequantize_then_matmul(portable_kernels, group_size):
    """The plain C fallback of each kernel reads the same layouts: the same checks as the vector
    build's (groups per row not a multiple of 4 included: 384 / 128 = 3)."""
    w, x, bias = _weight(37, 384, seed=8), _x(3, 384), torch.randn(37)
    t4 = int4_quantize(w, group_size)
    y4 = kernels.int4_matmul(x, kernels.pack_int4(t4.packed, t4.scale, t4.zero, group_size), bias)
    _check(y4, kernels.quantize_activations(x), int4_dequantize(t4), bias)
    t8 = int8_quantize(w)
    _check(
        kernels.int8_matmul(x, kernels.pack_int8(t8.q, t8.scale)),
        kernels.quantize_activations(x),
        int8_dequantize(t8),
    )
    _check(kernels.bf16_matmul(x, kernels.pack_bf16(w)), x, w.to(torch.bfloat16).float())


# ---- QuantLinear: which path runs ---------------------------------------------------------------
def _quant_linear(method: str, group_size: int | None, out_features: int = 72) -> QuantLinear:
    lin = nn.Linear(256, out_features, bias=True)
    with torch.no_grad():
        lin.weight.copy_(_weight(out_features, 256, seed=5))
        lin.bias.normal_(0, 0.2)
    return QuantLinear.from_linear(lin, QuantScheme.make(method, group_size))


@needs_kernels
@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 32), ("int4", 128)])
def test_quant_linear_uses_our_kernel_for_every_batch(method, group_size):
    q = _quant_linear(method, group_size, out_features=70)  # not a multiple of 16: PyTorch's int4 refuses
    x = _x(3, 256).reshape(1, 3, 256)
    with torch.no_grad():
        y = q(x)
    assert q._own is not None  # the small batch went through our kernel
    rows = x.reshape(3, 256)
    _check(y.reshape(3, -1), kernels.quantize_activations(rows), q.dequantize(), q.bias)
    # a large batch (prefill) too: the same product, row by row
    big = _x(64, 256)
    with torch.no_grad():
        _check(q(big), kernels.quantize_activations(big), q.dequantize(), q.bias)
    # a bfloat16 model: the kernel computes in float32 and returns bfloat16
    with torch.no_grad():
        yb = q(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and (yb.float() - y).abs().max() <= y.abs().max() * 2**-6


@pytest.fixture
def fresh_load():
    build.load.cache_clear()
    yield
    build.load.cache_clear()


@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 64)])
def test_disabled_kernels_fall_back_to_pytorch(monkeypatch, fresh_load, method, group_size):
    monkeypatch.setenv("LMSTACK_KERNELS", "0")
    assert not kernels.available()
    q = _quant_linear(method, group_size, out_features=64)
    x = _x(1, 256)
    with torch.no_grad():
        y, ref = q(x), q.reference_forward(x)
    assert q._own is None and q._packed is not None  # PyTorch's packed kernel ran
    assert (y - ref).abs().max() <= ref.abs().max() * 2**-6


def test_a_failing_compiler_falls_back_with_a_warning(monkeypatch, fresh_load, tmp_path):
    if not build.supported_cpu():
        pytest.skip("no AVX-512 VNNI here: the kernels are never built")
    monkeypatch.delenv("LMSTACK_KERNELS", raising=False)  # the suite may run with the kernels off
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="building the quantized CPU kernels failed"):
        assert build.load() is None
    assert not any((tmp_path / "kernels").glob("*.so"))  # nothing half-built is left to load later
    q = _quant_linear("int8", None)
    x = _x(1, 256)
    with torch.no_grad():
        ref = q.reference_forward(x)
        assert (q(x) - ref).abs().max() <= ref.abs().max() * 2**-6


@needs_kernels
@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 32)])
def test_quantized_model_decodes_through_our_kernels(method, group_size):
    """Greedy decoding of a quantized model against its dequantised float twin (head rounded to
    bfloat16). Our kernels round activations to int8 per 32 inputs: on this deliberately
    large-weight model that moves the logits by ~4% of their largest magnitude (PyTorch's bfloat16
    activations: ~1.6%); we allow 5%."""
    config = ModelConfig(family="llama", vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=256, max_seq_len=64)  # fmt: skip
    model = build_model(config, seed=0).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    quantized = quantize(model, method, group_size=group_size)
    twin = build_model(config, seed=0).eval()
    state = {
        k: v
        for k, v in quantized.state_dict().items()
        if k.split(".")[-1] not in ("qweight", "scales", "zeros")
    }
    for name, m in quantized.named_modules():
        if isinstance(m, QuantLinear):
            state[f"{name}.weight"] = m.dequantize()
            if m.bias is not None:
                state[f"{name}.bias"] = m.bias
    twin.load_state_dict(state)
    # the quantized model's float head multiplies by its bfloat16 copy at decode (DecodeHead)
    twin.lm_head.weight = nn.Parameter(twin.lm_head.weight.detach().to(torch.bfloat16).float())
    prompt = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ours = generate(quantized, prompt, max_new_tokens=6, stop_ids=())
        tail = torch.tensor([list(ours[0])[-6:]])  # 6 rows: within our kernels' batch size
        logits_ours, logits_ref = quantized(tail), twin(tail)
    # o and down through our kernel; q, k, v and gate, up through one fused call each
    for block in quantized.blocks:
        assert block.attn.o._own is not None and block.mlp.down._own is not None
        assert isinstance(block.attn.fused_qkv, FusedQuant) and block.attn.fused_qkv._packed is not None
        assert isinstance(block.mlp.fused_gate_up, FusedQuant) and block.mlp.fused_gate_up._packed is not None
    bound = 5e-2 * logits_ref.abs().max()
    assert (logits_ours - logits_ref).abs().max() <= bound
    # our top-1 token is the reference's, or one within the error bound of it (a near tie)
    chosen = logits_ref.gather(-1, logits_ours.argmax(-1, keepdim=True)).squeeze(-1)
    assert (chosen >= logits_ref.amax(-1) - 2 * bound).all()


# ---- the bfloat16 head ----------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("shape", [(1, 16), (13, 100), (1000, 96)])
@pytest.mark.parametrize("rows", [1, 5])
def test_bf16_equals_rounded_weight_matmul(shape, rows):
    w, x = _weight(*shape, seed=7), _x(rows, shape[1])
    _check(kernels.bf16_matmul(x, kernels.pack_bf16(w)), x, w.to(torch.bfloat16).float())


def _tied_model():
    config = ModelConfig(family="llama", vocab_size=300, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1,
                         d_ff=128, max_seq_len=32, tie_embeddings=True)  # fmt: skip
    return build_model(config, seed=0).eval()


@needs_kernels
def test_quantized_model_head_decodes_in_bf16_and_stays_tied(tmp_path):
    from lmstack.interop.hf import from_pretrained, save_pretrained

    float_model = _tied_model()
    keys = set(float_model.state_dict())
    model = quantize(float_model, "int8")
    head = model.lm_head
    assert isinstance(head, DecodeHead) and head.weight is model.tok_emb.weight
    state = model.state_dict()  # the copy is never saved, and a tied head is stored once, as before
    assert "lm_head.weight" not in state and not any("_copy" in k for k in state)
    assert {k for k in keys if not k.startswith("blocks.")} <= set(state)
    h = _x(3, 64)
    with torch.no_grad():
        y = head(h)
        _check(y, h, head.weight.detach().to(torch.bfloat16).float())
        big = _x(20, 64)  # prefill-sized: the float32 weight
        assert torch.equal(head(big), big @ head.weight.t())
        # a changed weight is seen at once: the copy is keyed by the tensor's version
        model.tok_emb.weight.mul_(2)
        _check(head(h), h, head.weight.detach().to(torch.bfloat16).float())
    save_pretrained(model, tmp_path / "q")
    loaded = from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert isinstance(loaded.lm_head, DecodeHead) and loaded.lm_head.weight is loaded.tok_emb.weight
    with torch.no_grad():
        assert torch.equal(loaded.lm_head(h), head(h))


@needs_kernels
@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 64)])
def test_fused_products_equal_the_separate_ones(method, group_size):
    config = ModelConfig(family="llama", vocab_size=64, d_model=128, n_layers=1, n_heads=4, n_kv_heads=2,
                         d_ff=192, max_seq_len=32, qkv_bias=True)  # fmt: skip
    model = quantize(build_model(config, seed=0).eval(), method, group_size=group_size)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    x = _x(2, 128).reshape(1, 2, 128)
    with torch.no_grad():
        qkv = attn.fused_qkv(x)
        gate_up = mlp.fused_gate_up(x)
        separate_qkv = torch.cat([attn.q(x), attn.k(x), attn.v(x)], -1)
        separate_gate_up = torch.cat([mlp.gate(x), mlp.up(x)], -1)
        # each row of the stack is computed as by its own module: equal to the last bit
        assert torch.equal(qkv, separate_qkv) and torch.equal(gate_up, separate_gate_up)
        # prefill-sized batches through the stack too
        big = _x(40, 128)
        assert torch.equal(attn.fused_qkv(big), torch.cat([attn.q(big), attn.k(big), attn.v(big)], -1))
        # the stacked copy follows the modules' tensors: written in place, or replaced
        attn.v.scales.mul_(2)
        attn.k.bias = nn.Parameter(torch.randn(attn.k.out_features), requires_grad=False)
        attn.q.load_state_dict(
            {k: v * 1 if k != "qweight" else v.flip(0) for k, v in attn.q.state_dict().items()}
        )
        changed = attn.fused_qkv(x)
        assert not torch.equal(changed, qkv)
        assert torch.equal(changed, torch.cat([attn.q(x), attn.k(x), attn.v(x)], -1))
    # a replaced projection (a LoRA wrapper, say) is no longer served by the fused product
    assert attn.fused_qkv.serves(attn.q, attn.k, attn.v)
    attn.k = nn.Identity()
    assert not attn.fused_qkv.serves(attn.q, attn.k, attn.v)


# ---- the integer weights resident once ----------------------------------------------------------
def _storages(obj, seen: dict[int, int], depth: int = 0) -> None:
    """Every tensor storage reachable from `obj` (modules, their attributes, packed copies), by address."""
    if depth > 12:
        return
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    elif isinstance(obj, nn.Module):
        for value in obj.__dict__.values():
            _storages(value, seen, depth + 1)
    elif isinstance(obj, dict):
        for value in obj.values():
            _storages(value, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _storages(value, seen, depth + 1)
    elif dataclasses.is_dataclass(obj) or isinstance(obj, FusedQuant):
        _storages(vars(obj), seen, depth + 1)


def _quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the quantized layers' tensors as saved, bytes reachable from those layers and the
    fused products), the latter without the float parts (bias)."""
    saved = sum(
        t.numel() * t.element_size()
        for name, t in model.state_dict().items()
        if name.rsplit(".", 1)[-1] in ("qweight", "scales", "zeros")
    )
    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            _storages({k: v for k, v in vars(module).items() if k != "_parameters"}, seen)
        for value in vars(module).values():
            if isinstance(value, FusedQuant) and value._packed is not None:
                _storages(value._packed[1], seen)
    return saved, sum(seen.values())


@needs_kernels
@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 32), ("int4", 128)])
def test_decoding_keeps_the_integer_weights_once(tmp_path, method, group_size):
    """After decoding, a quantized layer's integers live in our kernel's copy only (the fused q,k,v and
    gate,up stacks holding the modules' copies as views): what its layers reach is the saved bytes
    plus padding, not twice them. The saved tensors come back exactly: the state dict, a save, the
    dequantised matrix, and attribute access are as before decoding."""
    from lmstack.interop.hf import from_pretrained, save_pretrained

    # widths with a multiple of 4 groups of 128, so the kernel's scales need no padding
    config = ModelConfig(family="llama", vocab_size=256, d_model=512, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=1024, max_seq_len=64, qkv_bias=True)  # fmt: skip
    model = quantize(build_model(config, seed=0).eval(), method, group_size=group_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dequantized = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    saved, resident = _quantized_bytes(model)
    assert resident == saved  # nothing packed yet
    prompt = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ours = generate(model, prompt, max_new_tokens=5, stop_ids=())
        logits = model(prompt)
    saved_after, resident = _quantized_bytes(model)
    assert saved_after == saved
    assert resident <= 1.05 * saved, (resident, saved)  # was ~2x: buffers + packed copy + stacks
    for block in model.blocks:
        assert "qweight" not in block.attn.o._buffers and block.attn.fused_qkv._packed is not None
        stack = block.attn.fused_qkv._packed[1].weight
        for m in (block.attn.q, block.attn.k, block.attn.v):  # views into the stack
            assert m._own.weight.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.dequantize(), dequantized[n])
    save_pretrained(model, tmp_path / "q")
    loaded = from_pretrained(tmp_path / "q", dtype=torch.float32)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert generate(loaded, prompt, max_new_tokens=5, stop_ids=()) == ours
        assert torch.equal(loaded(prompt), logits)
        # an access from outside puts a layer's buffers back, exactly; the next call lets them go again
        o = model.blocks[0].attn.o
        assert torch.equal(o.qweight, before["blocks.0.attn.o.qweight"]) and "qweight" in o._buffers
        assert torch.equal(model(prompt), logits) and "qweight" not in o._buffers


@needs_kernels
def test_released_weights_follow_writes_moves_and_loads():
    q = _quant_linear("int4", 64)
    x = _x(2, 256)
    with torch.no_grad():
        y = q(x)
        assert q._released  # the kernel's copy is the only one
        q.scales.mul_(2)  # put back, then written in place: the next call repacks
        assert torch.allclose(q(x) - q.bias, 2 * (y - q.bias), rtol=1e-5, atol=1e-5)
        state = {k: v.clone() for k, v in q.state_dict().items()}
        q(x)
        fresh = _quant_linear("int4", 64)
        fresh.load_state_dict(state)
        assert torch.equal(fresh(x), q(x))
        # a move to another dtype starts from the exact buffers
        half = q.to(torch.bfloat16)
        assert half.scales.dtype == torch.bfloat16 and torch.equal(half.qweight, state["qweight"])
        assert torch.equal(half(x.bfloat16()), fresh.to(torch.bfloat16)(x.bfloat16()))


@needs_kernels
def test_scales_the_kernel_would_round_stay_held():
    """A checkpoint whose int4 scales are not bfloat16 values (an older quantizer): the kernel
    multiplies by them rounded, and the exact ones stay held; the codes and zeros are let go."""
    q = _quant_linear("int4", 32)
    with torch.no_grad():
        q.scales.mul_(1 + 2**-12)
        exact = q.scales.clone()
        q(_x(1, 256))
    assert set(q._released) == {"qweight", "zeros"} and torch.equal(q._buffers["scales"], exact)
    assert torch.equal(q.state_dict()["scales"], exact)
