"""Fine-tuning arithmetic: trainable counts equal what `apply_lora` builds, optimizer state equals what the
optimizers hold, and `lmstack calc --adapter ... --optimizer ...` reports `finetune_memory`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmstack.arith import activation_bytes, count_params, weights_bytes
from lmstack.arith.memory import (
    finetune_memory,
    lora_params,
    optimizer_state_bytes_per_param,
    resolve_lora_targets,
    training_bytes_per_param,
)
from lmstack.cli import main
from lmstack.config import ModelConfig
from lmstack.errors import InputError
from lmstack.finetune.lora import LoraConfig, apply_lora, trainable_parameters
from lmstack.model import build_model
from lmstack.train.optim8bit import AdamW8bit, state_bytes

SMALL = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=160, max_seq_len=64)
CONFIGS = {
    "dense-gqa": ModelConfig(**SMALL, n_kv_heads=2),
    "moe": ModelConfig(**SMALL, n_kv_heads=2, n_experts=4, n_experts_per_token=2),
    "untied": ModelConfig(**SMALL, tie_embeddings=False),
    "llama2-7b": ModelConfig.preset("llama2-7b"),
    "mixtral-8x7b": ModelConfig.preset("mixtral-8x7b"),
}


def linear_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
    "targets", [("gate", "up", "down"), ("q", "v"), ("q", "k", "v", "o", "down"), "all-linear"]
)
@pytest.mark.parametrize("dora", [False, True])
def test_trainable_params_equal_apply_lora_on_the_meta_model(name, targets, dora) -> None:
    config = CONFIGS[name]
    model = build_model(config, device="meta")
    names = linear_names(model)
    needed = set(resolve_lora_targets(config, targets))
    if not needed <= names:
        # Until the model names its attention projections q, k, v, o (today: fused attn.qkv and attn.out),
        # these targets cannot be matched by name; "all-linear" would adapt the fused matrices instead.
        pytest.skip(f"the model has no linear layers named {sorted(needed - names)} (it has {sorted(names)})")
    apply_lora(model, LoraConfig(r=8, alpha=16, targets=targets, use_dora=dora))
    assert trainable_parameters(model) == lora_params(config, 8, targets, dora=dora)


@pytest.mark.parametrize("name", ["dense-gqa", "untied"])
def test_trainable_token_rows_count_like_apply_token_rows(name, capsys) -> None:
    """The ChatML rows `finetune` trains beside LoRA: k·d on a tied model, 2·k·d untied (embedding + head)."""
    from lmstack.finetune.tokens import apply_token_rows

    config = CONFIGS[name]
    model = apply_lora(build_model(config, seed=0), LoraConfig(r=8, alpha=16, targets="all-linear"))
    apply_token_rows(model, [config.vocab_size - 2, config.vocab_size - 1])
    predicted = finetune_memory(config, rank=8, targets="all-linear", trainable_tokens=2)
    assert trainable_parameters(model) == predicted["trainable_params"]
    assert predicted["trainable_params"] - lora_params(config, 8, "all-linear") == 2 * 64 * (
        1 if config.tie_embeddings else 2
    )
    main(["calc", "llama2-7b", "--json", "--trainable-tokens", "2", "--lora-targets", "all-linear"])
    reported = json.loads(capsys.readouterr().out)["memory"]["finetune"]["trainable_params"]
    assert reported == 39_976_960 + 2 * 4096 * 2  # Llama-2's head is untied


def test_workbook_figures() -> None:
    """QLoRA on every linear layer of Llama-2-7B at r=16: PEFT prints "trainable params: 39,976,960 ||
    all params: 6,778,392,576"; the NF4 base is 4.127 bits per block weight."""
    llama = CONFIGS["llama2-7b"]
    m = finetune_memory(llama, adapter="qlora", rank=16, targets="all-linear", optimizer="adamw8bit")
    assert m["trainable_params"] == 39_976_960
    assert count_params(llama).total + m["trainable_params"] == 6_778_392_576
    assert m["base_weights_bytes"] == weights_bytes(llama, "nf4")
    assert m["optimizer_state_bytes"] == 39_976_960 * (2 + 8 / 2048)
    assert m["trained_weights_and_gradients_bytes"] == 39_976_960 * 8
    lora = finetune_memory(llama, adapter="lora", rank=16, targets="all-linear", optimizer="adamw8bit")
    assert lora["base_weights_bytes"] == weights_bytes(llama, "bf16")
    assert lora["total_bytes"] - m["total_bytes"] == weights_bytes(llama, "bf16") - weights_bytes(
        llama, "nf4"
    )


def test_full_finetune_is_the_training_state() -> None:
    config = CONFIGS["llama2-7b"]
    for optimizer in ("adamw", "adamw8bit"):
        m = finetune_memory(config, adapter="none", optimizer=optimizer, batch=2, context=512)
        state = m["trained_weights_and_gradients_bytes"] + m["optimizer_state_bytes"]
        n = count_params(config).total
        assert state == pytest.approx(n * training_bytes_per_param(optimizer), rel=1e-3)


def test_dora_adds_one_magnitude_per_output_row() -> None:
    config = CONFIGS["dense-gqa"]
    c = config
    extra = lora_params(config, 4, ("q", "v"), dora=True) - lora_params(config, 4, ("q", "v"))
    assert extra == c.n_layers * (c.q_dim + c.kv_dim)
    dora = finetune_memory(config, adapter="dora", rank=4, batch=2, context=16)
    lora = finetune_memory(config, adapter="lora", rank=4, batch=2, context=16)
    assert dora["activations_bytes"] > lora["activations_bytes"] > 0


