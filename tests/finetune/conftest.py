"""Fine-tuning fixtures: a tiny base model (a 400-id BPE on the embedded corpus, random weights large
enough that logits are O(1-10)) saved as a checkpoint folder without a chat template, and small
JSONL files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

TINY = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "max_seq_len": 256}


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmstack.config import ModelConfig
    from lmstack.data.corpus import default_corpus
    from lmstack.interop.hf import save_pretrained
    from lmstack.model import build_model
    from lmstack.tokenizer import Tokenizer

    docs = []
    for text in default_corpus():
        docs.append(text)
        if sum(map(len, docs)) > 60_000:
            break
    docs += [f"applicant {n} asks for {n * 37} over {n % 5 + 1} years" for n in range(200)]
    tok = Tokenizer.train(docs, 400, special_tokens=["<|endoftext|>"], eos_token="<|endoftext|>")
    config = dataclasses.replace(
        ModelConfig.preset("tiny"), **TINY, head_dim=16, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
        tie_embeddings=False,
    )  # fmt: skip
    model = build_model(config, seed=0)
    model.reset_parameters(std=0.2)
    folder = tmp_path_factory.mktemp("base") / "model"
    save_pretrained(model, folder, tokenizer=tok)
    return folder


def random_adapters(model: torch.nn.Module, seed: int = 4, scale: float = 0.2) -> None:
    """Training-like adapters: B non-zero (std `scale`), DoRA magnitudes moved off the row norms, so
    the adapters change the output."""
    from lmstack.finetune.lora import LoraLinear

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLinear):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
                if layer.lora_magnitude is not None:
                    layer.lora_magnitude.mul_(1 + 0.2 * torch.rand(layer.lora_magnitude.shape, generator=g))


@pytest.fixture(name="random_adapters", scope="session")
def _random_adapters():
    return random_adapters


def hf_llama_pair(folder: Path, *, vocab: int = 97, tied: bool = False):
    """(lmstack model, transformers Llama) with the same random weights (std 0.2, logits O(1-10)),
    the transformers one saved in `folder` and loaded from there by lmstack."""
    import transformers

    import lmstack

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(folder)
    return lmstack.from_pretrained(folder), hf


@pytest.fixture(name="hf_llama_pair", scope="session")
def _hf_llama_pair():
    return hf_llama_pair


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(name="write_jsonl")
def _write_jsonl():
    return write_jsonl


@pytest.fixture
def sft_file(tmp_path: Path) -> Path:
    rows = []
    for n in range(24):
        if n % 3 == 0:
            rows.append({"messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": f"Is {n} even?"},
                {"role": "assistant", "content": "yes" if n % 2 == 0 else "no"},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": "Certain."},
            ]})  # fmt: skip
        else:
            rows.append({"prompt": f"Add {n} and {n + 1}.", "response": f"The sum is {2 * n + 1}."})
    return write_jsonl(tmp_path / "sft.jsonl", rows)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
