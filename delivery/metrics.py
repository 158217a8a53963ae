"""
The Prometheus metrics every process exports, declared once (``prometheus_client``).

Counters and histograms that describe the work live on prometheus_client's default
registry, next to its process and Python collectors: the scheduler, the relay, the
dispatcher and the handler workers increment them once per batch (``inc(n)``), not
per row. The API's HTTP metrics belong to each app (:class:`HttpMetrics`), so two
apps in one process (tests) count apart. Gauges that need a query (outbox backlog,
consumer lag, ...) are not here: a collector computes them at scrape time
(:mod:`delivery.ops`).

With ``PROMETHEUS_MULTIPROC_DIR`` set (several worker processes behind one port),
prometheus_client keeps the values in files in that directory and :func:`exposition`
merges every process's; the process collectors then describe the scraped process only.

``docs/metrics.md`` lists every metric with its labels.
"""

import os
from collections.abc import Iterable, Mapping

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

from delivery import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format every ``/metrics`` answers in."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Request and send latencies, in seconds."""

LATENESS_BUCKETS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
"""How late a fire was written, in seconds; 0 is "on time or planned ahead"."""

COMPOSER_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)
"""Composition takes microseconds (template) to seconds (LLM)."""


# A ``*_created`` gauge per series doubles the exposition for a value Prometheus
# derives itself (counter resets).
disable_created_metrics()  # type: ignore[no-untyped-call]

# --- build ---------------------------------------------------------------------------

BUILD_INFO = Gauge(
    "delivery_build_info",
    "Always 1; the version label names the running build.",
    ["version"],
    multiprocess_mode="max",
)
BUILD_INFO.labels(version=__version__).set(1)

# --- scheduler -----------------------------------------------------------------------

SCHEDULER_FIRES = Counter(
    "delivery_scheduler_fires",
    "Fire rows the scheduler wrote, by outcome (fired: a message follows; skipped: "
    "recorded with a reason, see delivery_scheduler_fire_skips_total).",
    ["outcome"],
)
SCHEDULER_FIRE_SKIPS = Counter(
    "delivery_scheduler_fire_skips",
    "Cadence ticks that produced no message, by reason (active window, DST gap, "
    "missed_max_lateness, unitemised: counted past the per-pass cap).",
    ["reason"],
)
SCHEDULER_FIRE_LATENESS = Histogram(
    "delivery_scheduler_fire_lateness_seconds",
    "How long after its instant each schedule's oldest fire of a pass was written; "
    "fires planned ahead of their instant count as 0.",
    buckets=LATENESS_BUCKETS,
)
SCHEDULER_SCHEDULES = Counter(
    "delivery_scheduler_schedules",
    "Claimed schedules that did not fire normally, by outcome (stale: changed by the "
    "API during the pass; failed: cadence rejected; disabled: ended).",
    ["outcome"],
)
SCHEDULER_WAKEUPS = Counter(
    "delivery_scheduler_wakeups_due",
    "Wakeups the scheduler queued for the dispatcher.",
)

# --- outbox relay --------------------------------------------------------------------

OUTBOX_MESSAGES = Counter(
    "delivery_outbox_messages",
    "Outbox rows the relay handled, by result (published, duplicate: JetStream had "
    "it already, failed: not acknowledged, retried later).",
    ["result"],
)

# --- consumers (dispatcher and handler workers) ----------------------------------------

CONSUMER_MESSAGES = Counter(
    "delivery_consumer_messages",
    "NATS messages a consumer settled, by consumer and result (acked, nacked: the "
    "batch failed and is redelivered, terminated: undecodable).",
    ["consumer", "result"],
)

# --- dispatcher ----------------------------------------------------------------------

