"""Prometheus metrics of one server, in a registry of its own (two servers in one process don't collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("ryzen_serve_requests_running", "Requests decoding in the batch", registry=r)
        self.waiting = Gauge("ryzen_serve_requests_waiting", "Requests queued for a batch slot", registry=r)
        self.prompt_tokens = Counter("ryzen_serve_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("ryzen_serve_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("ryzen_serve_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.ttft = Histogram("ryzen_serve_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("ryzen_serve_inter_token_latency_seconds", "Time between a request's tokens",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("ryzen_serve_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.occupancy = Histogram("ryzen_serve_batch_occupancy", "Sequences in each decode step",
                                   buckets=tuple(range(1, max_batch + 1)), registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
