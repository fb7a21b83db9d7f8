"""Prometheus metrics, in a registry of the app's own (several apps in one process never clash)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "phototag_requests", "HTTP requests answered.", ["route", "method", "status"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "phototag_request_seconds", "Time to answer an HTTP request.", ["route", "method"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.decode = Histogram(
            "phototag_decode_seconds", "Time to decode and preprocess one photo.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.decode_failures = Counter(
            "phototag_decode_failures", "Photos refused at decoding, by error code.", ["code"],
            registry=r,
        )  # fmt: skip
        self.inference = Histogram(
            "phototag_inference_seconds", "Time of one batched forward pass.", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "phototag_batch_size", "Photos per forward pass.", ["model"],
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "phototag_queue_depth", "Photos waiting for inference.", registry=r
        )
        self.model_loads = Counter(
            "phototag_model_loads", "Checkpoint loads, by model and result (ok or failed).",
            ["model", "result"], registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "phototag_model_info", "1 for each served model and version.",
            ["model", "name", "version", "device"], registry=r,
        )  # fmt: skip

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def observe_batch(self, model_id: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model_id).observe(size)
        self.inference.labels(model_id).observe(seconds)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def model_loaded(self, model_id: str, card_name: str, version: str, device: str) -> None:
        self.model_loads.labels(model_id, "ok").inc()
        self.model_info.labels(model_id, card_name, version, device).set(1)

    def model_refused(self, model_id: str) -> None:
        self.model_loads.labels(model_id, "failed").inc()

    def model_unloaded(self, model_id: str, card_name: str, version: str, device: str) -> None:
        self.model_info.remove(model_id, card_name, version, device)

    def render(self) -> bytes:
        return generate_latest(self.registry)
