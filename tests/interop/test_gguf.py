"""GGUF export/import: round trips through our own reader, the Q4_K_M mix, the CLI and its errors, and
real llama.cpp (`llama-cpp-python`) loading what we write.

The models are tiny lmstack Llama, Qwen2 and GPT-2 models (std 0.2 weights, so logits are O(1-10)) with
a tokenizer lmstack trains on a frozen copy of the repository's README. Widths are multiples of 256 (K-quants) except
d_ff = 352, whose ffn_down rows take llama.cpp's fallback types. llama.cpp tests skip when `llama_cpp`
is not installed, except under CI=true, where the test extra installs it and they must run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack.cli import main
from lmstack.config import ModelConfig
from lmstack.errors import InputError
from lmstack.interop.gguf import (
    export_gguf,
    export_ollama,
    gguf_summary,
    import_gguf,
    permute_rope,
    tensor_type,
    unpermute_rope,
)
from lmstack.interop.hf import from_pretrained, hf_state_dict, save_pretrained
from lmstack.model import build_model
from lmstack.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

# A frozen copy of an earlier README: a fixed corpus, so that editing the README cannot move what is tested
README = Path(__file__).resolve().parent / "data" / "gguf_corpus.md"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _texts() -> tuple[str, str]:
    text = README.read_text(encoding="utf-8")
    cut = len(text) * 3 // 4
    return text[:cut], text[cut:]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    train, _ = _texts()
    tok = Tokenizer.train(
        [train], 380, pattern="gpt2", special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        eos_token="<|endoftext|>",
    )  # fmt: skip
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def held_out() -> str:
    return _texts()[1][:1500]


def _model(family: str, vocab: int) -> torch.nn.Module:
    if family == "gpt2":
        config = ModelConfig(
            family="gpt2", vocab_size=vocab, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=352,
            max_seq_len=256, norm="layernorm", mlp="gelu_tanh", position="learned", qkv_bias=True,
            out_bias=True, mlp_bias=True, tie_embeddings=True,
        )  # fmt: skip
    else:
        config = ModelConfig(
            family=family, vocab_size=vocab, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=352,
            max_seq_len=256, norm_eps=1e-5, qkv_bias=family == "qwen2", rope_theta=10000.0,
        )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            else:  # norms near 1, biases near 0, both perturbed so a wrong mapping shows
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(family, tokenizer, tmp_path_factory) -> Path:
    """An lmstack checkpoint folder of the family, with the trained tokenizer."""
    model = _model(family, tokenizer.vocab_size)
    return save_pretrained(model, tmp_path_factory.mktemp(family) / "ckpt", tokenizer=tokenizer)


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


# ---- without llama.cpp ---------------------------------------------------------------------------
def test_rope_permutation_round_trips_and_interleaves():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of 8 rows
    p = permute_rope(w, 2)
    assert torch.equal(unpermute_rope(p, 2), w)
    # within a head, HF row j (first half) and j + 4 (second half) become neighbours 2j, 2j + 1
    assert torch.equal(p[0:2], w[[0, 4]]) and torch.equal(p[8:10], w[[8, 12]])


# relative RMS error of an imported weight matrix vs the source, per file type
WEIGHT_TOLERANCE = {"f16": 1e-3, "q8_0": 0.01, "q4_0": 0.15, "q4_k_m": 0.12}


@pytest.mark.parametrize("file_type", ["f32", "f16", "q8_0", "q4_0", "q4_k_m"])
def test_export_import_round_trip(folder, family, tmp_path, file_type):
    """GGUF -> import: f32 gives the source logits exactly; quantised types give every weight back within
    its format's error (never exactly, so nothing silently stayed float), and the tokenizer unchanged."""
    model = from_pretrained(folder)
    tokenizer = Tokenizer.load(folder)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", file_type)
    out = import_gguf(path, tmp_path / "imported")
    back = from_pretrained(out)
    ids = tokenizer.encode("The model, its tokenizer and the chat template round-trip.")
    if file_type == "f32":
        assert torch.equal(_logits(model, ids), _logits(back, ids))
    else:
        source, imported = hf_state_dict(model), hf_state_dict(back)
        assert source.keys() == imported.keys()
        for name, w in source.items():
            rel = float((imported[name] - w).pow(2).mean().sqrt() / w.std())
            if w.dim() == 2 and "wpe" not in name:
                assert 0 < rel < WEIGHT_TOLERANCE[file_type], name
            else:  # norms, biases and learned positions stay float32
                assert rel == 0, name
    imported_tok = Tokenizer.load(out)
    text = README.read_text(encoding="utf-8")[:800]
    assert imported_tok.encode(text) == tokenizer.encode(text)
    assert imported_tok.chat_template == CHATML and imported_tok.eos_id == tokenizer.eos_id


