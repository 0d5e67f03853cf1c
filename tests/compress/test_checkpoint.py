"""Quantized checkpoints: saved with the scheme in config.json, loaded by every loader like any other."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from lmstack.cli import main
from lmstack.compress import QuantLinear, quantization_config, quantize
from lmstack.config import ModelConfig
from lmstack.errors import InputError
from lmstack.infer import generate
from lmstack.interop.folders import load_model_and_tokenizer
from lmstack.interop.hf import from_pretrained, save_pretrained
from lmstack.model import build_model
from lmstack.tokenizer import Tokenizer

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20


def _model(config: ModelConfig, std: float = 0.2):
    model = build_model(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.reset_parameters(std)
    return model.eval()


LLAMA = ModelConfig(family="llama", vocab_size=320, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                    max_seq_len=64, qkv_bias=True, out_bias=True, tie_embeddings=False)  # fmt: skip
GPT2 = dataclasses.replace(ModelConfig.preset("gpt2"), vocab_size=320, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4,
                           d_ff=512, head_dim=32, max_seq_len=64, bos_id=None, eos_id=None, pad_id=None)  # fmt: skip
MIXTRAL = dataclasses.replace(
    LLAMA, family="mixtral", n_experts=4, n_experts_per_token=2, qkv_bias=False, out_bias=False
)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT], 300, special_tokens=["<|endoftext|>"])


@pytest.mark.parametrize("config", [LLAMA, GPT2, MIXTRAL], ids=["llama", "gpt2", "mixtral"])
@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 32), ("nf4", 64)])
def test_round_trip_is_exact(tmp_path, config, method, group_size):
    _check_round_trip(tmp_path, quantize(_model(config), method, group_size=group_size))


@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 32)])
def test_round_trip_of_a_quantized_tied_head(tmp_path, method, group_size):
    """GPT-2's head is tied: with include_head it is saved quantized beside the float embedding and
    loads back untied, although config.json still records tied embeddings."""
    model = quantize(_model(GPT2), method, group_size=group_size, include_head=True)
    assert GPT2.tie_embeddings and isinstance(model.lm_head, QuantLinear)
    loaded = _check_round_trip(tmp_path, model)
    assert isinstance(loaded.lm_head, QuantLinear)
    assert not torch.equal(loaded.lm_head.dequantize(torch.float32), loaded.tok_emb.weight)


def test_round_trip_of_a_head_in_its_own_scheme(tmp_path):
    """int4 blocks with an int8 head (llama.cpp's Q4_0 files keep an 8-bit head): config.json records
    the head's scheme and the loader rebuilds it."""
    model = quantize(_model(GPT2), "int4", group_size=32, include_head="int8")
    record = quantization_config(model)
    assert record["scheme"] == "int4" and record["head"] == {"scheme": "int8", "bits": 8, "group_size": None}
    assert model.lm_head.scheme.method == "int8" and model.blocks[0].attn.q.scheme.method == "int4"
    loaded = _check_round_trip(tmp_path, model)
    assert loaded.lm_head.scheme == model.lm_head.scheme
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"] == record


def _check_round_trip(tmp_path, model):
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    save_pretrained(model, tmp_path / "q")
    loaded = from_pretrained(tmp_path / "q")
    assert [n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)] == [
        n for n, m in model.named_modules() if isinstance(m, QuantLinear)
    ]
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    return loaded


def test_folder_layout(tmp_path):
    model = quantize(_model(LLAMA), "int4", group_size=64)
    save_pretrained(model, tmp_path / "q")
    record = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in record.items() if k != "modules"} == {
        "quant_method": "lmstack", "scheme": "int4", "bits": 4, "group_size": 64
    }  # fmt: skip
    assert len(record["modules"]) == 2 * 7 and record["modules"][0] == "blocks.0.attn.q"
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        q = "model.layers.0.self_attn.q_proj"
        assert {f"{q}.qweight", f"{q}.scales", f"{q}.zeros", f"{q}.bias"} <= names
        assert f"{q}.weight" not in names and "lm_head.weight" in names
        assert f.get_tensor(f"{q}.qweight").dtype == torch.uint8
        assert f.get_tensor(f"{q}.qweight").shape == (128, 64) and f.get_tensor(f"{q}.scales").shape == (
            128,
            2,
        )
    # a quantized checkpoint is smaller: 4-bit codes + one scale and zero per 64 weights
    float_dir = save_pretrained(_model(LLAMA), tmp_path / "f")
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < 0.6 * (
        float_dir / "model.safetensors"
    ).stat().st_size


