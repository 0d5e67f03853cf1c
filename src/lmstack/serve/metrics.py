"""Prometheus metrics of one server, under vLLM's names with an `lmstack:` prefix.

Each app owns its `CollectorRegistry` (never prometheus_client's global one), so two servers in one
process, as in the tests, do not share counters. The engine thread updates everything; `/metrics`
only renders the registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                     7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge("lmstack:num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("lmstack:num_requests_waiting", "Requests waiting for a batch slot.", registry=r)
        self.kv_usage = Gauge("lmstack:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                              registry=r)  # fmt: skip
        self.preemptions = Counter(
            "lmstack:num_preemptions", "Sequences preempted for KV blocks.", registry=r
        )
        self.prompt_tokens = Counter("lmstack:prompt_tokens", "Prompt tokens submitted.", registry=r)
        self.generation_tokens = Counter("lmstack:generation_tokens", "Tokens generated.", registry=r)
        self.success = Counter("lmstack:request_success", "Finished requests (one per choice).",
                               ["finished_reason"], registry=r)  # fmt: skip
        self.ttft = Histogram("lmstack:time_to_first_token_seconds", "Time to first token.",
                              buckets=LATENCY_BUCKETS_S, registry=r)  # fmt: skip
        self.itl = Histogram("lmstack:inter_token_latency_seconds", "Time between two tokens of a request.",
                             buckets=LATENCY_BUCKETS_S, registry=r)  # fmt: skip
        self.e2e = Histogram("lmstack:e2e_request_latency_seconds", "Submission to last token.",
                             buckets=LATENCY_BUCKETS_S, registry=r)  # fmt: skip
        self.batch_size = Histogram("lmstack:batch_size", "Sequences decoded together in one engine step.",
                                    buckets=BATCH_BUCKETS, registry=r)  # fmt: skip

    def observe_engine(self, engine) -> None:
        """Gauges from the engine's state (called by the engine thread after each change)."""
        self.running.set(len(engine.running))
        self.waiting.set(len(engine.waiting))
        allocator = engine.cache.allocator
        self.kv_usage.set(allocator.used / allocator.n_blocks)

    def render(self) -> bytes:
        return generate_latest(self.registry)
