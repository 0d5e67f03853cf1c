"""`lmstack serve` as a process: SIGTERM drains (in-flight requests finish, new ones get 503), and a
non-loopback bind without an API key is refused; plus the model folder's sampling defaults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmstack.cli import main
from lmstack.interop.folders import generation_defaults

from .conftest import LiveServer, free_port
from .test_concurrency import open_stream


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(model_dir):
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmstack", "serve", "--model", str(model_dir), "--port", str(port), "--log-level", "warning", "--max-batch", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        probe = LiveServer.__new__(LiveServer)
        probe.port = port
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
            try:
                if probe.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        # one sequence at a time (--max-batch 1) and four choices: long enough to still be running
        body = dict(model="tiny", prompt="To be", max_tokens=240, n=4, ignore_eos=True, temperature=0)
        sock = open_stream(probe, body)  # returns once the first token has arrived
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        status, _, payload = probe.request("POST", "/v1/completions", {**body, "max_tokens": 1, "n": 1})
        assert status == 503 and json.loads(payload)["error"]["type"] == "service_unavailable"
        rest = b""
        while b"data: [DONE]" not in rest:
            chunk = sock.recv(65536)
            assert chunk, "the stream was cut before [DONE]"
            rest += chunk
        sock.close()
        assert rest.count(b'"finish_reason": "length"') == 4  # every in-flight choice ran to its end
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_binding_beyond_loopback_needs_an_api_key(model_dir, capsys, monkeypatch):
    monkeypatch.delenv("LMSTACK_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(model_dir), "--host", "0.0.0.0"])
    assert exit_.value.code == 2
    assert "--api-key" in capsys.readouterr().err


def test_generation_defaults(tmp_path):
    path = tmp_path / "generation_config.json"
    assert generation_defaults(tmp_path) == {"temperature": 0.7, "top_p": 0.9}  # no file
    path.write_text(json.dumps({"eos_token_id": 2}))
    assert generation_defaults(tmp_path) == {"temperature": 0.7, "top_p": 0.9}  # ids only
    path.write_text(json.dumps({"do_sample": True, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.1}))
    assert generation_defaults(tmp_path) == {
        "temperature": 1.0,
        "top_k": 20,
        "top_p": 0.8,
        "repetition_penalty": 1.1,
    }
    path.write_text(json.dumps({"do_sample": False, "temperature": 0.6, "top_k": 0}))
    assert generation_defaults(tmp_path) == {"temperature": 0.0, "top_k": None}
