"""Prometheus metrics served at GET /metrics (one registry per app, so tests stay independent)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100)


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mllm_backend_requests", "HTTP requests answered", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "mllm_backend_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "mllm_backend_predictions", "Task predictions returned to Label Studio", registry=self.registry
        )
        self.regions = Counter(
            "mllm_backend_regions",
            "Regions labelled (box: a drawn box; image: a whole-image control)",
            ["kind"],
            registry=self.registry,
        )
        self.task_errors = Counter(
            "mllm_backend_task_errors",
            "Tasks answered with an error instead of a prediction",
            ["reason"],
            registry=self.registry,
        )
        self.model_seconds = Histogram(
            "mllm_backend_model_seconds",
            "Model time per /predict request",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cascade_skipped = Counter(
            "mllm_backend_cascade_skipped",
            "Boxes the trained classifier labelled instead of the MLLM (CASCADE=on)",
            registry=self.registry,
        )
        self.out_of_set = Counter(
            "mllm_backend_out_of_set_answers",
            "Open-world answers no label was similar enough to (kept as the result's out_of_set suggestion)",
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "mllm_backend_model_ready", "1 when the model is loaded and serving", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
