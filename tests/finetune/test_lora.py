"""LoRA/DoRA against PEFT on a toy model with lmstack's layer names, and the PEFT folder format both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lmstack.errors import InputError
from lmstack.finetune.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    peft_state_dict,
    save_adapter,
    trainable_parameters,
    unload_lora,
    unmerge_lora,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

D, KV, FF, VOCAB = 16, 8, 24, 11
TARGET_SETS = [("q", "v"), ("q", "k", "v", "o", "gate", "up", "down")]


class Block(nn.Module):
    """Attention-free stand-in with lmstack's linear names and a forward that uses each of them."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D, bias=False), nn.Linear(D, KV, bias=False), nn.Linear(D, KV)
        self.o = nn.Linear(D, D)
        self.gate, self.up, self.down = nn.Linear(D, FF, bias=False), nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_forward(x, self.q, self.k, self.v, self.o, self.gate, self.up, self.down)


def block_forward(x: torch.Tensor, q, k, v, o, gate, up, down) -> torch.Tensor:  # noqa: ANN001
    mix = torch.tanh(q(x)) * torch.cat([k(x), v(x)], dim=-1)
    x = x + o(mix)
    return x + down(nn.functional.silu(gate(x)) * up(x))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in lmstack's model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    model = Toy()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # large enough that logits are O(1)
    return model


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(seed))


def peft_twin(ours: nn.Module, base: nn.Module, targets: tuple[str, ...], cfg: LoraConfig) -> nn.Module:
    """PEFT's model over a copy of `base`, with our adapter values copied in."""
    pc = peft.LoraConfig(
        target_modules=list(targets),
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        use_rslora=cfg.rslora,
        use_dora=cfg.use_dora,
    )
    twin = peft.get_peft_model(copy.deepcopy(base), pc)
    peft.set_peft_model_state_dict(twin, peft_state_dict(ours))
    return twin


@pytest.mark.parametrize("targets", TARGET_SETS)
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("use_dora", [False, True])
def test_matches_peft(targets: tuple[str, ...], rslora: bool, use_dora: bool, random_adapters) -> None:
    base = toy()
    cfg = LoraConfig(r=4, alpha=12, targets=targets, rslora=rslora, use_dora=use_dora)
    ours = apply_lora(copy.deepcopy(base), cfg)
    x = ids()
    torch.testing.assert_close(ours(x), base(x), rtol=0, atol=1e-6)  # step 0 is the base model
    random_adapters(ours, seed=2, scale=0.3)
    twin = peft_twin(ours, base, targets, cfg)
    got, want = ours(x), twin(x)
    assert (got - base(x)).abs().max() > 0.1  # the adapters change the output
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert trainable_parameters(ours) == sum(p.numel() for p in twin.parameters() if p.requires_grad)
    # gradients agree too (DoRA's detached norm included)
    got.square().sum().backward()
    want.square().sum().backward()
    theirs = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    for name, layer in ours.named_modules():
        if isinstance(layer, LoraLinear):
            prefix = f"base_model.model.{name}"
            torch.testing.assert_close(
                layer.lora_A.grad, theirs[f"{prefix}.lora_A.default.weight"], atol=1e-4, rtol=1e-4
            )
            torch.testing.assert_close(
                layer.lora_B.grad, theirs[f"{prefix}.lora_B.default.weight"], atol=1e-4, rtol=1e-4
            )
            if use_dora:
                torch.testing.assert_close(
                    layer.lora_magnitude.grad,
                    theirs[f"{prefix}.lora_magnitude_vector.default.weight"],
                    atol=1e-4,
                    rtol=1e-4,
                )


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unmerge(use_dora: bool, random_adapters) -> None:
    base = toy()
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets="all-linear", use_dora=use_dora))
    random_adapters(model, seed=2, scale=0.3)
    x = ids()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = model(x)
    merge_lora(model)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-6)


