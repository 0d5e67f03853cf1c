"""Several EOS ids (Llama 3 instruct ends replies with <|eot_id|>, documents with <|end_of_text|>): a folder
whose generation_config.json lists them keeps all, and generation and the Engine stop at any of them, as
`transformers` does."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.errors import InputError
from lmstack.infer import Engine, SamplingParams, generate
from lmstack.interop.hf import from_pretrained, save_pretrained

PROMPT = [5, 17, 33, 8, 61, 2]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A `transformers` Llama saved by `transformers` (no lmstack block) and its free greedy run."""
    from .conftest import build_pair

    hf, _ = build_pair("llama", eos_id=None, seed=1)
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, eos_token_id=None)
    return hf, folder, out[0, len(PROMPT) :].tolist()


def _with_eos(folder, eos) -> None:
    path = folder / "generation_config.json"
    gen = json.loads(path.read_text())
    gen["eos_token_id"] = eos
    path.write_text(json.dumps(gen))


def test_generation_stops_at_each_listed_eos_id(hf_folder):
    hf, folder, free = hf_folder
    firsts = [i for i, t in enumerate(free) if t not in free[:i]]  # where each id first appears
    early, late = firsts[2], firsts[-1]
    unused = next(t for t in range(97) if t not in free)
    # (listed ids, where generation must stop): the primary id first, then a later-listed one
    for eos, stop_at in (
        ([free[late], unused], late),
        ([unused, free[early]], early),
        ([free[late], free[early]], early),
    ):
        _with_eos(folder, eos)
        model = from_pretrained(folder, dtype=torch.float64)
        assert model.config.eos_ids == tuple(eos)
        expected = free[: stop_at + 1]
        got = generate(model, [PROMPT], max_new_tokens=16, details=True)[0]
        assert got.tokens == expected and got.finish_reason == "stop", eos
        engine = Engine(model, max_batch=1, kv_blocks=16, block_size=4)
        assert engine.run([PROMPT], SamplingParams(max_new_tokens=16))[0].tokens == expected
        with torch.no_grad():  # transformers reads the same list and stops at the same place
            ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, eos_token_id=eos)
        assert ref[0, len(PROMPT) :].tolist() == expected


def test_several_eos_ids_round_trip_through_our_folder(hf_folder, tmp_path):
    import transformers as tf

    _, folder, free = hf_folder
    _with_eos(folder, [free[0], 3, 4])
    model = from_pretrained(folder, dtype=torch.float64)
    assert model.config.eos_id == free[0] and model.config.extra_eos_ids == (3, 4)
    saved = save_pretrained(model, tmp_path / "ours")
    assert from_pretrained(saved).config == model.config
    assert json.loads((saved / "generation_config.json").read_text())["eos_token_id"] == [free[0], 3, 4]
    assert tf.GenerationConfig.from_pretrained(saved).eos_token_id == [free[0], 3, 4]
    assert tf.AutoConfig.from_pretrained(saved).eos_token_id == [free[0], 3, 4]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(extra_eos_ids=(3,)), r"extra_eos_ids: are set but eos_id is None — set eos_id"),
        (dict(eos_id=2, extra_eos_ids=(3, 2)), r"extra_eos_ids: repeat an id"),
        (dict(eos_id=2, extra_eos_ids=(3, 3)), r"extra_eos_ids: repeat an id"),
        (dict(eos_id=2, extra_eos_ids=(97,)), r"extra_eos_ids: must be token ids in \[0, 97\)"),
        (dict(eos_id=2, extra_eos_ids=("3",)), r"extra_eos_ids: must be token ids"),
    ],
)
def test_extra_eos_ids_are_validated(fields, message):
    base = dict(vocab_size=97, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=64)
    with pytest.raises(InputError, match=message):
        ModelConfig(**base, **fields)
    assert ModelConfig(**base, eos_id=2, extra_eos_ids=[5, 9]).eos_ids == (2, 5, 9)  # a JSON list is fine
    assert ModelConfig(**base).eos_ids == ()
