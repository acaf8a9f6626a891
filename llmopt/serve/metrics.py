"""Prometheus metrics of one server (its own registry, so two servers in one process do not mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llmopt_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.queue_depth = Gauge("llmopt_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("llmopt_running_sequences", "Sequences holding a KV slot (prefilling or decoding)",
                             registry=r)
        self.prompt_tokens = Counter("llmopt_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("llmopt_generated_tokens", "Tokens generated", registry=r)
        self.cancelled = Counter("llmopt_cancelled_sequences", "Sequences whose client went away before the end",
                                 registry=r)
        self.ttft = Histogram("llmopt_time_to_first_token_seconds", "From admission to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llmopt_inter_token_latency_seconds", "Between consecutive tokens of one sequence",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.decode_step = Histogram("llmopt_decode_step_seconds", "One batched decode step", buckets=LATENCY_BUCKETS,
                                     registry=r)
        self.batch_size = Histogram("llmopt_decode_batch_size", "Sequences in one decode step", buckets=BATCH_BUCKETS,
                                    registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
