"""Prometheus metrics for the server, in a registry of its own (one per app, so several apps can live in
one process, as they do in the tests)."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds: from a fraction of a millisecond (a short text on a fast core) to a long request on CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TOKEN_BUCKETS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "stableembed"):
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, prefix
        self.prefix = prefix
        self._watched_cache: Any = None
        self.requests = Counter(f"{p}_requests", "Embedding requests answered, by HTTP status", ["status"],
                                registry=r)
        self.rejected = Counter(f"{p}_rejected", "Requests refused before encoding, by reason", ["reason"],
                                registry=r)
        self.texts = Counter(f"{p}_texts", "Texts embedded", registry=r)
        self.tokens = Counter(f"{p}_tokens", "Tokens embedded (after truncation, special tokens included)",
                              registry=r)
        self.inflight = Gauge(f"{p}_inflight_requests", "Embedding requests being handled now", registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "Segments waiting for a batch", registry=r)
        self.queue_texts = Gauge(f"{p}_queue_texts", "Texts waiting for a batch", registry=r)
        self.queue_tokens = Gauge(f"{p}_queue_tokens", "Tokens waiting for a batch", registry=r)
        self.batches_running = Gauge(f"{p}_batches_running", "Batches being encoded now", registry=r)
        self.batch_texts = Histogram(f"{p}_batch_texts", "Texts per dispatched batch", buckets=SIZE_BUCKETS,
                                     registry=r)
        self.batch_tokens = Histogram(f"{p}_batch_tokens", "Tokens per dispatched batch", buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.batch_requests = Histogram(f"{p}_batch_requests", "Requests sharing a dispatched batch",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.queue_wait = Histogram(f"{p}_queue_wait_seconds", "Time a segment waited before its batch ran",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.encode_seconds = Histogram(f"{p}_batch_encode_seconds", "Time to encode one dispatched batch",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram(f"{p}_request_latency_seconds",
                                         "Embedding request latency, body read to response built",
                                         buckets=LATENCY_BUCKETS, registry=r)

    def watch_cache(self, cache: Any) -> None:
        """Export an Encoder's exact cache (runtime/cache.py): hits and misses as counters, entries as a
        gauge, read from `cache.info()` at each scrape. Idempotent for one cache (apps may share Metrics)."""
        if cache is self._watched_cache:
            return
        self.registry.register(_CacheCollector(cache, self.prefix))
        self._watched_cache = cache

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _CacheCollector:
    def __init__(self, cache: Any, prefix: str):
        self.cache, self.prefix = cache, prefix

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        info, p = self.cache.info(), self.prefix
        yield CounterMetricFamily(f"{p}_cache_hits", "Texts answered from the exact cache", value=info.hits)
        yield CounterMetricFamily(f"{p}_cache_misses", "Texts the cache did not hold (run by the model)",
                                  value=info.misses)
        yield GaugeMetricFamily(f"{p}_cache_entries", "Embeddings in the exact cache", value=info.size)
