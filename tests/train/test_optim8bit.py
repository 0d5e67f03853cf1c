"""8-bit AdamW: its quantisation map and block-wise codes against bitsandbytes, its trajectory against
fp32 AdamW (torch) and bitsandbytes' AdamW8bit, its state size, and an exact resume through safetensors."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from torch import nn

from lmstack.train.optim import load_optimizer_tensors, optimizer_tensors
from lmstack.train.optim8bit import (
    AdamW8bit,
    build_optimizer_8bit,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
    state_bytes,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is fastest, and on a shared machine two contend badly (15× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Least squares with a 96×128 weight (12,288 elements: 6 blocks of 2048) plus a small bias."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(128, 96)
    with torch.no_grad():
        model.weight.copy_(torch.randn(96, 128, generator=g) * 0.2)
        model.bias.zero_()
    x = torch.randn(256, 128, generator=g)
    y = x @ (torch.randn(128, 96, generator=g) * 0.3) + 0.1 * torch.randn(256, 96, generator=g)
    return model, x, y


def run(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int
) -> list[float]:
    losses = []
    for i in range(steps):
        batch = slice((i * 32) % 256, (i * 32) % 256 + 32)  # minibatches: noisy gradients, as in training
        loss = (model(x[batch]) - y[batch]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_dynamic_map_matches_bitsandbytes() -> None:
    F = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        ours = dynamic_map(signed=signed)
        assert ours.shape == (256,) and torch.all(ours[1:] > ours[:-1])  # sorted, no repeats
        torch.testing.assert_close(ours, F.create_dynamic_map(signed=signed), rtol=0, atol=0)


def test_quantize_blockwise_matches_bitsandbytes() -> None:
    F = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g) * torch.logspace(-6, 0, 5000)  # many decades, a ragged last block
    qmap = dynamic_map(signed=True)
    codes, absmax = quantize_blockwise(x, qmap, block_size=2048)
    theirs, state = F.quantize_blockwise(x, code=qmap, blocksize=2048)
    torch.testing.assert_close(absmax, state.absmax, rtol=0, atol=0)
    # ours rounds to the nearest map value; bitsandbytes' CPU lookup tree is nearest for almost all
    # values and a neighbour for a few small ones, so: ours is never further, and codes mostly agree
    normed = x / absmax.repeat_interleave(2048)[:5000]
    ours_err, their_err = (qmap[codes.long()] - normed).abs(), (qmap[theirs.long()] - normed).abs()
    assert torch.all(ours_err <= their_err)
    assert (codes == theirs).float().mean() > 0.97
    back = dequantize_blockwise(codes, absmax, qmap, block_size=2048)
    same = codes == theirs
    torch.testing.assert_close(back[same], F.dequantize_blockwise(theirs, state)[same], rtol=0, atol=0)
    # the dynamic map keeps relative error bounded across decades, where linear int8 loses small values
    rel = (back - x).abs() / x.abs()
    linear = torch.round(normed * 127) / 127 * absmax.repeat_interleave(2048)[:5000]
    linear_rel = (linear - x).abs() / x.abs()
    top, mid = normed.abs() >= 0.1, (normed.abs() >= 1e-3) & (normed.abs() < 0.1)
    assert rel[top].max() < 0.075 and rel[mid].max() < 0.3  # 64 fraction values per sign at the top
    assert linear_rel[mid].max() > 0.9


def test_tracks_fp32_adamw() -> None:
    model, x, y = problem()
    ref = copy.deepcopy(model)
    ours = AdamW8bit(model.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
    got, want = run(model, ours, x, y, 100), run(ref, torch_opt, x, y, 100)
    assert want[-1] < 0.2 * want[0]  # the problem is learned
    # the stated tolerance: final loss within 2%, weights within 1% (relative norm) after 100 steps
    # (measured: 0.9% and 0.34%)
    assert abs(got[-1] - want[-1]) / want[-1] < 0.02
    rel = (model.weight - ref.weight).norm() / ref.weight.norm()
    assert rel < 0.01
    assert "exp_avg_codes" in ours.state[model.weight] and "exp_avg" in ours.state[model.bias]


def test_matches_bitsandbytes_adamw8bit() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model, x, y = problem()
    ref = copy.deepcopy(model)
    # bitsandbytes' CPU optimizer uses blocks of 256; with the same block size the two are one algorithm
    ours = AdamW8bit(model.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1, block_size=256)
    theirs = bnb.optim.AdamW8bit(ref.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
    fp32 = copy.deepcopy(model)
    run(model, ours, x, y, 30)
    run(ref, theirs, x, y, 30)
    run(fp32, torch.optim.AdamW(fp32.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1), x, y, 30)

    def dist(a: nn.Module, b: nn.Module) -> float:
        return ((a.weight - b.weight).norm() / b.weight.norm()).item()

    # measured: ours-bnb 0.006, each of them to fp32 AdamW 0.016 (the quantisation noise they share)
    assert dist(model, ref) < 0.5 * dist(ref, fp32)
    assert dist(model, fp32) < 1.1 * dist(ref, fp32)


def test_state_is_a_quarter_of_adamw() -> None:
    model, x, y = problem()
    ref = copy.deepcopy(model)
    ours = AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    run(model, ours, x, y, 1)
    run(ref, torch_opt, x, y, 1)
    ratio = state_bytes(ours) / state_bytes(torch_opt)
    # 2 bytes of codes + 2 fp32 absmax per 2048 elements, against 8 bytes (+ the step counters)
    assert 0.25 <= ratio < 0.26


def test_resume_through_safetensors_is_exact(tmp_path) -> None:
    model, x, y = problem()
    opt = build_optimizer_8bit(model, lr=3e-2, weight_decay=0.1)
    run(model, opt, x, y, 10)
    tensors, meta = optimizer_tensors(opt)
    assert {t.dtype for t in tensors.values()} == {torch.uint8, torch.float32}
    safetensors.torch.save_file(tensors, tmp_path / "optim.safetensors")
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer_8bit(resumed_model, lr=3e-2, weight_decay=0.1)
    load_optimizer_tensors(resumed, safetensors.torch.load_file(tmp_path / "optim.safetensors"), meta)
    assert resumed.state[resumed_model.weight]["exp_avg_codes"].dtype == torch.uint8
    a = run(model, opt, x, y, 10)
    b = run(resumed_model, resumed, x, y, 10)
    assert a == b
    assert torch.equal(model.weight, resumed_model.weight) and torch.equal(model.bias, resumed_model.bias)


def test_bf16_parameters_keep_fp32_state() -> None:
    model, x, y = problem()
    model = model.to(torch.bfloat16)
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    run(model, opt, x.bfloat16(), y.bfloat16(), 2)
    sd = opt.state_dict()
    fresh = AdamW8bit(model.parameters(), lr=1e-2)
    fresh.load_state_dict(sd)
    state = fresh.state[model.weight]
    assert state["exp_avg_absmax"].dtype == torch.float32 and state["exp_avg_codes"].dtype == torch.uint8
    assert fresh.state[model.bias]["exp_avg"].dtype == torch.float32


def test_chunked_update_equals_one_pass(monkeypatch) -> None:
    """The step dequantises a few blocks at a time to bound its fp32 working set; blocks are independent,
    so any chunk size gives bit-identical weights and state (here with a short last block)."""
    import lmstack.train.optim8bit as optim8bit

    monkeypatch.setattr(optim8bit, "_kernel", lambda: None)  # the PyTorch version chunks; the fused one never

    def train(chunk_blocks: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setattr(optim8bit, "CHUNK_BLOCKS", chunk_blocks)
        g = torch.Generator().manual_seed(0)
        p = nn.Parameter(torch.randn(37, 300, generator=g))
        opt = AdamW8bit([p], lr=1e-2, weight_decay=0.1, block_size=256, min_8bit_size=0)
        for _ in range(4):
            p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return p.detach(), opt.state[p]

    (p1, s1), (p2, s2) = train(1), train(10_000)
    assert torch.equal(p1, p2)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def _steps(fused: bool, monkeypatch, block_size: int, weight_decay: float) -> tuple[torch.Tensor, dict]:
    import lmstack.train.optim8bit as optim8bit

    if not fused:
        monkeypatch.setattr(optim8bit, "_kernel", lambda: None)
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(61, 300, generator=g) * 0.2)  # 18,300: a short last block
    opt = AdamW8bit([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=weight_decay, block_size=block_size)
    for i in range(5):
        p.grad = torch.randn(p.shape, generator=g) * 10.0 ** (-i)  # shrinking: moments span decades
        opt.step()
    monkeypatch.undo()
    return p.detach(), opt.state[p]


@pytest.mark.parametrize("block_size, weight_decay", [(2048, 0.1), (256, 0.0)])
def test_fused_step_matches_pytorch_operations(monkeypatch, block_size, weight_decay) -> None:
    """The compiled step (adamw8bit.c) against the PyTorch version: the same codes and absmax bit for
    bit (so the code table's quantisation is bucketize's), the same weights but for PyTorch's
    vectorised sqrt, which is not correctly rounded (one unit in the last place of a denominator)."""
    import lmstack.train.optim8bit as optim8bit

    if optim8bit._kernel() is None:
        pytest.skip("no C compiler here (or LMSTACK_KERNELS=0): only the PyTorch version runs")
    (p1, s1), (p2, s2) = (
        _steps(True, monkeypatch, block_size, weight_decay),
        _steps(False, monkeypatch, block_size, weight_decay),
    )
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-8)  # lr 1e-2 × a few ulps, over 5 steps
    assert (p1 == p2).float().mean() > 0.95


def test_code_table_starts_at_or_below_the_code() -> None:
    """The fused quantisation starts at the table's code and steps up: exact only if the table never
    overshoots. Every float32 in [-1, 1] whose low 16 bits are all ones or zeros (the two ends of
    each table entry's range) checked against bucketize."""
    from lmstack.train.optim8bit import code_table

    for signed in (True, False):
        qmap = dynamic_map(signed=signed)
        mids, table = code_table(qmap)
        prefix = torch.arange(1 << 16, dtype=torch.int64)
        for low in (0, 0xFFFF):
            x = ((prefix << 16) | low).to(torch.int32).view(torch.float32)
            keep = x.abs() <= 1
            exact = torch.bucketize(x[keep], mids)
            start = table[prefix[keep]].long()
            assert (start <= exact).all()
            assert (exact - start).max() <= 2  # a comparison or two after the lookup


def test_kernels_off_selects_pytorch(monkeypatch) -> None:
    from pathlib import Path

    from lmstack.compress.kernels.build import load_source

    monkeypatch.setenv("LMSTACK_KERNELS", "0")
    source = Path(__file__).parents[2] / "src" / "lmstack" / "train" / "adamw8bit.c"
    assert load_source.__wrapped__(source) is None
