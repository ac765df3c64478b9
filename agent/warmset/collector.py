"""The warm set's Prometheus series (exported on the agent's /metrics and at ``GET /v1/warm-set/metrics``)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.warmset.reconciler import STATES, WarmSet


class WarmSetCollector:
    """Prometheus collector for the warm set (agent/metrics.py registers it on the agent's /metrics).

    Without a warm set (``None``) the set-wide series are still exported (no entries,
    the file valid), so alert rules over them evaluate on every agent.
    """

    def __init__(self, warm_set: WarmSet | None) -> None:
        self.warm_set = warm_set

    def collect(self) -> Iterator[Metric]:
        # Read from the warm set's objects (not its JSON status): the same values, typed.
        ws = self.warm_set
        counts = ws.state_counts() if ws is not None else dict.fromkeys(STATES, 0)
        entries = list(ws.entries.values()) if ws is not None else []
        now_wall = time.time()
        by_state = GaugeMetricFamily("warmstart_warm_set_entries", "Warm-set entries by state", labels=["state"])
        for state_name, n in counts.items():
            by_state.add_metric([state_name], n)
        yield by_state
        since = GaugeMetricFamily(
            "warmstart_warm_set_entry_seconds_since_ready",
            "Seconds since the entry was last ready (0 while ready; since it was listed if never ready)",
            labels=["ref"],
        )
        state = GaugeMetricFamily("warmstart_warm_set_entry_state", "1 for the entry's current state, else 0",
                                  labels=["ref", "state"])
        for e in entries:
            since.add_metric([e.spec.ref], e.seconds_since_ready(now_wall))
            for s in STATES:
                state.add_metric([e.spec.ref, s], 1 if e.state == s else 0)
        yield since
        yield state
        rollovers = CounterMetricFamily("warmstart_warm_set_rollovers", "Completed revision rollovers")
        rollovers.add_metric([], ws.rollovers if ws is not None else 0)
        yield rollovers
        errors = CounterMetricFamily("warmstart_warm_set_file_errors", "Warm-set files rejected (last good kept)")
        errors.add_metric([], ws.file_errors if ws is not None else 0)
        yield errors
        valid = GaugeMetricFamily("warmstart_warm_set_file_valid",
                                  "0 while the warm-set file on disk is rejected (the last good set is in force)")
        valid.add_metric([], 0 if ws is not None and ws.file_error else 1)
        yield valid
        gen = GaugeMetricFamily("warmstart_warm_set_generation", "Good warm-set files applied since start")
        gen.add_metric([], ws.generation if ws is not None else 0)
        yield gen


def metrics_text(warm_set: WarmSet) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WarmSetCollector(warm_set))
    return generate_latest(registry)