DISPATCH_MESSAGES = Counter(
    "delivery_dispatch_messages",
    "Sources the dispatcher processed, by outcome (created, failed_generation, "
    "duplicate: a redelivery, skipped: cancelled or missing source).",
    ["outcome"],
)
DISPATCH_HANDED = Counter(
    "delivery_dispatch_handed",
    "Fires and trigger events the scheduler and the API handed to the dispatcher in "
    "their own process instead of "
    "through JetStream, by result (processed; failed: left for the outbox relay).",
    ["result"],
)
DISPATCH_REDELIVERED = Counter(
    "delivery_dispatch_redelivered",
    "Messages JetStream delivered to the dispatcher more than once, by source kind.",
    ["kind"],
)
COMPOSER_DURATION = Histogram(
    "delivery_composer_duration_seconds",
    "Time to compose one message, by composer (the template composer is timed per "
    "batch and recorded as the batch's mean).",
    ["composer"],
    buckets=COMPOSER_BUCKETS,
)
COMPOSER_FAILURES = Counter(
    "delivery_composer_failures",
    "Compositions that failed (kept as failed_generation), by composer.",
    ["composer"],
)

# --- handlers ------------------------------------------------------------------------

WEBHOOK_DELIVERIES = Counter(
    "delivery_webhook_deliveries",
    "Webhook delivery attempts settled, by outcome (delivered, retry, dead, skipped) "
    "and HTTP status class of the receiver's answer (2xx..5xx, none: no answer).",
    ["outcome", "status_class"],
)
WEBHOOK_DURATION = Histogram(
    "delivery_webhook_attempt_duration_seconds",
    "Time of one webhook POST, from connect to the answer.",
    buckets=LATENCY_BUCKETS,
)
WEBHOOK_ENDPOINTS_DISABLED = Counter(
    "delivery_webhook_endpoints_disabled",
    "Webhook endpoints disabled after a permanent failure (410 Gone, ...).",
)
CHANNEL_SENDS = Counter(
    "delivery_channel_sends",
    "Push, email and SMS attempts, by provider (fcm, email, sms) and outcome (sent, "
    "failed, skipped).",
    ["provider", "outcome"],
)


class HttpMetrics:
    """
    The API's HTTP metrics on a registry of their own (one per app).

    Attributes:
        registry: where the metrics below are registered.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "delivery_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "delivery_http_request_duration_seconds",
            "Time to answer a request, by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "delivery_http_requests_in_flight",
            "Requests being answered now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.replays = Counter(
            "delivery_http_idempotent_replays",
            "Requests answered from a recorded Idempotency-Key answer, by route template.",
            ["route"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "delivery_http_auth_failures",
            "Requests refused 401 (missing, malformed, unknown or revoked key, or a bad "
            "operator token), by route template.",
            ["route"],
            registry=self.registry,
        )


def multiprocess_dir() -> str | None:
    """prometheus_client's shared directory when several processes serve one port."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition(
    registries: Iterable[CollectorRegistry] = (), collectors: Iterable[Collector] = ()
) -> bytes:
    """
    Every metric of this process in the Prometheus text format: the default registry,
    ``registries`` (an app's HTTP metrics) and ``collectors`` (scrape-time gauges).

    With ``PROMETHEUS_MULTIPROC_DIR`` the counters and histograms of every process
    sharing the directory are merged instead of this process's alone.
    """
    parts: list[bytes] = []
    if multiprocess_dir():
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        parts.append(generate_latest(merged))
    else:
        parts.append(generate_latest(REGISTRY))
        parts.extend(generate_latest(r) for r in registries)
    scraped = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        scraped.register(collector)
    parts.append(generate_latest(scraped))
    return b"".join(parts)


def status_class(code: int | None) -> str:
    """``2xx`` .. ``5xx`` for an HTTP status, ``none`` when there was no answer."""
    if not code or code < 100 or code > 599:
        return "none"
    return f"{code // 100}xx"


def inc_each(counter: Counter, counts: Mapping[str, int]) -> None:
    """Add each count to the counter's child of that one label value."""
    for label, n in counts.items():
        if n:
            counter.labels(label).inc(n)
