"""Prometheus metrics, in a registry of the service's own (two apps in one process do not collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

JOB_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _JobsByStatus:
    """Read from the store at scrape time, so the numbers are those on disk."""

    def __init__(self, counts: Callable[[], dict[str, int]]):
        self.counts = counts

    def collect(self):
        family = GaugeMetricFamily("ldm_jobs", "Jobs in the store by status", labels=["status"])
        for status, n in self.counts().items():
            family.add_metric([status], n)
        yield family


class Metrics:
    def __init__(self, counts: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge("ldm_queue_length", "Jobs waiting to run", registry=r)
        self.job_seconds = Histogram("ldm_job_seconds", "Wall time of a job", ["status"], buckets=JOB_BUCKETS,
                                     registry=r)  # fmt: skip
        self.step_seconds = Histogram("ldm_step_seconds", "Wall time of one sampling step", buckets=STEP_BUCKETS,
                                      registry=r)  # fmt: skip
        self.images = Counter("ldm_images", "Images made", registry=r)
        self.rejected = Counter("ldm_rejected_requests", "Requests refused", ["reason"], registry=r)
        r.register(_JobsByStatus(counts))
        self._counts = counts

    def job_finished(self, status: str, seconds: float, images: int) -> None:
        self.job_seconds.labels(status).observe(seconds)
        self.images.inc(images)

    def render(self) -> bytes:
        self.queue_length.set(self._counts()["queued"])
        return generate_latest(self.registry)
