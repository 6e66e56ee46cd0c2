"""Prometheus metrics, named after vLLM's where they mean the same (``atlas:`` instead of ``vllm:``).

Latencies the server sees (time to first token, inter-token latency, end to end) are histograms it
observes per request; the runtime's, the store's and the cache's counters are read at scrape time
by a collector, so they are never out of step with the objects that own them. Each app has its own
registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from atlas.engine.store import LATENCY_BUCKETS_S, LatencyStats

if TYPE_CHECKING:
    from .dependencies import Services

#: Seconds; TTFT includes the prompt's prefill, so the buckets reach far.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0,
               600.0, 1800.0)
RATE_BUCKETS = (100.0, 1e3, 5e3, 1e4, 2.5e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2.5e6, 5e6)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The app's metrics and their registry."""

    def __init__(self, services: Callable[[], Services | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("atlas:time_to_first_token_seconds", "Time from request to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("atlas:inter_token_latency_seconds", "Time between two generated tokens.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("atlas:e2e_request_latency_seconds", "Generation request time, end to end.",
                             buckets=E2E_BUCKETS, registry=r)
        self.ingest_seconds = Histogram("atlas:ingest_request_seconds", "Ingest request time.",
                                        buckets=E2E_BUCKETS, registry=r)
        self.ingest_rate = Histogram("atlas:ingest_tokens_per_second", "Ingest speed of each request.",
                                     buckets=RATE_BUCKETS, registry=r)
        self.prompt_tokens = Counter("atlas:prompt_tokens", "Prompt tokens of generation requests.",
                                     registry=r)
        self.generation_tokens = Counter("atlas:generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter("atlas:request_success", "Finished generation requests.",
                                       ["finished_reason"], registry=r)
        self.session_exports = Counter("atlas:session_exports", "Sessions exported as files.", registry=r)
        self.session_imports = Counter("atlas:session_imports", "Sessions imported from files.", registry=r)
        self.session_import_refusals = Counter(
            "atlas:session_import_refusals", "Session files refused, by the check that failed.", ["reason"],
            registry=r)
        self.http_requests = Counter("atlas:http_requests", "HTTP requests answered.",
                                     ["method", "route", "status"], registry=r)
        r.register(_EngineCollector(services))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _histogram(name: str, doc: str, stats: LatencyStats) -> HistogramMetricFamily:
    """A store LatencyStats (non-cumulative buckets) as a Prometheus histogram."""
    buckets, total = [], 0
    for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), stats.buckets, strict=True):
        total += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=stats.total_s)


class _EngineCollector(Collector):
    """Reads the runtime, store and cache counters at scrape time."""

    def __init__(self, services: Callable[[], Services | None]):
        self._services = services

    def describe(self) -> list:
        return []  # dynamic: nothing to check at registration

    def collect(self) -> Iterator:
        services = self._services()
        if services is None:
            return
        rt = services.runtime.stats
        yield GaugeMetricFamily("atlas:num_requests_running", "Requests on the device now.", rt.running)
        yield GaugeMetricFamily("atlas:num_requests_waiting", "Requests admitted, not on the device yet.",
                                max(0, rt.admitted - rt.running))
        yield CounterMetricFamily("atlas:engine_steps", "Device steps run.", rt.steps)
        yield CounterMetricFamily("atlas:engine_decode_tokens", "Tokens fed by decode steps.",
                                  rt.decode_tokens)
        yield CounterMetricFamily("atlas:engine_prefill_tokens", "Tokens fed by ingest and prompt steps.",
                                  rt.ingest_tokens)
        yield CounterMetricFamily("atlas:ingest_tokens", "Document tokens committed into sessions.",
                                  rt.document_tokens)
        yield GaugeMetricFamily("atlas:state_bytes", "Bytes of one session state (the same for any "
                                "length).", services.state_bytes)
        a = services.atlas
        yield GaugeMetricFamily("atlas:model_parameters", "Parameters of the model.", a.parameters)
        yield GaugeMetricFamily("atlas:model_weight_bytes", "Bytes of the model's weights in memory.",
                                a.weight_bytes)
        info = GaugeMetricFamily("atlas:model_info", "The model served (always 1).",
                                 labels=["model", "fingerprint", "dtype", "device"])
        info.add_metric([services.model_id, a.fingerprint[:16], a.dtype_name, str(a.device)], 1)
        yield info
        c = services.runtime.cache.stats
        yield CounterMetricFamily("atlas:cache_hits", "Hot cache hits.", c.hits)
        yield CounterMetricFamily("atlas:cache_misses", "Hot cache misses.", c.misses)
        yield CounterMetricFamily("atlas:cache_evictions", "Hot cache evictions.", c.evictions)
        yield GaugeMetricFamily("atlas:cache_bytes", "Bytes of states in the hot cache.", c.bytes)
        yield GaugeMetricFamily("atlas:cache_entries", "States in the hot cache.", c.entries)
        s = services.store.stats
        yield _histogram("atlas:store_save_seconds", "Store commit latency.", s.saves)
        yield _histogram("atlas:store_load_seconds", "Store load latency.", s.loads)
        yield CounterMetricFamily("atlas:store_saved_bytes", "State bytes committed.", s.saves.bytes)
        yield CounterMetricFamily("atlas:store_loaded_bytes", "State bytes loaded.", s.loads.bytes)
        yield CounterMetricFamily("atlas:store_corrupt", "Loads refused as corrupt.", s.corrupt)
        yield CounterMetricFamily("atlas:store_conflicts", "Writes refused by a lease.", s.conflicts)
        yield CounterMetricFamily("atlas:store_broken_listed", "Sessions listed as broken (metadata "
                                  "failing its checks).", s.broken)
        yield CounterMetricFamily("atlas:store_restarts", "Times the embedded Redis was found dead "
                                  "and started again.", s.restarts)