def test_q4_k_m_mix_follows_llama_cpp(folder, family, tmp_path):
    model = from_pretrained(folder)
    types = gguf_summary(export_gguf(model, Tokenizer.load(folder), tmp_path / "m.gguf", "q4_k_m"))[
        "tensor_types"
    ]
    assert types["blk.0.ffn_down.weight"] == "Q5_0"  # Q4_K falls back: 352 is not a multiple of 256
    assert types["blk.1.ffn_down.weight"] == "Q8_0"  # Q6_K (last layer) falls back
    assert types["output_norm.weight"] == "F32"
    if family == "gpt2":
        assert types["token_embd.weight"] == "Q6_K"  # tied head: the embedding is the output
        assert types["blk.0.attn_qkv.weight"] == "Q4_K" and types["blk.1.attn_qkv.weight"] == "Q6_K"
        assert types["position_embd.weight"] == "F32"
        assert types["blk.0.ffn_up.weight"] == "Q4_K"
    else:
        assert types["token_embd.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
        assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.1.attn_v.weight"] == "Q6_K"
        assert types["blk.0.ffn_gate.weight"] == "Q4_K"


def test_use_more_bits_layers_match_llama_cpp_rule():
    # 32 layers: llama.cpp gives Q6_K to attn_v in layers 0-3, 28-31 and every third from 6
    q6 = [
        i
        for i in range(32)
        if tensor_type(f"blk.{i}.attn_v.weight", (1024, 4096), "q4_k_m", 32, True) == "Q6_K"
    ]
    assert q6 == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert tensor_type("output.weight", (100, 4096), "q4_0", 32, True) == "Q6_K"
    assert tensor_type("output.weight", (100, 4096), "q8_0", 32, True) == "Q8_0"
    assert tensor_type("blk.0.ffn_up.weight", (8, 48), "q4_0", 32, True) == "F16"  # not a multiple of 32


def test_cli_export_import_and_ollama(folder, tmp_path, capsys):
    gguf_path = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--model", str(folder), "--type", "q8_0", "--out", str(gguf_path)]) == 0
    assert gguf_summary(gguf_path)["file_type"] == 7
    assert main(["import", "gguf", str(gguf_path), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "config.json").is_file()
    assert main(["export", "ollama", "--model", str(folder), "--out", str(tmp_path / "ollama")]) == 0
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n")
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert "PARAMETER temperature 0.1" in modelfile
    assert (tmp_path / "ollama" / "model.gguf").stat().st_size > 0


def test_plain_template_and_untranslatable_one(tokenizer, tmp_path):
    model = _model("llama", tokenizer.vocab_size)
    plain = Tokenizer.train(["some text " * 50], 260, pattern="gpt2", special_tokens=["<|endoftext|>"])
    modelfile = (
        export_ollama(_model("llama", plain.vocab_size), plain, tmp_path / "plain", "f16") / "Modelfile"
    )
    assert "{{ .Role }}: {{ .Content }}" in modelfile.read_text()
    odd = Tokenizer.train(["some text " * 50], 260, pattern="gpt2")
    odd.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    with pytest.raises(InputError, match="cannot translate it to an Ollama TEMPLATE"):
        export_ollama(model, odd, tmp_path / "odd")


def _fail(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmstack: error: ") and "\n" not in err and " — " in err
    return err


def test_bad_input_one_line_errors(folder, tokenizer, tmp_path, capsys):
    assert "no such GGUF file" in _fail(
        ["import", "gguf", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "x")], capsys
    )
    good = export_gguf(from_pretrained(folder), tokenizer, tmp_path / "good.gguf", "f16")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated or corrupt" in _fail(["import", "gguf", str(cut), "--out", str(tmp_path / "y")], capsys)
    assert "model folder not found" in _fail(["export", "gguf", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "z.gguf")], capsys)  # fmt: skip
    custom = Tokenizer.train(["some text " * 50], 260, pattern=r"\w+|\s+|[^\w\s]+")
    with pytest.raises(InputError, match="pre-tokenizer regex is not one llama.cpp knows"):
        export_gguf(_model("llama", custom.vocab_size), custom, tmp_path / "c.gguf")
    with pytest.raises(InputError, match="GGUF type 'q3_k' is not supported"):
        export_gguf(from_pretrained(folder), tokenizer, tmp_path / "t.gguf", "q3_k")
    phi = build_model(
        ModelConfig(
            family="phi3", vocab_size=tokenizer.vocab_size, d_model=64, n_layers=1, n_heads=4, d_ff=128
        )
    )
    with pytest.raises(InputError, match="'phi3' architecture is not supported"):
        export_gguf(phi, tokenizer, tmp_path / "p.gguf")
    assert not (tmp_path / "p.gguf").exists() and not (tmp_path / "p.gguf.tmp").exists()


def _foreign_gguf(path: Path, arch: str, qtype: str) -> Path:
    """A minimal GGUF another tool might write: one embedding tensor of `qtype` (zero bytes)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("gpt2")
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    data = np.zeros((8, 256 // block * nbytes), dtype=np.uint8)
    writer.add_tensor(
        "token_embd.weight", data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType[qtype]
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_gguf_and_quantized_model_one_line_errors(folder, tmp_path, capsys):
    mamba = _foreign_gguf(tmp_path / "mamba.gguf", "mamba", "F32")
    err = _fail(["import", "gguf", str(mamba), "--out", str(tmp_path / "a")], capsys)
    assert "GGUF architecture 'mamba' is not supported — import one of llama, qwen2, gpt2" in err
    q2 = _foreign_gguf(tmp_path / "q2.gguf", "llama", "Q2_K")
    err = _fail(["import", "gguf", str(q2), "--out", str(tmp_path / "b")], capsys)
    assert "tensor token_embd.weight is Q2_K, which lmstack cannot decode" in err
    bare = _foreign_gguf(tmp_path / "bare.gguf", "llama", "F32")  # no hyper-parameters
    err = _fail(["import", "gguf", str(bare), "--out", str(tmp_path / "c")], capsys)
    assert "GGUF metadata lacks llama.block_count, llama.embedding_length" in err
    int8 = tmp_path / "int8"
    assert main(["quantize", "--model", str(folder), "--method", "int8", "--out", str(int8)]) == 0
    capsys.readouterr()
    err = _fail(
        ["export", "gguf", "--model", str(int8), "--type", "q8_0", "--out", str(tmp_path / "q.gguf")], capsys
    )
    assert "the model is already quantized" in err and "export its float checkpoint" in err
    assert not (tmp_path / "q.gguf").exists()


# ---- real llama.cpp ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("llama_cpp is not importable under CI — install the test extra (llama-cpp-python)")
        pytest.skip("llama_cpp is not installed — pip install llama-cpp-python to run the llama.cpp tests")
    # llama.cpp 0.3.36 repacks Q4_0/Q8_0/K-quant weights at load for its AMX kernels, and on AMX CPUs the
    # first decode segfaults inside ggml_backend_amx_mul_mat — for files llama.cpp's own quantizer wrote
    # from our F32 file too, and not for F32/F16 files, which it does not repack: llama.cpp's bug, not
    # our files'. The plain CPU kernels are what we compare with.
    default_params = llama_cpp.llama_model_default_params

    def without_repacking():
        params = default_params()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp.llama.llama_cpp, "llama_model_default_params", without_repacking)
        yield llama_cpp


def _llama(llama_cpp, path: Path):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False)


def _cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def _cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def _our_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_logits(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


# llama.cpp's logits vs ours on held-out text: relative RMS error and top-1 agreement. The reference for
# a quantised file is our model imported from that same file (its dequantised weights): llama.cpp then
# differs only by its arithmetic (it rounds activations to 8 bits for quantised dot products, keeps the
# KV cache in f16). Random std-0.2 models amplify weight noise, so quantised-vs-float32 drift is a
# property of the model, not of the file, and is not what these tests measure.
# Top-1 agreement is counted where the reference's top-1 leads its runner-up by >= MARGIN logits: a random
# model has many near-ties that any 8-bit activation rounding flips.
CPP_TOLERANCE = {"f32": (0.01, 0.98), "f16": (0.02, 0.98), "q8_0": (0.1, 0.95), "q4_0": (0.12, 0.95), "q4_k_m": (0.12, 0.95)}  # fmt: skip
MARGIN = 0.5


@pytest.mark.parametrize("file_type", list(CPP_TOLERANCE))
def test_llama_cpp_runs_our_gguf(llama_cpp, folder, family, held_out, tmp_path, file_type):
    model = from_pretrained(folder)
    tokenizer = Tokenizer.load(folder)
    path = export_gguf(model, tokenizer, tmp_path / f"{family}-{file_type}.gguf", file_type)
    llm = _llama(llama_cpp, path)
    ids = tokenizer.encode_ordinary(held_out)[:200]
    assert llm.tokenize(held_out.encode(), add_bos=False, special=False)[:200] == ids
    reference = model if file_type in ("f32", "f16") else from_pretrained(import_gguf(path, tmp_path / "deq"))
    ref, got = _logits(reference, ids), _cpp_logits(llm, ids)
    max_rel, min_top1 = CPP_TOLERANCE[file_type]
    rel = float((got - ref).pow(2).mean().sqrt() / ref.std())
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) >= (MARGIN if file_type not in ("f32", "f16") else 0)
    assert clear.float().mean() > 0.3, float(
        clear.float().mean()
    )  # enough clear winners: the check has teeth
    top1 = float((got.argmax(-1) == ref.argmax(-1))[clear].float().mean())
    assert rel < max_rel and top1 >= min_top1, f"{family} {file_type}: rel {rel:.4f}, top-1 {top1:.3f}"
    if file_type in ("f32", "f16"):
        prompt = ids[:16]
        assert _cpp_greedy(llm, prompt, 24) == _our_greedy(model, prompt, 24)


def test_our_q4_k_m_file_matches_llama_cpp_quantize(llama_cpp, folder, family, tmp_path):
    """llama.cpp's own quantizer, run on our F32 file, picks the same type for every tensor and writes
    the same bytes, K-quants included."""
    import ctypes

    model = from_pretrained(folder)
    tokenizer = Tokenizer.load(folder)
    f32 = export_gguf(model, tokenizer, tmp_path / "f32.gguf", "f32")
    ours = export_gguf(model, tokenizer, tmp_path / "ours.gguf", "q4_k_m")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = 15, 2  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    read = lambda p: {t.name: t for t in gguf.GGUFReader(str(p)).tensors}
    a, b = read(ours), read(theirs)
    mix_a = {n: t.tensor_type.name for n, t in a.items()}
    mix_b = {n: t.tensor_type.name for n, t in b.items()}
    assert mix_a == mix_b, {
        n: (mix_a.get(n), mix_b.get(n)) for n in mix_a.keys() | mix_b.keys() if mix_a.get(n) != mix_b.get(n)
    }
    assert {"Q4_K", "Q6_K"} <= set(mix_b.values())
    for name, t in b.items():
        mine, ref = np.asarray(a[name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)
        assert np.array_equal(mine, ref), (name, t.tensor_type.name)
