"""The server under load: many streaming clients share the continuous batch and each gets exactly what it
gets alone; a client that disconnects frees its KV blocks; a full queue answers 429 and recovers."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmstack.infer import generate_text

WORDS = ["To be", "or not", "that is", "the question", "whether", "nobler", "in the mind", "to suffer"]


def stream_completion(server, body: dict) -> tuple[str, str | None]:
    """One streaming request over a raw socket-level HTTP client; returns (text, finish_reason)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request(
        "POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    assert response.status == 200, response.read()
    text, reason, done = "", None, False
    for line in response:
        line = line.strip()
        if line == b"data: [DONE]":
            done = True
            break
        if line.startswith(b"data: "):
            for choice in json.loads(line[6:])["choices"]:
                text += choice["text"]
                reason = choice["finish_reason"] or reason
    conn.close()
    assert done
    return text, reason


def test_32_streaming_clients_each_equal_their_solo_output_and_batch(server, loaded):
    model, tok = loaded
    before = server.metrics()
    bodies = [
        dict(model="tiny", prompt=WORDS[i % 8] + " " * (i // 8), max_tokens=6 + (i * 7) % 20,
             temperature=0.8 if i % 2 else 0.0, top_p=1, seed=100 + i)
        for i in range(32)
    ]  # fmt: skip
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda b: stream_completion(server, b), bodies))
    for body, (text, reason) in zip(bodies, results):
        ref = generate_text(model, tok, body["prompt"], max_new_tokens=body["max_tokens"],
                            temperature=body["temperature"], seed=body["seed"], details=True)[0]  # fmt: skip
        assert (text, reason) == (ref.text, ref.finish_reason)
    after = server.metrics()
    steps = after["lmstack:batch_size_count"] - before.get("lmstack:batch_size_count", 0)
    single = after["lmstack:batch_size_bucket{le=1.0}"] - before.get("lmstack:batch_size_bucket{le=1.0}", 0)
    assert single < steps  # some engine steps decoded more than one sequence at once
    assert after["lmstack:batch_size_sum"] - before.get("lmstack:batch_size_sum", 0) > steps


def wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def idle(m: dict) -> bool:
    return (
        m["lmstack:num_requests_running"]
        == m["lmstack:num_requests_waiting"]
        == m["lmstack:kv_cache_usage_perc"]
        == 0
    )


def open_stream(server, body: dict) -> socket.socket:
    """Send a streaming request and read until its first token chunk arrives; returns the socket."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    payload = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
    seen = b""
    while b'"text"' not in seen:
        seen += sock.recv(4096)
    return sock


def test_a_disconnected_stream_is_cancelled_and_frees_its_blocks(start_server):
    # four choices decoded one at a time: 960 tokens, far longer than the test takes to hang up
    server = start_server(max_batch=1, kv_blocks=64)
    long = dict(model="tiny", prompt="To be", max_tokens=240, n=4, ignore_eos=True, temperature=0)
    sock = open_stream(server, long)
    wait_for(lambda: server.metrics()["lmstack:kv_cache_usage_perc"] > 0)
    sock.close()
    wait_for(lambda: server.state.in_flight == 0)
    wait_for(lambda: idle(server.metrics()))
    m = server.metrics()
    assert m["lmstack:kv_cache_usage_perc"] == 0 and m["lmstack:num_requests_running"] == 0
    assert server.state.engine.cache.allocator.used == 0
    assert m["lmstack:request_success_total{finished_reason=abort}"] >= 1
    assert m["lmstack:generation_tokens_total"] < 4 * 240  # it really was cut short


def test_full_queue_answers_429_then_recovers(start_server):
    # one running + three waiting fill the server; four choices of 240 tokens keep it full for a while
    server = start_server(max_batch=1, max_queue=3, kv_blocks=64)
    long = dict(model="tiny", prompt="To be", max_tokens=240, n=4, ignore_eos=True, temperature=0)
    results = []
    thread = threading.Thread(target=lambda: results.append(stream_completion(server, long)))
    thread.start()
    wait_for(lambda: server.state.in_flight == 4)
    small = {**long, "max_tokens": 2, "n": 1}
    status, headers, body = server.request("POST", "/v1/completions", small)
    assert status == 429 and headers["retry-after"] == "1"
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    thread.join(timeout=60)
    assert results and results[0][1] == "length"
    status, _, body = server.request("POST", "/v1/completions", small)
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("key_header", [None, "Bearer wrong", "Bearer sekrit"])
def test_api_key_is_required_when_set(start_server, key_header):
    server = start_server(api_key="sekrit")
    headers = {"Authorization": key_header} if key_header else {}
    status, _, body = server.request(
        "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}, headers
    )
    assert status == (200 if key_header == "Bearer sekrit" else 401)
    if status == 401:
        assert json.loads(body)["error"]["code"] == "invalid_api_key"


def test_a_client_leaving_a_whole_response_request_cancels_it(start_server):
    server = start_server(max_batch=1, kv_blocks=64)  # four choices one at a time: 960 tokens
    body = dict(model="tiny", prompt="To be", max_tokens=240, n=4, ignore_eos=True, temperature=0)
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
    wait_for(lambda: server.metrics()["lmstack:kv_cache_usage_perc"] > 0)
    sock.close()
    wait_for(lambda: server.state.in_flight == 0)
    wait_for(lambda: idle(server.metrics()))
    m = server.metrics()
    assert server.state.engine.cache.allocator.used == 0 and m["lmstack:kv_cache_usage_perc"] == 0
    assert m["lmstack:request_success_total{finished_reason=abort}"] >= 1
    assert m["lmstack:generation_tokens_total"] < 4 * 240
