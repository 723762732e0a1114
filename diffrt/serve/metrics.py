"""Prometheus metrics of one server (its own registry, so two apps in one process never share counters)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# seconds: a tiny model's step is a millisecond, a large one's batch minutes
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# the pipeline's stage timings (PipelineOutput.timings) and the queue, under the names the metrics use
STAGES = {"queue_wait": "queue_wait", "text_encoder": "text_encoding", "text_encoder_2": "text_encoding",
          "unet": "unet", "vae_decode": "vae", "vae_encode": "vae_encode", "scheduler": "scheduler", "host": "host"}


class _StageHistogram:
    """`stage.labels(package, pipeline_stage).observe(seconds)` with the pipeline's stage names mapped to ours."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram

    def labels(self, package: str, stage: str) -> Histogram:
        return self._histogram.labels(package, STAGES.get(stage, stage))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("diffrt_requests", "HTTP requests by endpoint and status",
                                ("endpoint", "method", "status"), registry=self.registry)
        self.latency = Histogram("diffrt_request_seconds", "HTTP request latency by endpoint", ("endpoint",),
                                 buckets=STAGE_BUCKETS, registry=self.registry)
        self.stage = _StageHistogram(Histogram(
            "diffrt_stage_seconds", "seconds per stage: queue_wait per request; text_encoding, unet, vae per batch",
            ("package", "stage"), buckets=STAGE_BUCKETS, registry=self.registry))
        self.queue_depth = Gauge("diffrt_queue_depth", "requests waiting in the queue", ("package",),
                                 registry=self.registry)
        self.batch_size = Histogram("diffrt_batch_size", "images per pipeline call", ("package",),
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.images = Counter("diffrt_images_generated", "images generated", ("package",), registry=self.registry)
        self.cancelled = Counter("diffrt_requests_cancelled", "requests dropped because their client went away or "
                                 "timed out, by when", ("package", "when"), registry=self.registry)
        # per-request LoRAs (serve.lora_cache): a build opens a pipeline and creates its engines, a hit reuses one
        self.lora_builds = Counter("diffrt_lora_pipeline_builds", "adapted pipelines built for a LoRA set",
                                   ("package",), registry=self.registry)
        self.lora_cache_hits = Counter("diffrt_lora_cache_hits", "batches served by an already built adapted pipeline",
                                       ("package",), registry=self.registry)
        self.lora_evictions = Counter("diffrt_lora_cache_evictions", "adapted pipelines evicted (least recently used)",
                                      ("package",), registry=self.registry)
        self.lora_cached = Gauge("diffrt_lora_cached_pipelines", "adapted pipelines kept (--lora-cache)", ("package",),
                                 registry=self.registry)
