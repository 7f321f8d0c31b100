"""Prometheus metrics for one app instance (a registry per app, so tests and several apps never share counters)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class ServiceMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self):
        self.requests = Counter("catdog_requests_total", "HTTP requests by route and status", ["route", "status"], registry=self.registry)
        self.latency = Histogram("catdog_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
        self.batch_size = Histogram("catdog_batch_size", "images per inference batch", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.queue_depth = Gauge("catdog_queue_depth", "images waiting for inference", registry=self.registry)
        self.images = Counter("catdog_images_total", "images classified", registry=self.registry)
        # A drift signal: the share of uploads unlike the training photos, watched over time.
        self.out_of_distribution = Counter("catdog_out_of_distribution_total",
                                           "answers that said neither: the photo is unlike the training photos",
                                           registry=self.registry)