def _toy_lora_model() -> nn.Module:
    """q and v of 64 × 64 at r=32: every adapter tensor is exactly one 2048-element block."""
    model = nn.Module()
    model.q, model.v = nn.Linear(64, 64), nn.Linear(64, 64)
    return apply_lora(model, LoraConfig(r=32, targets=("q", "v")))


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_optimizer_state_matches_the_optimizers(optimizer) -> None:
    model = _toy_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW8bit(params, min_8bit_size=0) if optimizer == "adamw8bit" else torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    opt.step()
    steps = 4 * len(params)  # one fp32 step counter per tensor, which the per-parameter figure leaves out
    n = trainable_parameters(model)
    assert state_bytes(opt) - steps == n * optimizer_state_bytes_per_param(optimizer)


def test_errors() -> None:
    config = CONFIGS["dense-gqa"]
    with pytest.raises(InputError, match="router"):
        lora_params(config, 8, ("router",))  # a dense model has no router
    with pytest.raises(InputError, match="unknown adapter"):
        finetune_memory(config, adapter="prefix")
    with pytest.raises(InputError, match="unknown optimizer"):
        finetune_memory(config, optimizer="lion")


def test_calc_cli(capsys) -> None:
    argv = ["calc", "llama2-7b", "--json", "--context", "1024", "--adapter", "qlora"]
    argv += ["--lora-targets", "all-linear", "--optimizer", "adamw8bit", "--lora-rank", "16"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)["memory"]["finetune"]
    want = finetune_memory(
        CONFIGS["llama2-7b"],
        adapter="qlora",
        rank=16,
        targets="all-linear",
        optimizer="adamw8bit",
        context=1024,
    )
    assert got == json.loads(json.dumps(want))
    assert (
        main(["calc", "llama2-7b", "--json", "--context", "1024", "--dtype", "fp32", "--adapter", "lora"])
        == 0
    )
    got = json.loads(capsys.readouterr().out)["memory"]["finetune"]
    want = finetune_memory(CONFIGS["llama2-7b"], adapter="lora", rank=16, context=1024, precision="fp32")
    assert got == json.loads(json.dumps(want))
    assert main(["calc", "mixtral-8x7b", "--adapter", "dora", "--lora-targets", "q,v,router"]) == 0
    assert "fine-tune (dora r=16 on q,v,router" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["calc", "llama2-7b", "--lora-targets", "q,router"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmstack: error: bad LoRA targets ['router']") and "\n" not in err


def test_fp32_precision_counts_four_byte_weights_gradients_and_activations() -> None:
    config = CONFIGS["dense-gqa"]
    p = count_params(config)
    b, s, v = 2, 32, config.vocab_size
    full = finetune_memory(config, adapter="none", batch=b, context=s, precision="fp32")
    assert full["trained_weights_and_gradients_bytes"] == 8 * p.total  # fp32 weight + gradient, no master
    lora = finetune_memory(config, adapter="lora", batch=b, context=s, precision="fp32")
    assert lora["base_weights_bytes"] == weights_bytes(config, "fp32")
    q32, q16 = (finetune_memory(config, adapter="qlora", precision=x) for x in ("fp32", "bf16"))
    assert q32["base_weights_bytes"] - q16["base_weights_bytes"] == 2 * (p.total - p.quantisable)
    # every activation doubles except the logits, which the loss reads in fp32 either way
    assert (
        activation_bytes(config, b, s, element_bytes=4) - 2 * activation_bytes(config, b, s) == -4 * b * s * v
    )
    assert lora["loss_peak_bytes"] == 2 * 4 * b * s * v
    with pytest.raises(InputError, match="unknown precision"):
        finetune_memory(config, precision="int8")


def _saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters excluded, shared storage once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(seen.values())


@pytest.mark.parametrize("targets", [("q", "v"), "all-linear"])
def test_adapter_activations_equal_what_autograd_saves(targets) -> None:
    """What an adapter adds to the activations, measured on lmstack's fp32 model: LoRA keeps A·x (r per
    token) for each adapted matrix, so doubling r adds exactly that; DoRA also keeps its d_out-wide
    direction W x + sBA x (and a few d_out-sized vectors, the factor m/‖W + sBA‖, left out). The total
    stays under the prediction, whose base part is the full model's (frozen layers keep less)."""
    config = CONFIGS["dense-gqa"]
    b, s = 2, 32
    ids = torch.randint(0, config.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))

    def saved(adapter: str, r: int) -> int:
        model = build_model(config, seed=0).train()
        apply_lora(model, LoraConfig(r=r, alpha=2 * r, targets=targets, use_dora=adapter == "dora"))
        return _saved_bytes(model, ids)

    def predicted(adapter: str, r: int) -> int:
        m = finetune_memory(
            config, adapter=adapter, rank=r, targets=targets, batch=b, context=s, precision="fp32"
        )
        return m["activations_bytes"]

    lora4, lora8, dora4 = saved("lora", 4), saved("lora", 8), saved("dora", 4)
    assert lora8 - lora4 == predicted("lora", 8) - predicted("lora", 4)
    vectors = dora4 - lora4 - (predicted("dora", 4) - predicted("lora", 4))
    c, picked = config, resolve_lora_targets(config, targets)
    d_out = {
        "q": c.q_dim,
        "k": c.kv_dim,
        "v": c.kv_dim,
        "o": c.d_model,
        "gate": c.d_ff,
        "up": c.d_ff,
        "down": c.d_model,
    }
    assert 0 <= vectors <= 4 * 4 * c.n_layers * sum(d_out[t] for t in picked)
    assert dora4 <= predicted("dora", 4) and lora8 <= predicted("lora", 8)
