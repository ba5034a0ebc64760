"""Prometheus metrics on the server's own registry (several apps in one process never collide).

With several HTTP workers (`nova serve --http-workers N`) every worker writes its metrics to files in
`PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode, set up by `serve/workers.py`) and
`/metrics`, answered by any one worker, adds up all of them: counters and histograms summed, queue and
in-flight gauges summed over live workers. The collectors read at each scrape (prefix cache, batch cost,
wake lateness) are the answering worker's.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.exposed = r  # what /metrics renders
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            self.exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposed)
        self.requests = Counter(
            "nova_http_requests", "HTTP requests by route, method and status", ["route", "method", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "nova_http_request_duration_seconds", "HTTP request latency by route", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.rejected = Counter(
            "nova_rejected_requests", "requests refused, by reason", ["reason"], registry=r
        )
        self.queue_rows = Gauge("nova_queue_rows", "rows waiting for the model", registry=r,
                                multiprocess_mode="livesum")
        self.queue_tokens = Gauge("nova_queue_tokens", "tokens waiting for the model", registry=r,
                                  multiprocess_mode="livesum")
        self.inflight_requests = Gauge(
            "nova_inflight_requests", "embedding requests being handled", registry=r, multiprocess_mode="livesum"
        )
        self.batch_rows = Histogram(
            "nova_batch_rows", "rows per model batch", buckets=_ROW_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "nova_batch_tokens", "tokens per model batch (sum of row lengths)", buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_padded_tokens = Histogram(
            "nova_batch_padded_tokens", "padded tokens per model batch (rows x longest row)",
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.batch_requests = Histogram(
            "nova_batch_requests", "distinct requests per model batch", buckets=_ROW_BUCKETS, registry=r
        )
        self.model_busy = Counter(
            "nova_model_busy_seconds", "seconds the model spent in forwards (on a GPU, the device's time for each "
            "forward and its copy to the host; each HTTP worker counts its rows' share of a forward it shared with "
            "other workers' batches)", registry=r,
        )
        self.model_forwards = Counter(
            "nova_model_forwards", "forwards the model ran (a forward shared by several HTTP workers' batches counts "
            "in each as its share of the rows)", registry=r,
        )
        self.model_thread_cpu = Counter(
            "nova_model_thread_cpu_seconds", "CPU seconds of the thread that launches forwards, in launches (on a "
            "GPU: the host's work per batch, the time it holds Python's GIL, the wait for the vectors being on "
            "another thread; on a CPU: the forward's compute); shared forwards count as nova_model_busy_seconds "
            "does", registry=r,
        )
        self.batch_latency = Histogram(
            "nova_batch_duration_seconds", "model forward time per batch", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # A request's stages (TEI's te_request_{tokenization,queue,inference}_duration): where its time goes.
        self.request_preparation = Histogram(
            "nova_request_preparation_seconds", "embedding request: body parsed, adapters routed, images fetched "
            "and decoded, items tokenized", buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.request_inference = Histogram(
            "nova_request_inference_seconds", "embedding request: from its rows queued to the last row's vector "
            "back (queue, batching and the model)", buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.request_rendering = Histogram(
            "nova_request_rendering_seconds", "embedding request: response body encoded", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "nova_queue_wait_seconds", "time a row waits in the queue", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.adapter_rows = Counter(
            "nova_adapter_rows", "rows embedded, by adapter", ["adapter"], registry=r
        )
        self.items = Counter(
            "nova_items", "items embedded, by modality", ["modality"], registry=r
        )
        self.tokens = Counter("nova_tokens", "tokens embedded", registry=r)
        self.rows_cancelled = Counter(
            "nova_rows_cancelled", "queued rows dropped because their client went away", registry=r
        )
        self.adapters_loaded = Gauge("nova_adapters_loaded", "adapters resident in the model", registry=r,
                                     multiprocess_mode="livemax")
        self.model_ready = Gauge("nova_model_ready", "1 once the model is loaded", registry=r,
                                 multiprocess_mode="livemin")

    def register(self, collector) -> None:
        """A collector read at each scrape (this process's own values, never summed across workers)."""
        self.exposed.register(collector)

    def watch_prefix_cache(self, stats) -> None:
        """Export the model's instruction prefix cache counters, read at each scrape."""

        class _Collector:
            def collect(self):
                s = stats()
                for name in ("hits", "misses", "evictions"):
                    yield CounterMetricFamily(f"nova_prefix_cache_{name}", f"prefix cache {name}", value=s[name])
                yield GaugeMetricFamily("nova_prefix_cache_bytes", "bytes held by the prefix cache", value=s["bytes"])
                yield GaugeMetricFamily("nova_prefix_cache_entries", "prefixes held", value=s["entries"])

        self.register(_Collector())

    def watch_batch_cost(self, cost) -> None:
        """Export the batcher's fitted forward cost (`BatchCostModel`), read at each scrape: whether it splits
        batches follows from these terms (no fit yet, or no per-token cost: nothing is split)."""

        class _Collector:
            def collect(self):
                terms = {"fixed": cost.a, "per_token": cost.b, "per_adapter": cost.c if cost.b is not None else None}
                family = GaugeMetricFamily("nova_batch_cost_seconds", "fitted forward cost: seconds = fixed + "
                                           "per_token x padded tokens + per_adapter x adapters (absent until fitted)",
                                           labels=["term"])
                for term, value in terms.items():
                    if value is not None:
                        family.add_metric([term], value)
                yield family

        self.register(_Collector())

    def watch_wake_lateness(self, lateness) -> None:
        """Export how early the batcher takes the next batch to make up for its late wake-ups (`WakeLateness`)."""

        class _Collector:
            def collect(self):
                yield GaugeMetricFamily("nova_batcher_wake_lateness_seconds", "how much earlier than one collation "
                                        "before the running forward's predicted end the batcher takes the next batch, "
                                        "because its timed wake-ups have been running late",
                                        value=lateness.allowance())

        self.register(_Collector())

    def watch_host_lead(self, host_lead) -> None:
        """Export how long before the running forward's predicted end the next batch is handed over
        (`Dispatcher.host_lead`: its preparation, plus its launch where launches run ahead of a device)."""

        class _Collector:
            def collect(self):
                yield GaugeMetricFamily("nova_batcher_host_lead_seconds", "how long before the running forward's "
                                        "predicted end the next batch is handed to the model: its measured "
                                        "preparation (from hand-off to collated, in the model process), plus "
                                        "its launch where launches run ahead of a device (a GPU)",
                                        value=host_lead())

        self.register(_Collector())

    def render(self) -> bytes:
        return generate_latest(self.exposed)
