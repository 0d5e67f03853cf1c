"""The OpenAI-compatible HTTP server: a Starlette app over one continuously batched `Engine`.

Routes: POST /v1/chat/completions and /v1/completions (whole or streamed as server-sent events),
GET /v1/models, /health and /metrics (Prometheus text). Every request becomes one engine request per
choice, submitted to the single engine thread (worker.py), so concurrent clients share the running
batch. Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

Safety: the body size and max_tokens are capped, an API key (when set) is compared in constant time,
a full queue answers 429 with Retry-After, and no endpoint reads a file a client names. On SIGTERM
(`serve`) the server drains: requests in flight finish, new ones get 503, then it exits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lmstack.infer.engine import Engine
from lmstack.serve import openai as oa
from lmstack.serve.choice import ChoiceText
from lmstack.serve.json_mode import JsonObjectProcessor, JsonVocabulary
from lmstack.serve.metrics import ServerMetrics
from lmstack.serve.openai import RequestError
from lmstack.serve.worker import EngineWorker, Job
from lmstack.tokenizer.chat import transcript_stops

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_batch: int = 8
    kv_blocks: int = 256
    block_size: int = 16
    max_queue: int = 64  # requests (choices) waiting beyond the running batch before 429
    max_tokens_limit: int = 4096
    max_body_bytes: int = 1 << 20


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[list[int], list[str]]:
    """Messages -> prompt ids and extra stop strings; the one seam to the chat renderer.

    A tokenizer without a chat template gets a plain transcript, which stops at the next "\\nUser:"."""
    ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
    return ids, transcript_stops(tokenizer)


def completion_prompt(tokenizer, prompt: str) -> list[int]:
    """A text prompt as `generate_text` encodes it: BOS (if any), then the text."""
    bos = tokenizer.bos_id
    return ([bos] if bos is not None else []) + tokenizer.encode_ordinary(prompt)


class OpenAIServer:
    """The app's state and handlers; `create_app` wires it into Starlette."""

    def __init__(self, model, tokenizer, config: ServerConfig, defaults: dict):
        self.model, self.tokenizer, self.config, self.defaults = model, tokenizer, config, defaults
        self.context = model.config.max_seq_len
        self.stop_ids = frozenset(t for t in (model.config.eos_id, tokenizer.eos_id) if t is not None)
        self.metrics = ServerMetrics()
        self.engine = Engine(model, max_batch=config.max_batch, kv_blocks=config.kv_blocks,
                             block_size=config.block_size)  # fmt: skip
        self.worker = EngineWorker(self.engine, self.metrics)
        self.json_vocabulary: JsonVocabulary | None = None  # built on the first JSON-mode request
        self.in_flight = 0  # choices admitted and not yet answered (event-loop thread only)
        self.draining = False
        self.created = oa.now()

    # ---- plumbing --------------------------------------------------------------------------------
    def _check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.config.api_key.encode()):
            raise RequestError("missing or wrong API key — send 'Authorization: Bearer <key>'", status=401,
                               code="invalid_api_key")  # fmt: skip

    async def _read_json(self, request: Request):
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"request body of {declared} bytes exceeds the limit of {limit}", status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"request body exceeds the limit of {limit} bytes", status=413)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:
            raise RequestError(f"malformed JSON body: {exc}"[:300]) from None

    def _prompt(self, req: oa.CompletionRequest) -> tuple[list[int], list[str]]:
        try:
            if req.chat:
                return chat_prompt(self.tokenizer, req.messages)
            if isinstance(req.prompt, str):
                return completion_prompt(self.tokenizer, req.prompt), []
        except ValueError as exc:
            raise RequestError(str(exc), "messages" if req.chat else "prompt") from None
        vocab = self.model.config.vocab_size
        bad = [t for t in req.prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(
                f"token id {bad[0]} in 'prompt' is outside the vocabulary [0, {vocab})", "prompt"
            )
        return list(req.prompt), []

    def _budget(self, req: oa.CompletionRequest, n_prompt: int) -> int:
        name = "max_completion_tokens" if req.chat else "max_tokens"
        limit = self.config.max_tokens_limit
        if req.max_tokens is not None and req.max_tokens > limit:
            raise RequestError(f"'{name}' of {req.max_tokens} exceeds this server's limit of {limit}", name)
        wanted = req.max_tokens if req.max_tokens is not None else min(limit, self.context - n_prompt)
        if n_prompt + max(wanted, 1) > self.context:
            raise RequestError(
                f"this model's context is {self.context} tokens, but the request needs {n_prompt + wanted}: "
                f"{n_prompt} in the prompt + {wanted} in the completion — shorten the prompt or lower '{name}'",
                name,
                code="context_length_exceeded",
            )
        blocks = math.ceil((n_prompt + wanted) / self.config.block_size)
        if blocks > self.config.kv_blocks:
            raise RequestError(
                f"{n_prompt} prompt + {wanted} completion tokens need {blocks} KV blocks, the server has "
                f"{self.config.kv_blocks} — lower '{name}'",
                name,
            )
        return wanted

    def _json_processor(self, budget: int) -> JsonObjectProcessor:
        if self.json_vocabulary is None:
            self.json_vocabulary = JsonVocabulary.from_tokenizer(self.tokenizer, self.model.config.vocab_size)
        return JsonObjectProcessor(self.json_vocabulary, self.stop_ids, budget)

    # ---- completions -----------------------------------------------------------------------------
    async def complete(self, request: Request, chat: bool) -> Response:
        try:
            self._check_key(request)
            if self.draining:
                raise RequestError("the server is shutting down — retry on another instance", status=503)
            req = oa.parse_request(await self._read_json(request), chat=chat)
            if req.model != self.config.model_name:
                raise RequestError(f"model {req.model!r} is not served here — use {self.config.model_name!r}",
                                   "model", status=404, code="model_not_found")  # fmt: skip
            prompt, extra_stops = self._prompt(req)
            budget = self._budget(req, len(prompt))
            params = oa.sampling_params(req, self.defaults, max_new_tokens=budget, stop_ids=self.stop_ids)
            if self.in_flight + req.n > self.config.max_batch + self.config.max_queue:
                raise RequestError("the server's queue is full — retry shortly", status=429)
        except RequestError as exc:
            return error_response(exc)
        except ValueError as exc:  # a SamplingParams check the schema let through
            return error_response(RequestError(str(exc)))

        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = []
        for i in range(req.n):
            choice = oa.choice_params(params, i)
            if req.json_mode:
                choice = replace(choice, logits_processors=(self._json_processor(budget),))
            jobs.append(Job(i, prompt, choice, loop, events))
        choices = [ChoiceText(self.tokenizer, list(req.stop) + extra_stops, params.stop_ids) for _ in jobs]
        self.in_flight += req.n
        for job in jobs:
            self.worker.submit(job)
        exchange = _Exchange(self, req, jobs, choices, events, len(prompt))
        if req.stream:
            return _ReleasingStream(exchange.stream(), exchange.release, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        try:
            return await exchange.collect(request)
        finally:
            exchange.release()

    async def chat_completions(self, request: Request) -> Response:
        return await self.complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self.complete(request, chat=False)

    # ---- the other routes ------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except RequestError as exc:
            return error_response(exc)
        card = {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "lmstack",
                "max_model_len": self.context}  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        if not self.worker.alive():
            return JSONResponse({"status": "engine stopped"}, status_code=500)
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


class _Exchange:
    """One HTTP request's choices in flight: their events in, response objects out."""

    def __init__(
        self, server: OpenAIServer, req, jobs: list[Job], choices: list[ChoiceText], events, n_prompt
    ):
        self.server, self.req, self.jobs, self.choices, self.events = server, req, jobs, choices, events
        self.n_prompt = n_prompt
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        self.created = oa.now()
        self.released = False

    def release(self) -> None:
        """Cancel whatever is unfinished (a client that left) and free the admission slots, once."""
        if self.released:
            return
        self.released = True
        for job, choice in zip(self.jobs, self.choices):
            if not choice.done:
                self.server.worker.cancel(job)
        self.server.in_flight -= len(self.jobs)

    async def _next(self) -> tuple[int, str, list]:
        index, item = await self.events.get()
        if isinstance(item, BaseException):
            raise item
        choice = self.choices[index]
        if choice.done:  # e.g. the engine's "cancelled" after a stop string ended the choice
            return index, "", []
        delta, entries = choice.push(item)
        if choice.stopped_by_string:
            self.server.worker.cancel(self.jobs[index])
        return index, delta, entries

    def _logprobs(self, entries: list) -> dict | None:
        if self.req.logprobs is None:
            return None
        return oa.logprobs_entries(self.server.tokenizer, entries, self.req.chat)

    def _usage(self) -> dict:
        return oa.usage(self.n_prompt * len(self.jobs), sum(len(c.tokens) for c in self.choices))

    async def collect(self, request: Request) -> Response:
        entries: list[list] = [[] for _ in self.jobs]
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while not all(c.done for c in self.choices):
                try:
                    index, _, new = await asyncio.wait_for(self._next(), DISCONNECT_POLL_S)
                    entries[index] += new
                except asyncio.TimeoutError:
                    pass
                if loop.time() - checked >= DISCONNECT_POLL_S:  # tokens may flow without pause: poll by time
                    checked = loop.time()
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; release() cancels the rest
        except ValueError as exc:
            return error_response(RequestError(str(exc)))
        choices = [
            oa.choice_object(self.req, i, c.text, c.finish_reason, self._logprobs(entries[i]), chunk=False)
            for i, c in enumerate(self.choices)
        ]
        return JSONResponse(
            oa.response_object(self.req, self.id, self.created, choices, self._usage(), chunk=False)
        )

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        body = oa.response_object(self.req, self.id, self.created, choices, usage, chunk=True)
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    async def stream(self):
        req = self.req
        try:
            if req.chat:  # the role comes first, as OpenAI sends it
                yield self._chunk([oa.choice_object(req, i, "", None, None, chunk=True, first=True)
                                   for i in range(len(self.jobs))])  # fmt: skip
            while not all(c.done for c in self.choices):
                index, delta, entries = await self._next()
                choice = self.choices[index]
                reason = choice.finish_reason
                if delta or entries or reason:
                    logprobs = self._logprobs(entries) if entries else None
                    yield self._chunk([oa.choice_object(req, index, delta, reason, logprobs, chunk=True)])
            if req.include_usage:
                yield self._chunk([], self._usage())
        except ValueError as exc:
            yield b"data: " + json.dumps(RequestError(str(exc)).body()).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"


class _ReleasingStream(StreamingResponse):
    """A streaming response that releases its request however the stream ends (done, or the client
    disconnecting, which makes Starlette abandon the body iterator)."""

    def __init__(self, content, release, **kwargs):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def error_response(exc: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def create_app(model, tokenizer, config: ServerConfig, *, defaults: dict | None = None) -> Starlette:
    """The ASGI app; its lifespan starts and stops the engine thread. `app.state.server` is the state."""
    server = OpenAIServer(model, tokenizer, config, dict(defaults or {}))

    @asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        try:
            yield
        finally:
            server.worker.stop()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(RequestError(str(exc.detail), status=exc.status_code))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(RequestError(f"internal error: {type(exc).__name__}", status=500))

    routes = [
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})  # fmt: skip
    app.state.server = server
    return app


def serve(app: Starlette, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app on uvicorn until SIGINT/SIGTERM; the first signal drains before exiting."""
    DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level), app.state.server).run()


class DrainingServer(uvicorn.Server):
    """uvicorn, but a first SIGTERM/SIGINT stops admitting (503) and waits for the requests in flight."""

    def __init__(self, config: uvicorn.Config, state: OpenAIServer):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining:  # a second signal: exit now
            return super().handle_exit(sig, frame)
        self.state.draining = True
        threading.Thread(target=self._exit_when_drained, args=(sig, frame), daemon=True).start()

    def _exit_when_drained(self, sig, frame) -> None:
        while self.state.in_flight > 0:
            time.sleep(0.05)
        super().handle_exit(sig, frame)
