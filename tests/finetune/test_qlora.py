"""QLoRA: the base stored in NF4 (codes equal `nf4_quantize`'s, step 0 equals the decoded base, no
float copy kept for backward, bytes as `lmstack calc` predicts), training moves only the adapters,
a run resumes exactly and merges into the decoded base, bad bases are refused, and the same model
under PEFT on bitsandbytes' `Linear4bit` gives the same logits."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmstack.cli import main
from lmstack.compress.linear import QuantLinear, QuantScheme
from lmstack.compress.swap import swap
from lmstack.errors import InputError
from lmstack.finetune.adapters import hf_module_names, load_peft_folder, load_with_adapter
from lmstack.finetune.lora import (
    LoraConfig,
    LoraLinear,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from lmstack.finetune.qlora import (
    BASE_QUANTIZATION,
    BNB_CONFIG,
    NF4Linear,
    QLoraLinear,
    apply_qlora,
    merge_qlora,
    nf4_layers,
    quantize_base,
)
from lmstack.finetune.run import FinetuneConfig, finetune
from lmstack.finetune.tokens import TokenHead
from lmstack.interop.folders import load_model_and_tokenizer
from lmstack.interop.hf import save_pretrained
from lmstack.quant import nf4_dequantize, nf4_quantize
from lmstack.train import TrainHooks
from lmstack.train.metrics import read_metrics


def float_linears(model: nn.Module) -> dict[str, nn.Linear]:
    # TokenHead: an LM head whose new (ChatML) rows train beside the adapters, still a float layer
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, LoraLinear, TokenHead)}


def nf4_rounded(model: nn.Module) -> nn.Module:
    """The reference: a float copy whose linear weights (all but lm_head) are dequant(nf4_quantize(W))."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, linear in float_linears(ref).items():
            if name != "lm_head":
                linear.weight.copy_(nf4_dequantize(nf4_quantize(linear.weight), linear.weight.dtype))
    return ref


def ids(vocab: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 14), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def base(base_dir) -> nn.Module:
    return load_model_and_tokenizer(base_dir, dtype=torch.float32)[0].eval()


def odd_width_model() -> nn.Module:
    """Widths that are not multiples of 64 (d_model 48, d_ff 50): blocks cross rows, the last is short."""
    from lmstack.config import ModelConfig
    from lmstack.model import build_model

    config = dataclasses.replace(
        ModelConfig.preset("tiny"), d_model=48, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=12, d_ff=50,
        vocab_size=61, tie_embeddings=False,
    )  # fmt: skip
    model = build_model(config, seed=0)
    model.reset_parameters(std=0.2)
    return model.eval()


@pytest.mark.parametrize("which", ["base", "odd widths", "dora"])
def test_codes_equal_nf4_quantize_and_step_0_equals_the_nf4_base(base, which) -> None:
    model = odd_width_model() if which == "odd widths" else base
    assert which != "odd widths" or any(m.weight.numel() % 64 for m in float_linears(model).values())
    qlora = apply_qlora(
        copy.deepcopy(model), LoraConfig(r=4, alpha=8, targets="q,v", use_dora=which == "dora")
    )
    originals = float_linears(model)
    layers = nf4_layers(qlora)
    assert {n.removesuffix(".base_layer") for n in layers} == set(originals) - {"lm_head"}
    assert list(float_linears(qlora)) == ["lm_head"]  # every other float matrix is gone
    assert all(isinstance(qlora.get_submodule(f"blocks.0.attn.{t}"), QLoraLinear) for t in "qv")
    assert isinstance(qlora.get_submodule("blocks.0.attn.k"), NF4Linear)
    for name, layer in layers.items():
        want = nf4_quantize(originals[name.removesuffix(".base_layer")].weight)
        assert torch.equal(layer.qweight, want.packed) and torch.equal(layer.scales, want.absmax)
        assert (
            torch.equal(layer.absmax_scale, want.absmax_scale) and layer.absmax_offset.item() == want.offset
        )
    x = ids(model.config.vocab_size)
    with torch.no_grad():
        got, reference, unquantized = qlora(x), nf4_rounded(model)(x), model(x)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    assert (got - unquantized).abs().max() > 1e-2  # NF4 really changes the model


