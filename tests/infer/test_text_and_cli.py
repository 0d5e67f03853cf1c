"""generate_text (stop strings, chat templates, streaming), the CLI, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

from lmstack.cli import main
from lmstack.infer import generate, generate_text
from lmstack.tokenizer.chat import render_text, transcript_stops

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20


@pytest.fixture(scope="module")
def tok_and_model():
    from lmstack.tokenizer import Tokenizer

    from .conftest import tiny_model

    tok = Tokenizer.train([TEXT], 300, special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>"])
    model = tiny_model(vocab=tok.vocab_size, seed=9, dtype=torch.float32, eos_id=tok.eos_id)
    return tok, model


def test_generate_text_decodes_and_cuts_at_stop_strings(tok_and_model):
    tok, model = tok_and_model
    free = generate_text(model, tok, "To be, or", max_new_tokens=30, seed=0, details=True)[0]
    assert free.text == tok.decode([t for t in free.tokens if t != tok.eos_id])
    assert len(free.text) > 6
    stop = free.text[3:6]
    pieces = []
    cut = generate_text(
        model, tok, ["To be, or"], max_new_tokens=30, stop=[stop], on_text=lambda r, p: pieces.append(p)
    )
    assert cut == [free.text[: free.text.index(stop)]]
    assert "".join(pieces) == cut[0]  # the stream never showed any part of the stop string


def test_chat_template_and_plain_transcript(tok_and_model):
    tok, model = tok_and_model
    messages = [{"role": "user", "content": "hello"}]
    text = render_text(tok, messages, add_generation_prompt=True)
    assert text == "User: hello\nAssistant:" and transcript_stops(tok) == ["\nUser:"]
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    try:
        text = render_text(tok, messages, add_generation_prompt=True)
        assert text == "<|user|>hello<|assistant|>" and transcript_stops(tok) == []
        reply = generate_text(model, tok, messages, max_new_tokens=5, details=True)[0]
        prompt_ids = tok.encode(text, allowed_special="all")
        assert reply.tokens == generate(model, [prompt_ids], max_new_tokens=5, stop_ids=[tok.eos_id])[0]
    finally:
        tok.chat_template = ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=4, top_p=0.0), r"top_p must lie in \(0, 1\]"),
        (dict(max_new_tokens=4, top_p=1.5), r"top_p must lie in \(0, 1\]"),
        (dict(max_new_tokens=4, temperature=-0.1), "temperature must be >= 0"),
        (
            dict(max_new_tokens=4, num_beams=2),
            r"num_beams now goes in strategy=Beam\(.*valid SamplingParams fields",
        ),
        (dict(max_new_tokens=4, temprature=0.5), "unknown generation option.*temprature.*temperature"),
        (dict(max_new_tokens=4, cache="nope"), "unknown cache"),
    ],
)
def test_bad_arguments_raise_clear_errors(make_tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(make_tiny(), [[1, 2, 3]], **kwargs)


def test_bad_prompts_and_the_context_limit(make_tiny):
    model = make_tiny(max_seq_len=20)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 99]], max_new_tokens=3)
    with pytest.raises(
        ValueError, match="prompt of 21 tokens is longer than the model's context of 20 tokens"
    ):
        generate(model, [list(range(21))], max_new_tokens=3)
    out = generate(model, [list(range(15)), [1, 2]], max_new_tokens=10, stop_ids=(), details=True)
    assert len(out[0].tokens) == 5 and out[0].finish_reason == "length"  # 15 + 5 fills the context of 20
    assert len(out[1].tokens) == 10
    assert generate(model, [list(range(20))], max_new_tokens=3, details=True)[0].tokens == []


def test_logprobs_are_from_the_raw_distribution(make_tiny):
    model = make_tiny()
    out = generate(
        model, [[4, 5, 6]], max_new_tokens=3, temperature=0.5, top_k=3, seed=1, logprobs=2, details=True
    )[0]
    with torch.no_grad():
        logits = model(torch.tensor([[4, 5, 6] + out.tokens[:-1]]))[0, -3:]
    expected = torch.log_softmax(logits, -1)
    for i, token in enumerate(out.tokens):
        assert abs(out.logprobs[i] - float(expected[i, token])) < 1e-5
        assert out.top_logprobs[i][0][0] == int(expected[i].argmax())


@pytest.fixture(scope="module")
def run_folder(tok_and_model, tmp_path_factory):
    from lmstack.interop.hf import save_pretrained

    tok, model = tok_and_model
    run = tmp_path_factory.mktemp("run")
    save_pretrained(model, run / "checkpoints" / "step_000010", tokenizer=tok)
    (run / "latest").write_text("checkpoints/step_000010\n")
    return run


def test_cli_generate_from_a_run_folder(run_folder, tok_and_model, capsys):
    tok, model = tok_and_model
    assert main(["generate", "--model", str(run_folder), "To be", "--max-new-tokens", "8"]) == 0
    expected = generate_text(model, tok, "To be", max_new_tokens=8)
    assert capsys.readouterr().out == expected + "\n"
    ckpt = run_folder / "checkpoints" / "step_000010"
    args = [
        "generate",
        "--model",
        str(ckpt),
        "To be",
        "--max-new-tokens",
        "8",
        "--stream",
        "--draft",
        str(ckpt),
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n" and "acceptance rate 1.00" in captured.err


def test_cli_chat_uses_a_transcript_for_a_base_model(run_folder, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", "--model", str(run_folder), "--max-new-tokens", "4"]) == 0
    assert "no chat template" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [[], ["--temperature", "0"]])
def test_cli_chat_samples_with_the_folders_generation_defaults(
    run_folder, tok_and_model, monkeypatch, capsys, flags
):
    """Unset sampling flags come from generation_config.json (none there: temperature 0.7, top-p 0.9),
    as the server does; an explicit flag wins."""
    import io

    tok, model = tok_and_model
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", "--model", str(run_folder), "--max-new-tokens", "12", "--seed", "3", *flags]) == 0
    sampling = dict(temperature=0.0) if flags else dict(temperature=0.7, top_p=0.9)
    messages = [{"role": "user", "content": "hello"}]
    expected = generate_text(model, tok, messages, max_new_tokens=12, seed=3, **sampling)
    assert capsys.readouterr().out == expected + "\n"


def test_cli_errors_are_one_line(tmp_path, run_folder, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(tmp_path), "hi"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("lmstack: error: ")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(run_folder), "hi", "--top-p", "2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "top_p must lie in (0, 1]" in err and err.count("\n") == 1


def test_cli_strategy_flags_build_the_strategy_objects(run_folder, tok_and_model, capsys):
    from lmstack.infer import Beam, Contrastive

    tok, model = tok_and_model
    base = ["generate", "--model", str(run_folder), "To be", "--max-new-tokens", "8"]
    for flags, strategy in (
        (["--penalty-alpha", "0.5", "--top-k", "3"], Contrastive(0.5, 3)),
        (["--beams", "3"], Beam(3)),
    ):
        assert main(base + flags) == 0
        expected = generate_text(model, tok, "To be", max_new_tokens=8, strategy=strategy)
        assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(SystemExit) as exc:
        main(base + ["--beams", "2", "--penalty-alpha", "0.5", "--top-k", "3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "choose one decoding strategy, got --beams and --penalty-alpha" in err
    with pytest.raises(SystemExit) as exc:
        main(base + ["--beams", "2", "--temperature", "0.7"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "beam search is deterministic" in err and err.count("\n") == 1
