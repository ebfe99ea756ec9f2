"""`GET /metrics`: the engines' gauges, counters and latency histograms for Prometheus.

Gauges and counters are read from each engine's stats snapshot at scrape time; latency
observations (time to first token, inter-token latency) the engine recorded since the
last scrape are folded into the histograms then.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sirocco.serving.registry import ModelRegistry

router = APIRouter(tags=["metrics"])

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineCollector(Collector):
    """Reads every served engine's stats when Prometheus scrapes."""

    def __init__(self, models: ModelRegistry) -> None:
        self.models = models

    def _engines(self) -> Iterator[tuple[str, object]]:
        for served in self.models.all():
            if served.engine is not None and not served.fine_tuned:
                yield served.id, served.engine

    def collect(self) -> Iterator:
        gauges = {
            "running_seqs": "Sequences in the running batch",
            "waiting_seqs": "Sequences waiting to be scheduled",
            "kv_blocks_used": "KV cache blocks in use",
            "kv_blocks_free": "KV cache blocks free",
            "prefix_cache_hit_rate": "Cached prompt tokens / prompt tokens looked up",
        }
        counters = {
            "prompt_tokens": "Prompt tokens processed",
            "cached_prompt_tokens": "Prompt tokens served from the prefix cache",
            "generated_tokens": "Tokens generated",
            "preemptions": "Sequences preempted (recomputed later) for lack of KV blocks",
        }
        families = {name: GaugeMetricFamily(f"sirocco_{name}", doc, labels=["model"])
                    for name, doc in gauges.items()}
        families.update({name: CounterMetricFamily(f"sirocco_{name}", doc, labels=["model"])
                         for name, doc in counters.items()})
        admission = {
            "rejected_requests": "Requests refused with a 429: admission was full (--max-waiting)",
            "timed_out_requests": "Requests ended by --request-timeout",
            "failed_requests": "Requests ended by a step that raised for them",
        }
        extra = {name: CounterMetricFamily(f"sirocco_{name}", doc, labels=["model"])
                 for name, doc in admission.items()}
        for model_id, engine in self._engines():
            stats = engine.stats()
            for name, family in families.items():
                family.add_metric([model_id], float(getattr(stats, name)))
            for name, family in extra.items():
                family.add_metric([model_id], float(getattr(engine, name, 0)))
        yield from families.values()
        yield from extra.values()


class Metrics:
    """The Prometheus registry of one app."""

    def __init__(self, models: ModelRegistry) -> None:
        self.models = models
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(models))
        self.ttft = Histogram("sirocco_time_to_first_token_seconds", "Time to first token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("sirocco_inter_token_latency_seconds", "Time between tokens",
                             ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        for served in self.models.all():
            if served.engine is None or served.fine_tuned:
                continue
            ttft, itl = served.engine.pop_latencies()
            for value in ttft:
                self.ttft.labels(served.id).observe(value)
            for value in itl:
                self.itl.labels(served.id).observe(value)
        return generate_latest(self.registry)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Engine gauges, counters and latency histograms in the Prometheus text format."""
    state = request.app.state
    if not hasattr(state, "metrics"):
        state.metrics = Metrics(state.sirocco.registry)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