def test_training_moves_only_the_adapters(base) -> None:
    qlora = apply_qlora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets="all-linear")).train()
    before = {k: v.clone() for k, v in qlora.state_dict().items()}
    trained = [p for p in qlora.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    x = ids(base.config.vocab_size)
    losses = []
    for _ in range(5):
        logits = qlora(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        # the input gradient flows through the frozen NF4 layers down to the first block's adapter
        assert qlora.blocks[0].attn.q.lora_B.grad.abs().max() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    after = qlora.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert {k for k in changed if k.endswith("lora_B")} == {k for k in before if k.endswith("lora_B")}


def test_backward_keeps_no_float_copy_of_the_base(base) -> None:
    """Autograd saves only activations and the adapters' own tensors: no decoded (d_out, d_in) matrix
    survives the forward. A plain `QuantLinear` swap (decode, then F.linear) would keep one per layer."""
    shapes = {tuple(m.weight.shape) for n, m in float_linears(base).items() if n != "lm_head"}

    def saved_matrices(model: nn.Module) -> int:
        params = {p.data_ptr() for p in model.parameters()}
        found = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 2 and tuple(t.shape) in shapes and t.data_ptr() not in params:
                found.append(tuple(t.shape))
            return t

        x = ids(base.config.vocab_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum().backward()
        return len(found)

    assert saved_matrices(apply_qlora(copy.deepcopy(base), LoraConfig(r=4, alpha=8))) == 0
    plain = swap(copy.deepcopy(base), QuantScheme.make("nf4"))
    plain.tok_emb.weight.requires_grad_(True)  # so that the inputs of the quantized layers need gradients
    assert saved_matrices(plain) >= len(shapes)


def test_bytes_and_trainable_parameters_equal_lmstack_calc(base_dir, capsys) -> None:
    """With the rest of the model in bf16 (calc's convention), the QLoRA model's bytes minus the
    adapters equal calc's NF4 base bytes (up to each layer's rounded-up constants); the float
    matrices are freed; the trainable count is calc's."""
    assert main(["calc", str(base_dir), "--json", "--adapter", "qlora", "--lora-rank", "4", "--lora-targets", "all-linear"]) == 0  # fmt: skip
    predicted = json.loads(capsys.readouterr().out)["memory"]["finetune"]
    model = load_model_and_tokenizer(base_dir, dtype=torch.bfloat16)[0]
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    released = [weakref.ref(m.weight) for n, m in float_linears(model).items() if n != "lm_head"]
    apply_qlora(model, LoraConfig(r=4, alpha=16, targets="all-linear"))
    gc.collect()
    assert all(r() is None for r in released)  # no reference to a float base matrix survives
    assert trainable_parameters(model) == predicted["trainable_params"]
    storages = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if ".lora_" not in name:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    measured = sum(storages.values())
    assert measured == pytest.approx(predicted["base_weights_bytes"], rel=2e-3)
    assert measured < 0.6 * float_bytes  # embeddings and head stay 16-bit in this tiny model


def config(base: Path, data: Path, out: Path, **changes) -> FinetuneConfig:
    kw = dict(
        model=str(base), out=str(out), data=str(data), adapter="qlora", lora_targets="all-linear", max_steps=6,
        optimizer="adamw8bit", batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=2, seq_len=96,
        eval_interval=3, checkpoint_interval=2, threads=1, progress=False,
    )  # fmt: skip
    return FinetuneConfig(**{**kw, **changes})


class Crash(Exception):
    pass


def test_qlora_run_with_8bit_adamw_resumes_exactly_and_merges_into_the_nf4_base(
    base_dir, sft_file, tmp_path, capsys
) -> None:
    seen = {}

    def inspect(step: int, model: nn.Module) -> None:
        seen.setdefault("floats", list(float_linears(model)))
        seen.setdefault("nf4", len(nf4_layers(model)))

    whole = finetune(config(base_dir, sft_file, tmp_path / "whole"), hooks=TrainHooks(on_step_start=inspect))
    assert seen["floats"] == ["lm_head"] and seen["nf4"] == 2 * 7  # the loop trains the NF4 model
    records = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    adapter = whole.adapter
    assert json.loads((adapter / BASE_QUANTIZATION).read_text()) == BNB_CONFIG
    start = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    saved = json.loads((tmp_path / "whole" / "finetune_config.json").read_text())
    assert saved["base"]["path"] == str(base_dir) and len(saved["base"]["sha256"]) == 64

    def crash(step: int, record: dict) -> None:
        if step == 3:
            raise Crash

    killed = config(base_dir, sft_file, tmp_path / "killed")
    with pytest.raises(Crash):
        finetune(killed, hooks=TrainHooks(on_step_end=crash))
    finetune(FinetuneConfig(**{**killed.to_dict(), "resume": True}))
    keys = ("step", "train_loss", "val_loss", "epoch")
    a = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    b = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    wa = load_file(str(adapter / "adapter_model.safetensors"))
    wb = load_file(
        str(tmp_path / "killed" / "checkpoints" / "step_6" / "adapter" / "adapter_model.safetensors")
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # merged (CLI) == the run's checkpoint == the adapter on the NF4 base != the adapter on the float base
    merged = {}
    for dtype in ("fp32", "bf16"):
        folder = tmp_path / f"merged_{dtype}"
        args = [
            "merge",
            "--model",
            str(start),
            "--adapter",
            str(adapter),
            "--out",
            str(folder),
            "--dtype",
            dtype,
        ]
        assert main(args) == 0
        merged[dtype] = load_model_and_tokenizer(folder)[0]
    assert f"wrote {tmp_path / 'merged_bf16'}" in capsys.readouterr().out
    on_nf4, tokenizer = load_with_adapter(start, adapter)
    on_float = load_model_and_tokenizer(start)[0]
    load_peft_folder(on_float, adapter)  # the LoRA tensors and the trained ChatML rows
    x = torch.tensor([tokenizer.render_chat([{"role": "user", "content": "Add 2 and 3."}], add_generation_prompt=True)[0]])  # fmt: skip
    with torch.no_grad():
        want = on_nf4(x)
        torch.testing.assert_close(merged["fp32"](x), want, rtol=0, atol=1e-4)
        torch.testing.assert_close(
            load_model_and_tokenizer(whole.train.checkpoint)[0](x), want, rtol=0, atol=1e-4
        )
        assert (on_float.eval()(x) - want).abs().max() > 1e-2
        assert next(merged["bf16"].parameters()).dtype == torch.bfloat16
        assert (merged["bf16"](x).float() - want).abs().max() < 0.1 * want.abs().max()


def test_merge_equals_the_adapter_on_the_nf4_base_in_python(base, random_adapters) -> None:
    for use_dora in (False, True):
        qlora = apply_qlora(
            copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets="all-linear", use_dora=use_dora)
        )
        random_adapters(qlora)
        with pytest.raises(InputError, match="cannot be merged in place"):
            merge_lora(qlora)
        x = ids(base.config.vocab_size)
        with torch.no_grad():
            want = qlora(x)
            assert (want - nf4_rounded(base)(x)).abs().max() > 0.5
            merged = merge_qlora(qlora)
            assert not nf4_layers(merged) and not any(isinstance(m, LoraLinear) for m in merged.modules())
            torch.testing.assert_close(merged(x), want, rtol=0, atol=1e-4)


def test_refusals(base_dir, base, sft_file, tmp_path, capsys) -> None:
    quantized = swap(copy.deepcopy(base), QuantScheme.make("int8"))
    folder = tmp_path / "int8"
    save_pretrained(quantized, folder, tokenizer=load_model_and_tokenizer(base_dir)[1])
    assert "quantization_config" in json.loads((folder / "config.json").read_text())
    with pytest.raises(InputError, match=r"already quantized \(int8\) — QLoRA stores the base in NF4 itself"):
        finetune(config(folder, sft_file, tmp_path / "run"))
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "finetune",
                "--model",
                str(folder),
                "--adapter",
                "qlora",
                "--out",
                str(tmp_path / "r"),
                "--quiet",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("lmstack: error:") and "already quantized" in err
    assert "\n" not in err
    with pytest.raises(InputError, match="already quantized"):
        apply_qlora(copy.deepcopy(quantized), LoraConfig())
    qlora = apply_qlora(copy.deepcopy(base), LoraConfig())
    with pytest.raises(InputError, match="cannot be merged in place"):
        qlora.blocks[0].attn.q.merge()
    assert all(isinstance(m, QuantLinear) for m in nf4_layers(quantize_base(copy.deepcopy(base))).values())


@pytest.mark.parametrize("use_dora", [False, True])
def test_same_logits_as_peft_on_bitsandbytes(base_dir, base, tmp_path, use_dora, random_adapters) -> None:
    """transformers loads the base in 4 bits with our record's `BitsAndBytesConfig`; PEFT applies our
    LoRA or DoRA adapter folder. bitsandbytes' NF4 codes equal ours; its 8-bit absmax codes may differ at near-ties
    (see tests/quant/test_nf4.py), so those are copied into ours before the logits are compared. The
    bf16 CPU inference kernel of `Linear4bit` is switched off: the comparison is in fp32."""
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    ours = apply_qlora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets="all-linear", use_dora=use_dora))
    random_adapters(ours)
    names = hf_module_names(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path=str(base_dir), name_map=names)
    bnb_config = transformers.BitsAndBytesConfig(**BNB_CONFIG, bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, device_map="cpu", quantization_config=bnb_config
    )
    for module in hf.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    theirs = dict(hf.base_model.model.named_modules())
    near_ties = 0
    for path, layer in nf4_layers(ours).items():
        linear = theirs[names[path.removesuffix(".base_layer")]].base_layer
        assert isinstance(linear, bnb.nn.Linear4bit)
        state = linear.weight.quant_state
        assert torch.equal(linear.weight.data.reshape(-1), layer.qweight)
        assert (
            torch.equal(state.state2.absmax, layer.absmax_scale)
            and state.offset.item() == layer.absmax_offset.item()
        )
        near_ties += int((state.absmax != layer.scales).sum())
        with torch.no_grad():
            layer.scales.copy_(state.absmax)
        weight = bnb.functional.dequantize_4bit(linear.weight.data, state)
        torch.testing.assert_close(layer.dequantize(), weight, rtol=0, atol=1e-6)
    assert near_ties <= 0.01 * sum(m.scales.numel() for m in nf4_layers(ours).values())
    x = ids(base.config.vocab_size)
    with torch.no_grad():
        got = ours(x)
        assert (got - nf4_rounded(base)(x)).abs().max() > 0.5
        torch.testing.assert_close(got, hf(input_ids=x).logits, rtol=0, atol=1e-4)


def test_dpo_reference_is_the_nf4_base(base_dir, tmp_path, write_jsonl) -> None:
    """Under QLoRA the policy starts as the NF4 base, so the default reference is that base too: the
    step-0 reward margin is exactly 0 and the loss log 2 (against the float base they would not be)."""
    rows = [
        {"prompt": f"Is {n} even?", "chosen": "yes" if n % 2 == 0 else "no", "rejected": "maybe"}
        for n in range(8)
    ]
    run = FinetuneConfig(
        model=str(base_dir), out=str(tmp_path / "run"), data=str(write_jsonl(tmp_path / "p.jsonl", rows)),
        method="dpo", adapter="qlora", max_steps=1, batch_size=2, seq_len=64, eval_interval=1,
        checkpoint_interval=1, threads=1, progress=False,
    )  # fmt: skip
    finetune(run)
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["val_reward_margin"] == 0.0 and first["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
