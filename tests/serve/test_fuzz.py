"""Fuzzing the request bodies with hypothesis: whatever arrives, the server answers in OpenAI's error shape
or with a completion — never a 500 — and stays alive."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
FIELDS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "top_logprobs", "stream",
          "stream_options", "response_format", "ignore_eos", "user"]  # fmt: skip
good = {
    "model": st.just("tiny"),
    "prompt": st.sampled_from(["To be", [5, 6, 7]]) | junk,
    "messages": st.just([{"role": "user", "content": "hi"}]) | junk,
    "temperature": st.floats(0, 2) | junk,
    "n": st.integers(1, 3) | junk,
    "stop": st.sampled_from([" ", ["t", "e"]]) | junk,
    "stream": st.booleans(),
    "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}]) | junk,
}
bodies = st.fixed_dictionaries(
    {"model": st.just("tiny") | junk},
    optional={name: good.get(name, junk) for name in ["prompt", "messages", *FIELDS]},
)


@pytest.fixture(scope="module")
def fuzz_server(start_server):
    return start_server(max_tokens_limit=3, max_batch=4, kv_blocks=64)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, chat=st.booleans())
def test_no_body_makes_a_500(fuzz_server, body, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    try:
        raw = json.dumps(body).encode()
    except ValueError:
        return
    status, _, payload = fuzz_server.request("POST", path, raw=raw)
    assert status in (200, 400, 404), payload
    if status != 200:
        error = json.loads(payload)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif not body.get("stream"):
        assert json.loads(payload)["usage"]["completion_tokens"] <= 3 * 3


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=64))
def test_malformed_bytes_are_a_400(fuzz_server, raw):
    status, _, payload = fuzz_server.request("POST", "/v1/completions", raw=raw)
    assert status in (400, 404) and "error" in json.loads(payload)


def test_the_server_is_alive_after_fuzzing(fuzz_server):
    assert fuzz_server.request("GET", "/health")[0] == 200
    status, _, _ = fuzz_server.request(
        "POST", "/v1/completions", {"model": "tiny", "prompt": "To be", "max_tokens": 2}
    )
    assert status == 200 and fuzz_server.state.in_flight == 0
    status, _, _ = fuzz_server.request("POST", "/v1/completions", raw=b"x" * (2 << 20))
    assert status == 413