def test_merged_weights_match_peft_merge(random_adapters) -> None:
    base = toy()
    targets = ("q", "v", "down")
    cfg = LoraConfig(r=3, alpha=5, targets=targets, use_dora=True)
    ours = apply_lora(copy.deepcopy(base), cfg)
    random_adapters(ours, seed=2, scale=0.3)
    twin = peft_twin(ours, base, targets, cfg)
    merged_peft = twin.merge_and_unload()
    merge_lora(ours)
    theirs = merged_peft.state_dict()
    for name, tensor in ours.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6)


def test_freezes_the_base_and_counts_trainable() -> None:
    model = apply_lora(toy(), LoraConfig(r=2, alpha=4, targets=("q", "v")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{t}.lora_{ab}" for i in (0, 1) for t in ("q", "v") for ab in "AB"}
    assert trainable_parameters(model) == 2 * (2 * (D + D) + 2 * (D + KV))
    assert set(lora_state_dict(model)) == trainable
    # state-dict names of the base weights are unchanged, so base checkpoints still load
    assert set(toy().state_dict()) <= set(model.state_dict())


def test_all_linear_skips_lm_head_and_keeps_tying() -> None:
    model = apply_lora(toy(), LoraConfig(r=2, targets="all-linear"))
    assert not isinstance(model.lm_head, LoraLinear)
    assert model.lm_head.weight is model.embed.weight
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 14


def test_errors() -> None:
    with pytest.raises(InputError, match="qkv match no linear layer.*down, gate, k, lm_head, o, q, up, v"):
        apply_lora(toy(), LoraConfig(targets=("q", "qkv")))
    for bad in ({"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"targets": ()}, {"targets": ("blocks.q",)}):
        with pytest.raises(InputError):
            LoraConfig(**bad)
    assert LoraConfig(targets="q, v").targets == ("q", "v")
    model = apply_lora(toy(), LoraConfig())
    with pytest.raises(InputError, match="already has LoRA"):
        apply_lora(model, LoraConfig())


def test_dropout_only_in_training(random_adapters) -> None:
    model = apply_lora(toy(), LoraConfig(r=4, targets=("q", "v"), dropout=0.5, use_dora=True))
    random_adapters(model, seed=2, scale=0.3)
    x = ids()
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


HF_NAMES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _hf_name(path: str) -> str:
    """A stand-in for interop's weight map: our paths -> Llama-style HF paths."""
    if path == "lm_head":
        return path
    _, i, leaf = path.split(".")
    return f"model.layers.{i}.{HF_NAMES[leaf]}"


class HFToy(nn.Module):
    """The same weights under HF-style module names (and forward), so PEFT sees the names `name_map`
    writes and its adapted layers are the ones the forward calls."""

    def __init__(self, ours: Toy) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = ours.embed
        self.model.layers = nn.ModuleList()
        for block in ours.blocks:
            layer = nn.Module()
            layer.self_attn, layer.mlp = nn.Module(), nn.Module()
            for leaf, hf in HF_NAMES.items():
                parent, name = hf.split(".")
                setattr(getattr(layer, parent), name, getattr(block, leaf))
            self.model.layers.append(layer)
        self.lm_head = ours.lm_head
        self.config = transformers.PretrainedConfig()  # PEFT's causal-LM wrapper reads the base's config

    def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            x = block_forward(x, a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        return self.lm_head(x)

    def prepare_inputs_for_generation(self, *args, **kwargs):  # noqa: ANN002, ANN003 - PEFT looks for it
        raise TypeError("the toy model only scores; these tests never generate with it")


@pytest.mark.parametrize("use_dora", [False, True])
def test_saved_folder_loads_in_peft(tmp_path, use_dora: bool, random_adapters) -> None:
    base = toy()
    cfg = LoraConfig(r=4, alpha=8, targets=("q", "v", "down"), rslora=True, use_dora=use_dora)
    ours = apply_lora(copy.deepcopy(base), cfg)
    random_adapters(ours, seed=2, scale=0.3)
    save_adapter(ours, tmp_path, base_model_name_or_path="toy", name_map=_hf_name)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert (config["peft_type"], config["task_type"], config["use_dora"]) == ("LORA", "CAUSAL_LM", use_dora)
    loaded = peft.PeftModel.from_pretrained(HFToy(copy.deepcopy(base)), str(tmp_path))
    x = ids()
    torch.testing.assert_close(loaded(input_ids=x), ours(x), rtol=0, atol=1e-5)
    # and back into ours, on a fresh base
    again = load_adapter(copy.deepcopy(base), tmp_path, name_map=_hf_name)
    torch.testing.assert_close(again(x), ours(x), rtol=0, atol=0)
    assert trainable_parameters(again) == trainable_parameters(ours)


def test_peft_saved_folder_loads_into_ours(tmp_path) -> None:
    base = toy()
    pc = peft.LoraConfig(
        target_modules=["q", "k", "up"], r=5, lora_alpha=7, use_dora=True, init_lora_weights=False
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), pc)  # init_lora_weights=False: B random, not zero
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    x = ids()
    assert (theirs(x) - base(x)).abs().max() > 0.1
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_load_errors(tmp_path) -> None:
    base = toy()
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=4, targets=("q", "v")))
    save_adapter(ours, tmp_path)
    wrong_rank = apply_lora(copy.deepcopy(base), LoraConfig(r=2, targets=("q", "v")))
    with pytest.raises(InputError, match=r"'blocks\.0\.q' has an adapter with .* \(2, 16\.0"):
        load_adapter(wrong_rank, tmp_path)
    other = copy.deepcopy(base)
    other.blocks[0].q = nn.Linear(D, 12, bias=False)  # a different model: q has 12 outputs
    with pytest.raises(
        InputError, match=r"blocks\.0\.q\.lora_B has shape \(16, 4\) but the model expects \(12, 4\)"
    ):
        load_adapter(other, tmp_path)
    with pytest.raises(InputError, match="names no linear layer"):
        load_adapter(copy.deepcopy(base), tmp_path, name_map=lambda p: "x." + p)
    with pytest.raises(InputError, match="does not exist"):
        load_adapter(copy.deepcopy(base), tmp_path / "missing")


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_matches_peft_in_training(use_dora: bool, random_adapters) -> None:
    """With the same seed both draw the same dropout masks: one per adapted layer, in forward order."""
    base = toy()
    cfg = LoraConfig(r=4, alpha=8, targets=("q", "v", "up"), dropout=0.3, use_dora=use_dora)
    ours = apply_lora(copy.deepcopy(base), cfg)
    random_adapters(ours, seed=2, scale=0.3)
    pc = peft.LoraConfig(
        target_modules=["q", "v", "up"], r=4, lora_alpha=8, lora_dropout=0.3, use_dora=use_dora
    )
    twin = peft.get_peft_model(copy.deepcopy(base), pc)
    peft.set_peft_model_state_dict(twin, peft_state_dict(ours))
    ours.train()
    twin.train()
    x = ids()
    torch.manual_seed(5)
    got = ours(x)
    torch.manual_seed(5)
    want = twin(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_unload_gives_plain_linears_with_the_merged_weights(random_adapters) -> None:
    base = toy()
    model = apply_lora(
        copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets=("q", "v", "down"), use_dora=True)
    )
    random_adapters(model, seed=2, scale=0.3)
    x = ids()
    adapted = model(x)
    unload_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)
    assert type(model.blocks[0].q) is nn.Linear


def test_merging_a_tied_layer_is_refused() -> None:
    model = apply_lora(toy(), LoraConfig(r=2, targets=("q", "lm_head")))
    assert model.lm_head.weight is model.embed.weight  # still tied while the adapter is separate
    with pytest.raises(InputError, match="'lm_head' shares its weight with embed"):
        merge_lora(model)


def test_bf16_base_trains_fp32_adapters() -> None:
    base = toy().to(torch.bfloat16)
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, targets=("q", "v"), use_dora=True))
    layer = model.blocks[0].q
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    assert layer.lora_magnitude.dtype == torch.float32
    x = ids()
    out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, base(x), rtol=0, atol=0.05)
    out.float().square().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0


def test_loading_into_an_adapter_of_another_scale_is_refused(tmp_path) -> None:
    base = toy()
    save_adapter(apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8)), tmp_path)
    other = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=16))
    with pytest.raises(InputError, match="load it into the base model"):
        load_adapter(other, tmp_path)
