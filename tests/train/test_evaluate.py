"""Sliding-window perplexity against a one-window-at-a-time reference, and `lmstack eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmstack.cli import main
from lmstack.config import ModelConfig
from lmstack.errors import InputError
from lmstack.model import build_model
from lmstack.train import evaluate
from lmstack.train.evaluate import sliding_window_nll, sliding_windows

CONFIG = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16, eos_id=511)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    net = build_model(CONFIG, seed=0)
    net.reset_parameters(0.2)  # sharp: logits O(1-10), so a token's context changes its loss
    return net.eval()


@pytest.mark.parametrize(
    "n, seq_len, stride", [(40, 16, 8), (40, 16, 16), (41, 16, 5), (10, 16, 3), (16, 16, 1)]
)
def test_windows_score_every_target_once_with_enough_context(n, seq_len, stride):
    scored = []
    for begin, end, first in sliding_windows(n, seq_len, stride):
        assert end - begin <= seq_len and begin <= first < end
        if begin > 0:
            assert (
                first - begin >= seq_len - stride
            )  # every later target sees at least seq_len - stride tokens
        scored += range(first, end)
    assert scored == list(range(n))


def test_stride_larger_than_window_is_refused():
    with pytest.raises(InputError, match="stride 20 must lie in 1..16"):
        list(sliding_windows(50, 16, 20))


def _reference_nll(model, ids, seq_len, stride):
    """One window per forward pass, targets scored when first seen: the transformers guide's loop."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + seq_len, len(ids) - 1)
        x = torch.tensor([ids[begin:end]])
        y = torch.tensor(ids[begin + 1 : end + 1])
        logits = model(x)[0]
        new = end - prev_end
        total += F.cross_entropy(logits[-new:], y[-new:], reduction="sum").item()
        count += new
        prev_end = end
        if end == len(ids) - 1:
            break
    return total, count


@pytest.mark.parametrize("stride", [16, 8, 3])
def test_batched_sliding_window_matches_reference(model, stride):
    ids = torch.randint(0, 511, (75,), generator=torch.Generator().manual_seed(1)).tolist()
    got = sliding_window_nll(model, ids, seq_len=16, stride=stride, batch_size=3)
    want = _reference_nll(model, ids, 16, stride)
    assert got[1] == want[1] == 74
    assert got[0] == pytest.approx(want[0], rel=1e-5)


def test_full_context_window_equals_one_forward(model):
    ids = torch.randint(0, 511, (16,), generator=torch.Generator().manual_seed(2)).tolist()
    nll, count = sliding_window_nll(model, ids, seq_len=16, stride=4)
    logits = model(torch.tensor([ids[:-1]]))[0]
    assert count == 15
    assert nll == pytest.approx(
        F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item(), rel=1e-5
    )
    # less context can only change the answer: a sharp model notices
    short, _ = sliding_window_nll(model, ids, seq_len=4, stride=4)
    assert abs(short - nll) > 1e-3


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    from lmstack.interop.hf import save_pretrained
    from lmstack.tokenizer import Tokenizer

    tok = Tokenizer.load(dataset / "tokenizer")
    config = ModelConfig(
        vocab_size=tok.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        max_seq_len=32,
        eos_id=tok.eos_id,
    )
    net = build_model(config, seed=0)
    net.reset_parameters(0.2)
    return save_pretrained(net, tmp_path_factory.mktemp("ckpt") / "model", tokenizer=tok), tok, net


def test_evaluate_text_file_perplexity_and_bits_per_byte(checkpoint, tmp_path, capsys):
    folder, tok, net = checkpoint
    text = "Return a new list containing all items from the iterable in ascending order.\n" * 4
    path = tmp_path / "held_out.txt"
    path.write_text(text, encoding="utf-8")
    result = evaluate(folder, path, stride=8)
    ids = [tok.eos_id] + tok.encode_ordinary(text)  # documents follow EOS, as in training
    nll, count = _reference_nll(net.eval(), ids, 32, 8)
    assert result.tokens == count == len(ids) - 1 and result.seq_len == 32 and result.stride == 8
    assert result.loss == pytest.approx(nll / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nll / (math.log(2) * len(text.encode())), rel=1e-5)

    assert main(["eval", "--model", str(folder), "--data", str(path), "--stride", "8", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["bits_per_byte"] == pytest.approx(result.bits_per_byte)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"\x00\x01\x02binary", "looks binary"), (b"caf\xe9", "not UTF-8")],
)
def test_eval_bad_data_is_one_line_exit_2(checkpoint, tmp_path, capsys, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(checkpoint[0]), "--data", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lmstack: error:") and message in err and err.count("\n") == 1


def test_eval_model_must_be_checkpoint_or_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "x.txt")])
    assert "neither a checkpoint folder" in capsys.readouterr().err