def test_load_in_bfloat16_keeps_integer_tensors(tmp_path):
    save_pretrained(quantize(_model(LLAMA), "int8"), tmp_path / "q")
    model = from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    q = model.blocks[0].attn.q
    assert (
        q.qweight.dtype == torch.int8 and q.scales.dtype == torch.bfloat16 and model.dtype == torch.bfloat16
    )
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_foreign_quantization_config_is_refused(tmp_path):
    save_pretrained(quantize(_model(LLAMA), "int8"), tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    raw = json.loads(path.read_text())
    raw["quantization_config"]["quant_method"] = "gptq"
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match="quant_method 'gptq', which lmstack cannot load"):
        from_pretrained(tmp_path / "q")


def test_generate_on_a_loaded_quantized_folder(tmp_path, tokenizer):
    """Greedy generation with the KV cache agrees with full recomputation, on the quantized model
    `load_model_and_tokenizer` returns. The two paths multiply differently (a cached step's few rows
    through our kernels, which round activations to int8 per 32 inputs; a long recomputation through
    PyTorch's, which round them to bfloat16), so each generated token must be the recomputation's
    top-1 or a near tie: within 5% of the largest |logit| of it (the kernels' error on such
    large-weight models is ~4%, see test_kernels), recomputed on the generated prefix."""
    save_pretrained(quantize(_model(LLAMA), "int4", group_size=32), tmp_path / "q", tokenizer=tokenizer)
    model, tok = load_model_and_tokenizer(tmp_path / "q")
    prompt = tok.encode_ordinary("To be, or not")
    new = generate(model, [prompt], max_new_tokens=10, stop_ids=())[0]
    assert len(new) == 10
    ties = 0
    with torch.no_grad():
        for i, token in enumerate(new):
            logits = model(torch.tensor([prompt + new[:i]]))[0, -1]
            top = int(logits.argmax())
            assert logits[token] >= logits[top] - 5e-2 * logits.abs().max(), (i, token, top)
            ties += token != top
    assert ties <= 2  # a near tie is rare; most steps agree exactly


def test_cli_quantize(tmp_path, tokenizer, capsys):
    save_pretrained(_model(LLAMA), tmp_path / "float", tokenizer=tokenizer)
    out = tmp_path / "int8"
    assert main(["quantize", "--model", str(tmp_path / "float"), "--method", "int8", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scheme"] == "int8" and summary["quantized_modules"] == 14
    assert summary["size_bytes"] < summary["source_bytes"]
    model, _ = load_model_and_tokenizer(out)
    assert isinstance(model.blocks[1].mlp.down, QuantLinear)
    for flag, head in [(["--include-head"], "int4"), (["--include-head", "int8"], "int8")]:
        argv = ["--model", str(tmp_path / "float"), "--method", "int4", "--group-size", "32"]
        assert main(["quantize", *argv, *flag, "--out", str(tmp_path / f"int4-{head}-head")]) == 0
        assert json.loads(capsys.readouterr().out)["quantized_modules"] == 15
        model, _ = load_model_and_tokenizer(tmp_path / f"int4-{head}-head")
        assert model.lm_head.scheme.method == head and model.blocks[0].attn.q.scheme.method == "int4"
    for argv, message in [
        (["--model", str(out), "--method", "int4", "--out", str(tmp_path / "x")], "already quantized (int8)"),
        (["--model", str(tmp_path / "float"), "--method", "int4", "--group-size", "48", "--out", str(tmp_path / "x")],
         "int4 group size 48 is not supported — use one of 32, 64, 128"),
        (["--model", str(tmp_path / "float"), "--method", "int8", "--out", str(tmp_path / "float")],
         "is the input checkpoint"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            main(["quantize", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("lmstack: error:") and message in err
        assert err.count("\n") == 1
