"""Conversations -> token ids, with a mask of the tokens the assistant wrote.

One renderer for everything that turns chat messages into tokens: supervised fine-tuning (which trains
only on assistant tokens), the server and `lmstack chat` (which add a generation prompt).

- A tokenizer with a `chat_template` renders it with Jinja, the way Hugging Face `transformers` does
  (sandboxed, `trim_blocks` + `lstrip_blocks`, `raise_exception`, `bos_token` / `eos_token` in scope);
  the text is encoded with special tokens allowed, as `apply_chat_template(tokenize=True)` does.
- Without a template, the plain transcript a base model can continue:

      System: You are terse.
      User: Hi
      Assistant: Hello.
      User: Bye
      Assistant:                  <- the generation prompt (add_generation_prompt=True)

  It has no end-of-turn token: generation stops at the next "\\nUser:".

The assistant mask comes from rendering the conversation prefix by prefix: rendering messages[:i] with
a generation prompt, then messages[:i+1], the difference is what assistant message i added (its content
and its end-of-turn token). That only works if every render extends the one before, so a template that
rewrites earlier text as the conversation grows (say, one that moves the system prompt) is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from lmstack.errors import InputError
from lmstack.tokenizer.types import T, TokenizerLike
from lmstack.tokenizer.vocab import extra_tokens

TRANSCRIPT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# ChatML (OpenAI; used by Qwen and SmolLM): every message is <|im_start|>role\ncontent<|im_end|>\n.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Messages = Sequence[Mapping[str, Any]]


def check_messages(messages: Messages) -> list[dict[str, Any]]:
    """The messages as plain dicts, each with a string `role` and `content`, or an InputError."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError(f"chat messages must be a list of dicts, got {type(messages).__name__}")
    checked = []
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise InputError(f"chat message {k} must be a dict with 'role' and 'content', got {m!r}"[:300])
        if not isinstance(m["content"], str):
            raise InputError(f"chat message {k} has non-string content {m['content']!r}"[:300])
        checked.append(dict(m))
    return checked


def transcript_stops(tok: TokenizerLike) -> list[str]:
    """Stop strings a chat reply needs beyond the EOS ids: the plain transcript has no end-of-turn
    token, so a reply ends where the model starts the user's next line."""
    return [] if tok.chat_template else [f"\n{TRANSCRIPT_ROLES['user']}:"]


def render_text(tok: TokenizerLike, messages: Messages, *, add_generation_prompt: bool = False) -> str:
    """The conversation as text: the tokenizer's chat template, or the plain transcript without one."""
    messages = check_messages(messages)
    if not tok.chat_template:
        lines = [f"{TRANSCRIPT_ROLES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
        return "\n".join(lines + (["Assistant:"] if add_generation_prompt else []))
    return _render_template(tok, messages, add_generation_prompt)


def _render_template(tok: TokenizerLike, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InputError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    names = {i: s for s, i in {**tok._added, **tok.special_tokens}.items()}
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(tok.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=names.get(tok.bos_id, ""),
            eos_token=names.get(tok.eos_id, ""),
        )
    except TemplateError as exc:
        raise InputError(
            f"{template_name(tok)} failed: {exc} — fix the chat_template in tokenizer_config.json"
        ) from None


def template_name(tok: TokenizerLike) -> str:
    """How errors name the template in use."""
    if not tok.chat_template:
        return "the plain transcript"
    if tok.chat_template == CHATML_TEMPLATE:
        return "the ChatML chat template"
    first = tok.chat_template[:60].replace("\n", "\\n")
    return f"the chat template {first!r}..."


def render_chat(
    tok: TokenizerLike, messages: Messages, *, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation, and for each id whether an assistant message wrote it.

    The mask covers each assistant message's content and its end-of-turn token (`<|im_end|>`,
    `<|eot_id|>`), not the role header before it nor template whitespace after the end token.
    """
    messages = check_messages(messages)
    spans = assistant_spans(tok, messages)
    text = render_text(tok, messages, add_generation_prompt=add_generation_prompt)
    ids = tok.encode(text, allowed_special="all")
    return ids, _mask(tok, ids, text, spans)


def assistant_spans(tok: TokenizerLike, messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Character spans of the assistant messages in the rendered conversation (see module docstring)."""
    spans = []
    previous = ""
    for i, message in enumerate(messages):
        prompt = render_text(tok, messages[:i], add_generation_prompt=True) if i else ""
        full = render_text(tok, messages[: i + 1])
        before = prompt if message["role"] == "assistant" else previous
        if not full.startswith(previous) or not full.startswith(before):
            raise InputError(
                f"{template_name(tok)} does not render the conversation prefix by prefix: adding message {i} "
                f"({message['role']}) changes the text before it, so the assistant tokens cannot be told "
                "apart — use a template whose renders extend each other (e.g. ChatML, with_chatml(tok))"
            )
        if message["role"] == "assistant":
            spans.append((len(prompt), len(prompt) + len(_through_end_token(tok, full[len(prompt) :]))))
        previous = full
    return spans


def _through_end_token(tok: TokenizerLike, added: str) -> str:
    """What an assistant message added, without template whitespace after its final special token."""
    stripped = added.rstrip()
    if any(stripped.endswith(s) for s in tok.special_tokens):
        return stripped
    return added


def _mask(tok: TokenizerLike, ids: list[int], text: str, spans: list[tuple[int, int]]) -> list[bool]:
    """Mark each token whose bytes overlap an assistant span (byte offsets of the UTF-8 text)."""
    data = text.encode("utf-8")
    if tok.decode_bytes(ids) != data:
        raise InputError(
            "the rendered chat does not decode back to itself (the tokenizer normalizes it), so the "
            "assistant tokens cannot be located — normalize the messages first (e.g. NFC)"
        )
    byte_spans = [(len(text[:s].encode("utf-8")), len(text[:e].encode("utf-8"))) for s, e in spans]
    mask, offset = [], 0
    for token_id in ids:
        end = offset + len(tok.decode_bytes([token_id]))
        mask.append(any(s < end and offset < e for s, e in byte_spans))
        offset = end
    return mask


def with_chatml(tok: T) -> T:
    """A copy of `tok` with the ChatML special tokens (added after its ids if missing) and template.

    What fine-tuning a base model for chat starts from; the new tokens' embeddings must then be added
    to the model. `<|im_end|>` becomes the end-of-sequence token, so generation stops after a turn.
    """
    specials = tok.special_tokens
    next_id = len(tok._id_bytes)
    for name in CHATML_TOKENS:
        if name in tok._added:
            raise InputError(f"{name!r} is already a non-special added token — it must be a special token")
        if name not in specials:
            specials[name] = next_id
            next_id += 1
    return type(tok)(
        tok.merges,
        pattern=tok.pattern,
        special_tokens=specials,
        byte_ids=tok._byte_ids,
        extra_tokens=extra_tokens(tok._vocab),
        added_tokens=tok._added,
        normalizer=tok.normalizer,
        pre_tokenizer=tok.pre_tokenizer,
        normalized_tokens=tok.normalized_tokens,
        ignore_merges=tok.ignore_merges,
        bos_token=tok.bos_token,
        eos_token=CHATML_TOKENS[1],
        chat_template=CHATML_TEMPLATE,
    )
