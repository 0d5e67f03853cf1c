"""One thread steps the engine; requests reach it through a thread-safe inbox.

The `Engine` is not thread-safe and `step()` is a blocking forward pass, so it lives on its own thread:
the event loop stays free to accept connections and stream tokens while the model runs, and every
request joins the same continuous batch (no lock around generate). Handlers `submit` and `cancel`
`Job`s; the thread applies them between steps and hands each `TokenEvent` back to the job's asyncio
queue with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from lmstack.infer.engine import Engine, TokenEvent
from lmstack.infer.sampling import SamplingParams
from lmstack.serve.metrics import ServerMetrics


@dataclass(eq=False)
class Job:
    """One choice of one HTTP request: its prompt, its params, and where its events go as
    `(index, TokenEvent | Exception)`."""

    index: int
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    request_id: int | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None

    def deliver(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, item))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class EngineWorker:
    def __init__(self, engine: Engine, metrics: ServerMetrics, *, idle_wait_s: float = 0.05):
        self.engine, self.metrics, self.idle_wait_s = engine, metrics, idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._jobs: dict[int, Job] = {}
        self._thread = threading.Thread(target=self._run, name="lmstack-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        self._inbox.put(("submit", job))
        self._wake.set()

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))
        self._wake.set()

    # ---- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if not self.engine.has_work():
                    self._wake.wait(self.idle_wait_s)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as exc:  # a bug or an out-of-memory: fail every waiting request, loudly
            self.error = exc
            for job in self._jobs.values():
                job.deliver(exc)
            raise

    def _drain_inbox(self) -> None:
        changed = False
        while True:
            try:
                action, job = self._inbox.get_nowait()
            except queue.Empty:
                break
            changed = True
            if action == "submit":
                try:
                    job.request_id = self.engine.submit(job.prompt, job.params)
                except ValueError as exc:
                    job.deliver(exc)
                    continue
                self._jobs[job.request_id] = job
                self.metrics.prompt_tokens.inc(len(job.prompt))
            elif job.request_id is not None:
                self.engine.cancel(job.request_id)
        if changed:
            self.metrics.observe_engine(self.engine)

    def _step(self) -> None:
        stats = self.engine.stats
        decoded, preempted = stats["decode_tokens"], stats["preemptions"]
        events = self.engine.step()
        now = time.perf_counter()
        if stats["decode_tokens"] > decoded:
            self.metrics.batch_size.observe(stats["decode_tokens"] - decoded)
        if stats["preemptions"] > preempted:
            self.metrics.preemptions.inc(stats["preemptions"] - preempted)
        for event in events:
            self._dispatch(event, now)
        self.metrics.observe_engine(self.engine)

    def _dispatch(self, event: TokenEvent, now: float) -> None:
        job = self._jobs.get(event.request_id)
        if job is None:
            return
        m = self.metrics
        if event.token is not None:
            m.generation_tokens.inc()
            if job.last_token_at is None:
                m.ttft.observe(now - job.submitted_at)
            else:
                m.itl.observe(now - job.last_token_at)
            job.last_token_at = now
        if event.finished:
            del self._jobs[event.request_id]
            m.e2e.observe(now - job.submitted_at)
            m.success.labels(
                finished_reason="abort" if event.finish_reason == "cancelled" else event.finish_reason
            ).inc()
        job.deliver(event)
