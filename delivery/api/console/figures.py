"""
The Health page's live figures, read from the Prometheus text the service exports at
``/metrics`` (the same rendering, :func:`delivery.ops.render_metrics`), so the page and
a scrape never disagree.

Counters only grow, so "fires in the last hour" is the difference between now and the
oldest sample this process kept from the last hour (:class:`FireSamples`); until the
console has been up an hour the page says over how long it was measured.
"""

import math
import time
from collections import deque
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

HOUR_S = 3600.0


@dataclass(frozen=True, slots=True)
class Figures:
    """What the Health page shows; ``None`` where this process does not export it."""

    fires_total: float
    skips_total: float
    lateness_p99_s: float | None
    lateness_count: float
    outbox_backlog: float | None
    webhook_deliveries: dict[str, float]


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` (cumulative buckets)."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    wanted = q * total
    for bound, count in buckets:
        if count >= wanted:
            return bound
    return buckets[-1][0]


def read_figures(text: str) -> Figures:
    """The figures in one rendering of ``/metrics``."""
    fires = skips = lateness_count = 0.0
    backlog: float | None = None
    buckets: list[tuple[float, float]] = []
    webhooks: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "delivery_scheduler_fires_total":
                if labels.get("outcome") == "fired":
                    fires += value
                else:
                    skips += value
            elif name == "delivery_scheduler_fire_lateness_seconds_bucket":
                bound = labels.get("le", "+Inf")
                buckets.append((math.inf if bound == "+Inf" else float(bound), value))
            elif name == "delivery_scheduler_fire_lateness_seconds_count":
                lateness_count = value
            elif name == "delivery_outbox_backlog":
                backlog = (backlog or 0.0) + value
            elif name == "delivery_webhook_deliveries_total":
                outcome = labels.get("outcome", "?")
                webhooks[outcome] = webhooks.get(outcome, 0.0) + value
    buckets.sort()
    return Figures(
        fires_total=fires,
        skips_total=skips,
        lateness_p99_s=_quantile(buckets, 0.99),
        lateness_count=lateness_count,
        outbox_backlog=backlog,
        webhook_deliveries=webhooks,
    )


class FireSamples:
    """
    (monotonic time, fires so far) pairs of the last hour, for a windowed count.
    """

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque()
        self._now = time.monotonic

    def add(self, total: float) -> tuple[float, float]:
        """
        Record ``total`` now; returns (fires since the oldest sample of the last hour,
        seconds that covers).
        """
        now = self._now()
        self._samples.append((now, total))
        # Keep the newest sample that is at least an hour old as the baseline.
        while len(self._samples) > 1 and self._samples[1][0] <= now - HOUR_S:
            self._samples.popleft()
        base_at, base = self._samples[0]
        return max(0.0, total - base), now - base_at
