"""render_chat: ids equal to transformers' apply_chat_template, and an exact assistant mask."""

from __future__ import annotations

import pytest

from lmstack.errors import InputError
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer.chat import CHATML_TEMPLATE, CHATML_TOKENS, render_text, with_chatml

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And in French, with ünïcödé?"},
    {"role": "assistant", "content": "Quatre. 😀\nVoilà!"},
]
# The Llama-3 instruct template, as its tokenizer_config.json ships it.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
    "<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["You are terse. What is two plus two? Four. In French, quatre. Voilà! " * 20]
VOCAB = 280


@pytest.fixture(scope="module")
def base() -> Tokenizer:
    return Tokenizer.train(CORPUS, VOCAB)


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    tok = Tokenizer.train(CORPUS, VOCAB, special_tokens=LLAMA3_SPECIALS, bos_token="<|begin_of_text|>")
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def assistant_runs(tok: Tokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """The decoded text of each maximal run of masked tokens."""
    runs, current = [], []
    for token_id, on in zip(ids, mask):
        if on:
            current.append(token_id)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


def reference_ids(tok: Tokenizer, tmp_path, messages, add_generation_prompt: bool) -> list[int]:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tok.save(tmp_path))
    return list(
        hf.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
    )


def test_chatml_mask_and_ids(base: Tokenizer, tmp_path) -> None:
    tok = with_chatml(base)
    assert [tok.special_tokens[t] for t in CHATML_TOKENS] == [
        base.vocab_size,
        base.vocab_size + 1,
    ] and tok.eos_token == "<|im_end|>"
    ids, mask = tok.render_chat(CHAT)
    assert tok.decode(ids) == render_text(tok, CHAT)
    assert ids == reference_ids(tok, tmp_path, CHAT, False)
    assert assistant_runs(tok, ids, mask) == ["4.<|im_end|>", "Quatre. 😀\nVoilà!<|im_end|>"]
    prompt_ids, prompt_mask = tok.render_chat(CHAT[:4], add_generation_prompt=True)
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n") and ids[: len(prompt_ids)] == prompt_ids
    assert prompt_mask == mask[: len(prompt_ids)]
    assert with_chatml(tok).special_tokens == tok.special_tokens  # idempotent


def test_llama3_mask_and_ids(llama3: Tokenizer, tmp_path) -> None:
    ids, mask = llama3.render_chat(CHAT)
    assert ids[0] == llama3.bos_id
    assert ids == reference_ids(llama3, tmp_path, CHAT, False)
    assert assistant_runs(llama3, ids, mask) == ["4.<|eot_id|>", "Quatre. 😀\nVoilà!<|eot_id|>"]
    prompt_ids, _ = llama3.render_chat(CHAT[:2], add_generation_prompt=True)
    assert prompt_ids == reference_ids(llama3, tmp_path / "p", CHAT[:2], True)


def test_plain_transcript_mask(base: Tokenizer) -> None:
    ids, mask = base.render_chat(CHAT)
    text = base.decode(ids)
    assert (
        text
        == "System: You are terse.\nUser: What is 2+2?\nAssistant: 4.\nUser: And in French, with ünïcödé?\nAssistant: Quatre. 😀\nVoilà!"
    )
    runs = assistant_runs(base, ids, mask)
    assert [r.strip() for r in runs] == ["4.", "Quatre. 😀\nVoilà!"]
    prompt_ids, _ = base.render_chat(CHAT[:2], add_generation_prompt=True)
    assert base.decode(prompt_ids).endswith("User: What is 2+2?\nAssistant:")


def test_a_template_that_does_not_extend_is_refused(base: Tokenizer) -> None:
    tok = with_chatml(base)
    # the system prompt goes last, so adding a message changes the text before it
    tok.chat_template = (
        "{% for m in messages if m['role'] != 'system' %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
        "{% endfor %}{% for m in messages if m['role'] == 'system' %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(InputError, match="does not render the conversation prefix by prefix"):
        tok.render_chat(CHAT)


def test_bad_messages_and_template_errors(base: Tokenizer) -> None:
    with pytest.raises(InputError, match="must be a dict with 'role' and 'content'"):
        base.render_chat([{"role": "user"}])
    with pytest.raises(InputError, match="non-string content"):
        base.render_chat([{"role": "user", "content": 3}])
    tok = with_chatml(base)
    tok.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(InputError, match="no system role"):
        tok.render_chat(CHAT)
    tok.chat_template = "{% for %}"
    with pytest.raises(InputError, match="failed"):
        tok.render_chat(CHAT)
    assert CHATML_TEMPLATE in with_chatml(base).chat_template
