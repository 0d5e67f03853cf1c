"""`analyze` (the JSON object) and `lmstack calc`: keys, consistency, and one-line errors on bad input."""

from __future__ import annotations

import json

import pytest

from lmstack.arith import HARDWARE, analyze, count_params, decode_estimate, kv_cache, weights_bytes
from lmstack.arith.throughput import decode_weight_bytes, step_seconds
from lmstack.cli import main
from lmstack.config import ModelConfig
from lmstack.presets import PRESETS

REQUIRED = [
    "params.total", "params.active", "params.embedding", "flops.forward_per_token", "kv_cache.bytes_per_token",
    "memory.weights_bytes", "memory.training_bytes", "decode.tokens_per_s", "decode.crossover_batch",
    "serving.max_users", "training.chinchilla_tokens",
]  # fmt: skip


def lookup(obj, dotted):
    for key in dotted.split("."):
        obj = obj[key]
    return obj


def calc(capsys, *argv):
    code = main(["calc", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_analyzes_to_finite_json(name):
    result = analyze(ModelConfig.preset(name))
    text = json.dumps(result, allow_nan=False)
    for key in REQUIRED:
        lookup(json.loads(text), key)


def test_cli_json_is_analyze(capsys):
    code, out, err = calc(capsys, "llama2-7b", "--json", "--hardware", "a100-80gb", "--batch", "4")
    assert code == 0 and err == ""
    obj = json.loads(out)
    expected = json.loads(json.dumps(analyze(ModelConfig.preset("llama2-7b"), hardware="a100-80gb", batch=4)))
    assert obj == expected
    assert obj["params"]["total"] == 6_738_415_616
    assert obj["kv_cache"]["bytes_per_token"] == 524_288
    assert obj["memory"]["training_bytes"] == 16 * 6_738_415_616


def test_cli_tables(capsys):
    code, out, _ = calc(capsys, "mixtral-8x7b", "--gpus", "2", "--dtype", "int4")
    assert code == 0
    assert "46,702,792,704" in out and "12,879,925,248" in out and "GiB" in out


@pytest.mark.parametrize("as_folder", [True, False])
def test_cli_reads_config_json_and_checkpoint_folder(tmp_path, capsys, as_folder):
    from lmstack.interop.hf_config import config_to_hf

    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(ModelConfig.preset("mistral-7b"))))
    code, out, _ = calc(capsys, str(tmp_path if as_folder else tmp_path / "config.json"), "--json")
    assert code == 0
    assert json.loads(out)["params"]["total"] == 7_241_732_096


def one_line_exit_2(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["calc", *argv])
    out = capsys.readouterr()
    assert exc.value.code == 2
    assert out.out == ""
    assert out.err.startswith("lmstack: error: ") and out.err.count("\n") == 1, out.err
    return out.err


def test_unknown_preset(capsys):
    assert "llama2-7b" in one_line_exit_2(capsys, "llama2-7")  # suggests the close match


def test_malformed_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    one_line_exit_2(capsys, str(tmp_path / "config.json"))
    one_line_exit_2(capsys, str(tmp_path))


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    )
    assert "BertForMaskedLM" in one_line_exit_2(capsys, str(tmp_path))


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch", "-4"], ["--batch", "0"], ["--context", "-1"], ["--gpus", "0"], ["--mfu", "1.5"],
        ["--lora-rank", "0"], ["--dtype", "int3"], ["--kv-dtype", "fp9"], ["--hardware", "b200"],
        ["--hardware", "tflops=312,tbps=-2,gib=80"], ["--reserve", "1"],
    ],
)  # fmt: skip
def test_bad_arguments(capsys, argv):
    one_line_exit_2(capsys, "llama2-7b", *argv)


def test_missing_path(capsys, tmp_path):
    assert "no such" in one_line_exit_2(capsys, str(tmp_path / "nope" / "config.json"))


# ---- consistency of the roofline numbers -------------------------------------------------------------
def test_decode_reads_active_weights_at_batch_1():
    """Batch 1 reads the k routed experts, the head and every block weight, not the embedding table."""
    mixtral = ModelConfig.preset("mixtral-8x7b")
    p = count_params(mixtral)
    assert decode_weight_bytes(mixtral, "bf16", 1) == pytest.approx(2 * (p.active - p.token_embedding))
    assert decode_weight_bytes(mixtral, "bf16", 10**6) == pytest.approx(2 * (p.total - p.token_embedding))
    dense = ModelConfig.preset("gpt2")  # tied: the table is read as the head
    assert decode_weight_bytes(dense, "bf16", 1) == weights_bytes(dense) - 2 * 1024 * 768


@pytest.mark.parametrize("name", ["llama2-7b", "mixtral-8x7b", "gemma-2b"])
def test_crossover_batch_balances_compute_and_memory(name):
    config, hw = ModelConfig.preset(name), HARDWARE["h100-sxm"]
    est = decode_estimate(config, hw, batch=1, context=512)
    b = est["crossover_batch_weights_only"]
    weights = decode_weight_bytes(config, "bf16", b)
    memory_s = weights / hw.bandwidth_bytes_per_s
    from lmstack.arith import decode_flops_per_token

    compute_s = b * decode_flops_per_token(config, 1) / hw.peak_flops
    assert compute_s == pytest.approx(memory_s, rel=1e-9)


def test_decode_is_memory_bound_below_crossover_and_compute_bound_above():
    config, hw = ModelConfig.preset("llama3-8b"), HARDWARE["a100-80gb"]
    cross = decode_estimate(config, hw, batch=1, context=256)["crossover_batch"]
    assert cross is not None
    below = decode_estimate(config, hw, batch=int(cross) - 1, context=256)
    above = decode_estimate(config, hw, batch=int(cross) + 2, context=256)
    assert below["bound"] == "memory" and above["bound"] == "compute"


def test_max_users_is_the_largest_batch_that_fits():
    config = ModelConfig.preset("llama3-8b")
    r = analyze(config, hardware="l4", context=8192, reserve_fraction=0.1)
    users, kv = r["serving"]["max_users"], kv_cache(config, 8192).bytes_per_sequence
    budget = 0.9 * HARDWARE["l4"].memory_bytes - weights_bytes(config)
    assert users * kv <= budget < (users + 1) * kv


def test_step_seconds_picks_the_binding_bound():
    hw = HARDWARE["h100-sxm"]
    assert step_seconds(hw.bandwidth_bytes_per_s, 1.0, hw) == (1.0, "memory")
    assert step_seconds(1.0, hw.peak_flops, hw) == (1.0, "compute")
