"""OpenAI's request and response shapes, without sockets: JSON bodies in, `SamplingParams` and JSON out.

`parse_request` checks a /v1/chat/completions or /v1/completions body field by field and raises
`RequestError` naming the field (a 400 in OpenAI's error shape). Unset sampling fields take the model
folder's defaults (`interop.folders.generation_defaults`), as vLLM does. `top_k`, `min_p`,
`repetition_penalty` and `ignore_eos` are accepted as extras (vLLM's names). The builders at the bottom
write the response objects, whole or as stream chunks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from lmstack.infer.sampling import SamplingParams

MAX_N = 16
MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "user", "assistant", "developer", "tool")


class RequestError(Exception):
    """A request the server refuses, with what OpenAI's error object needs."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.type = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                     413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(
            status, "server_error")  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    """One parsed request: the prompt (text, token ids or chat messages) and how to decode it."""

    chat: bool
    model: str
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # top alternatives per token (0: only the chosen token's), None: off
    json_mode: bool = False
    ignore_eos: bool = False
    sampling: dict = field(default_factory=dict)  # SamplingParams fields the request sets


# ---- field checks ---------------------------------------------------------------------------------
def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a number, got {value!r}", name)
    if not lo <= value <= hi:
        raise RequestError(f"'{name}' must lie in [{lo}, {hi}], got {value}", name)
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {value!r}", name)
    if not lo <= value <= hi:
        raise RequestError(f"'{name}' must lie in [{lo}, {hi}], got {value}", name)
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' holds at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return tuple(stops)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"{where} needs a 'role', one of {', '.join(ROLES)}", where)
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):  # fmt: skip
                raise RequestError(f"{where}.content parts must be {{'type': 'text', 'text': ...}}", where)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string", f"{where}.content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return prompt
    raise RequestError(
        "'prompt' must be a non-empty string or a list of token ids (one prompt per request)", "prompt"
    )


def _logprobs(body: dict, chat: bool) -> int | None:
    if chat:
        if not _boolean(body, "logprobs"):
            if body.get("top_logprobs") is not None:
                raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        return _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    return _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)


def _json_mode(body: dict) -> bool:
    fmt = body.get("response_format")
    if fmt is None:
        return False
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object"):
        raise RequestError(
            "'response_format' must be {'type': 'text'} or {'type': 'json_object'} (json_schema is not "
            "supported)",
            "response_format",
        )
    return kind == "json_object"


def parse_request(body: Any, *, chat: bool) -> CompletionRequest:
    """Check a request body; raises RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' must name the served model (see GET /v1/models)", "model")
    max_name = (
        "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    )
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    top_k = _integer(body, "top_k", -1, 1 << 20)
    sampling = {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0),
        "top_k": top_k,
        "min_p": _number(body, "min_p", 0.0, 1.0),
        "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0),
        "repetition_penalty": _number(body, "repetition_penalty", 0.01, 10.0),
    }
    if sampling["top_p"] == 0.0:
        raise RequestError("'top_p' must be > 0 — use e.g. 0.9, or 1 to disable", "top_p")
    if top_k is not None and top_k <= 0:
        sampling["top_k"] = None  # vLLM: -1 (or 0) disables top-k
    return CompletionRequest(
        chat=chat,
        model=model,
        prompt=None if chat else _prompt(body),
        messages=_messages(body) if chat else None,
        max_tokens=_integer(body, max_name, 1, 1 << 30),
        n=_integer(body, "n", 1, MAX_N) or 1,
        stream=_boolean(body, "stream"),
        include_usage=_boolean(stream_options or {}, "include_usage"),
        stop=_stop(body),
        seed=_integer(body, "seed", -(2**63), 2**63 - 1),
        logprobs=_logprobs(body, chat),
        json_mode=_json_mode(body),
        ignore_eos=_boolean(body, "ignore_eos"),
        sampling={k: v for k, v in sampling.items() if body.get(k) is not None},
    )


def sampling_params(
    request: CompletionRequest, defaults: dict, *, max_new_tokens: int, stop_ids: frozenset[int]
) -> SamplingParams:
    """The request's SamplingParams: its own fields, else the model folder's defaults."""
    fields = dict(defaults)
    fields.update(request.sampling)
    if fields.get("top_p") is not None and fields["top_p"] >= 1.0:
        fields["top_p"] = None
    if fields.get("min_p") == 0.0:
        fields["min_p"] = None
    return SamplingParams(
        **fields,
        max_new_tokens=max_new_tokens,
        stop_ids=tuple(sorted(() if request.ignore_eos else stop_ids)),
        seed=request.seed,
        logprobs=request.logprobs,
    )


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of n decodes with seed + i, so it equals `generate(..., seed=seed + i)` alone."""
    return params if params.seed is None else replace(params, seed=params.seed + index)


# ---- responses ------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    data = tokenizer.id_to_bytes(token)
    return data.decode("utf-8", errors="replace"), list(data)


def logprobs_entries(tokenizer, tokens: list[tuple[int, float, list]], chat: bool) -> dict:
    """Per-token log-probabilities in the chat (`content`) or the legacy completions shape."""
    if chat:
        content = []
        for token, logprob, top in tokens:
            text, data = token_text(tokenizer, token)
            alternatives = []
            for alt, alt_logprob in top:
                alt_text, alt_data = token_text(tokenizer, alt)
                alternatives.append({"token": alt_text, "logprob": alt_logprob, "bytes": alt_data})
            content.append({"token": text, "logprob": logprob, "bytes": data, "top_logprobs": alternatives})
        return {"content": content}
    texts = [token_text(tokenizer, t)[0] for t, _, _ in tokens]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [lp for _, lp, _ in tokens],
        "top_logprobs": [{token_text(tokenizer, a)[0]: lp for a, lp in top} for _, _, top in tokens],
        "text_offset": offsets,
    }


def response_object(request: CompletionRequest, request_id: str, created: int, choices: list[dict],
                    usage_: dict | None, *, chunk: bool) -> dict:  # fmt: skip
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if request.chat else "text_completion"
    out = {"id": request_id, "object": kind, "created": created, "model": request.model, "choices": choices}
    if not chunk or request.include_usage:
        out["usage"] = usage_
    return out


def choice_object(request: CompletionRequest, index: int, text: str | None, finish_reason: str | None,
                  logprobs: dict | None, *, chunk: bool, first: bool = False) -> dict:  # fmt: skip
    if request.chat:
        if chunk:
            delta = {"role": "assistant", "content": text or ""} if first else {}
            if text and not first:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}


def now() -> int:
    return int(time.time())
