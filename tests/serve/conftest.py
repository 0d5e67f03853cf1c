"""A tiny random model with a freshly trained tokenizer, saved as a checkpoint folder, and a live server
on a free loopback port (uvicorn in a thread) for the tests to talk to over real HTTP."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.model import build_model

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A checkpoint folder: float64 weights (std 0.2, so logits are O(1-10) and paths vary) + tokenizer."""
    from lmstack.interop.hf import save_pretrained
    from lmstack.tokenizer import Tokenizer

    tok = Tokenizer.train([TEXT], 300, special_tokens=["<|endoftext|>"])
    config = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                         max_seq_len=256, eos_id=tok.eos_id)  # fmt: skip
    model = build_model(config, dtype=torch.float64, seed=3)
    with torch.no_grad():
        torch.manual_seed(3)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    folder = tmp_path_factory.mktemp("serve") / "tiny"
    save_pretrained(model, folder, tokenizer=tok)
    return folder


@pytest.fixture(scope="session")
def loaded(model_dir):
    from lmstack.interop.folders import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    return model.eval(), tok


class LiveServer:
    def __init__(self, app, port: int):
        import uvicorn

        self.app, self.port = app, port
        self.state = app.state.server
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uvicorn.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def request(
        self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None
    ):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        return response.status, dict(response.getheaders()), payload

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        _, _, text = self.request("GET", "/metrics")
        out = {}
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return out

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def start_server(loaded):
    """start_server(**ServerConfig fields) -> a LiveServer on a free port, stopped at the session's end."""
    from lmstack.serve import ServerConfig, create_app

    servers = []

    def start(defaults: dict | None = None, **fields) -> LiveServer:
        model, tok = loaded
        config = ServerConfig(**{"model_name": "tiny", **fields})
        server = LiveServer(create_app(model, tok, config, defaults=defaults), free_port())
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server, model_dir):
    from lmstack.interop.folders import generation_defaults

    return start_server(defaults=generation_defaults(model_dir), max_batch=8, kv_blocks=512)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared machine they only slow things down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
