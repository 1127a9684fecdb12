"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # the *_created series: noise for a scraper of one process
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("voco_requests", "Chat completion requests answered, by HTTP status",
                                ["status"], registry=self.registry)
        self.compressions = Counter("voco_compressions", "Images (or image sets) compressed: cache misses",
                                    registry=self.registry)
        self.cache_hits = Counter("voco_cache_hits", "Requests answered from a cache made earlier, by where it was",
                                  ["source"], registry=self.registry)
        self.cancelled = Counter("voco_requests_cancelled", "Requests whose client went away before the answer ended",
                                 registry=self.registry)
        self.generated = Counter("voco_tokens_generated", "Tokens sampled (end of sequence included)",
                                 registry=self.registry)
        self.prompt = Counter("voco_prompt_tokens", "Prompt positions the model held (compressed)",
                              registry=self.registry)
        self.uncompressed = Counter("voco_uncompressed_prompt_tokens",
                                    "Prompt positions with every vision token", registry=self.registry)
        self.cache_bytes = Gauge("voco_cache_bytes", "Keys/values held by the server's in-memory caches, in bytes",
                                 registry=self.registry)
        self.batch_size = Histogram("voco_batch_size", "Rows decoded together, per decoding step",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.ttft = Histogram("voco_time_to_first_token_seconds", "From request received to its first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)

    # what the engine reports
    def cache(self, where: str) -> None:
        if where == "compressed":
            self.compressions.inc()
        else:
            self.cache_hits.labels(source=where).inc()

    def prompt_tokens(self, compressed: int, uncompressed: int) -> None:
        self.prompt.inc(compressed)
        self.uncompressed.inc(uncompressed)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens_generated(self, count: int) -> None:
        self.generated.inc(count)

    def request_cancelled(self, generated: int) -> None:
        self.cancelled.inc()
        self.generated.inc(generated)

    def batch(self, rows: int) -> None:
        self.batch_size.observe(rows)

    def request(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServerMetrics"]
