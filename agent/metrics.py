"""Every Prometheus metric the agent exports, served at ``GET /metrics`` on the ``--listen`` port.

One place for all of them (docs/OPERATIONS.md "Metrics" lists them with their
meaning). Two kinds:

- events, counted where they happen through the methods of :class:`Metrics`
  (cache hits and misses, piece fetch durations by source, fetch errors by
  kind, local API errors, bytes handed to local clients);
- state the agent already keeps, read at scrape time by a collector
  (:class:`_StateCollector`): cache used/capacity, the cache filesystem,
  pinned bytes, LRU evictions (``Store.evictions``), bytes from the origin and
  from peers (the fetcher's counters, the same ones ``GET /v1/stats`` shows),
  peers by state, files being filled. No second bookkeeping of those.

Each agent has its own :class:`CollectorRegistry` (never the global one), so
several agents in one process (tests) do not clash.

**Hits and misses** (``kind="model"``) count *pieces*, once per request that
asks this node to make a model whole (``/v1/open``, ``/v1/prefetch`` and a
peer's ``--all-nodes`` prefetch), when the request arrives: a piece is a hit
when this node already holds it verified (a complete blob, or a verified piece
of a file this process is filling), otherwise a miss (it has to come from a
peer or the origin, or is on its way for an earlier request). Pieces are the
``--piece-size`` pieces of each file (a file smaller than a piece is one).
``kind="artifact"`` counts compile artifact bundles per ``/v1/artifacts/get``:
a hit when the bundle was on this node, a miss when it came from a peer or
was found nowhere.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from agent.artifacts.signing import REFUSAL_REASONS
from client.errors import HTTP_STATUS

if TYPE_CHECKING:
    from agent.manifest import FileEntry, Manifest
    from agent.store.store import Store

log = logging.getLogger(__name__)

# The agent process is the only user of prometheus_client here: no `*_created` series
# (they double every counter and no alert or dashboard of ours reads them).
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

SOURCES = ("origin", "peer")
LOOKUP_KINDS = ("model", "artifact")
# Fetch errors, by source and kind (the label values are a closed set; see docs/OPERATIONS.md).
FETCH_ERRORS = {
    "origin": ("transient", "failed"),  # a try failed (retried), a piece gave up after every retry
    # unreachable, hedged away, bytes refused, said no (busy, another piece size; a relay
    # parent that is not getting the piece is not counted: that is normal), the answer ended early, other
    "peer": ("down", "slow", "rejected", "refused", "cut", "error"),
}
# Seconds to fetch one piece (one range request, the try that succeeded).
PIECE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

def _version() -> str:
    try:
        return metadata.version("warmstart")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class Transfers:
    """Bytes and pieces moved, by source: the counters ``agent stats`` shows and /metrics exports.

    Bumped by the parts that move the bytes (agent/fetch/, agent/api/peer.py,
    agent/artifacts/); read here at scrape time and by ``GET /v1/stats``.
    """

    origin_bytes: int = 0
    peer_bytes_received: int = 0
    peer_bytes_served: int = 0
    peer_bytes_relayed: int = 0  # of those, to relay requests (as a parent in a piece's relay tree)
    peer_pieces_rejected: int = 0
    peer_files_repaired: int = 0
    peer_bytes_repaired: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class PeerStates(Protocol):
    """What the collector reads of the membership: how many peers are in each state."""

    def state_counts(self) -> dict[str, int]: ...


class Metrics:
    """The agent's metrics: its registry, the event counters, and the state it reads at scrape time."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.hits = Counter(
            "warmstart_cache_hits",
            "Pieces (kind=model) or bundles (kind=artifact) already on this node when asked for",
            ["kind"], registry=r,
        )
        self.misses = Counter(
            "warmstart_cache_misses",
            "Pieces (kind=model) or bundles (kind=artifact) this node did not hold when asked for",
            ["kind"], registry=r,
        )
        self.piece_seconds = Histogram(
            "warmstart_piece_fetch_duration_seconds", "Seconds to fetch one piece, by source (the successful try)",
            ["source"], buckets=PIECE_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "warmstart_fetches_in_flight", "Piece fetches running now, by source", ["source"], registry=r,
        )
        self.fetch_errors = Counter(
            "warmstart_fetch_errors", "Failed piece fetches, by source and kind", ["source", "kind"], registry=r,
        )
        self.api_errors = Counter(
            "warmstart_api_errors", "Requests answered with an error, by error kind (client/errors.py)",
            ["kind"], registry=r,
        )
        self.stale_serves = Counter(
            "warmstart_stale_serves",
            "Moving references answered with the newest complete cached revision because the origin refused, "
            "failed or did not answer within --resolve-timeout, by scheme",
            ["scheme"], registry=r,
        )
        self.files_without_origin_digest = Counter(
            "warmstart_files_without_origin_digest",
            "Files fetched whose origin gave no digest (no sha256, git blob id, MD5 or CRC32C): checked against "
            "their own bytes only (agent ls / agent verify mark them), by scheme",
            ["scheme"], registry=r,
        )
        for scheme in ("s3", "gs", "az", "hf", "https", "http", "file"):
            self.stale_serves.labels(scheme)
            self.files_without_origin_digest.labels(scheme)
        self.artifact_refused = Counter(
            "warmstart_artifact_refused",
            "Compile-artifact bundles from peers not loaded because --artifact-trust does not trust them, by reason "
            "(unsigned, untrusted_key, bad_signature, digest_mismatch)",
            ["reason"], registry=r,
        )
        for reason in REFUSAL_REASONS:
            self.artifact_refused.labels(reason)
        self.peer_tls_reloads = Counter(
            "warmstart_peer_tls_reloads",
            "Renewed --peer-tls-dir certificate sets seen while running, by result (loaded: new connections use "
            "them; refused: unusable, the previous set stays in use)",
            ["result"], registry=r,
        )
        for result in ("loaded", "refused"):
            self.peer_tls_reloads.labels(result)
        self.served_client_bytes = 0  # exported as warmstart_served_bytes_total{to="client"}
        self.transfers = Transfers()
        self.build_info = Gauge("warmstart_build_info", "Always 1; the agent's version", ["version"], registry=r)
        self.build_info.labels(_version()).set(1)
        for kind in LOOKUP_KINDS:
            self.hits.labels(kind)
            self.misses.labels(kind)
        for kind in HTTP_STATUS:  # every error kind the agent answers with, from 0
            if kind != "agent_unavailable":  # the client's own, when no agent answers
                self.api_errors.labels(kind)
        for source in SOURCES:
            self.piece_seconds.labels(source)
            self.in_flight.labels(source)
            for kind in FETCH_ERRORS[source]:
                self.fetch_errors.labels(source, kind)
        self.state = _StateCollector(self)
        r.register(self.state)

    def watch(
        self, store: Store, fills_in_flight: Callable[[], int], peers: PeerStates | None = None
    ) -> None:
        """From now on, scrapes read the state of ``store``, the fills running and the peers (if any)."""
        self.state.store, self.state.fills_in_flight, self.state.peers = store, fills_in_flight, peers

    def register(self, collector: Any) -> None:
        """Export another part's series (the warm set's collector) on this agent's /metrics."""
        self.registry.register(collector)

    async def refresh(self) -> None:
        """Before a scrape: bring what is computed lazily up to date (a scrape never fails for this)."""
        store = self.state.store
        if store is not None:
            try:
                await store.pinned_digests()  # cached; recomputed after a pin or an eviction changed it
            except Exception:
                log.exception("pinned bytes for /metrics")

    # -- events --------------------------------------------------------------
    def count_lookup(self, manifest: Manifest, verified_pieces: Callable[[FileEntry], int]) -> None:
        """A request to make ``manifest`` whole arrived: count its pieces as hits (held verified) or misses."""
        hits = total = 0
        for entry in manifest.files:
            total += entry.piece_count
            hits += verified_pieces(entry)
        self.hits.labels("model").inc(hits)
        self.misses.labels("model").inc(total - hits)

    def artifact_lookup(self, hit: bool) -> None:
        (self.hits if hit else self.misses).labels("artifact").inc()

    def served_to_client(self, nbytes: int) -> None:
        """Bytes of blobs handed to a local client (it reads them from the cache itself)."""
        self.served_client_bytes += nbytes

    @contextmanager
    def piece_fetch(self, source: str) -> Iterator[None]:
        """Around one try of one piece: in flight while it runs, its duration recorded if it succeeds."""
        started = time.monotonic()
        with self.fetch_running(source):
            yield
        self.piece_fetched(source, time.monotonic() - started)

    @contextmanager
    def fetch_running(self, source: str) -> Iterator[None]:
        """Around one try of a range request for pieces (one, or a span of consecutive ones)."""
        gauge = self.in_flight.labels(source)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def piece_fetched(self, source: str, seconds: float) -> None:
        """One piece arrived whole, ``seconds`` after its first byte was asked for (or the piece before it ended)."""
        self.piece_seconds.labels(source).observe(seconds)

    def fetch_error(self, source: str, kind: str) -> None:
        self.fetch_errors.labels(source, kind).inc()

    def api_error(self, kind: str) -> None:
        self.api_errors.labels(kind).inc()

    # -- exposition ----------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)


# The classic text format generate_latest writes (every Prometheus reads it; our names are plain ASCII).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StateCollector:
    """Metrics read from the agent's own state at scrape time (nothing counted twice)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.store: Store | None = None
        self.fills_in_flight: Callable[[], int] | None = None
        self.peers: PeerStates | None = None

    def collect(self) -> Iterator[Metric]:
        transfers = self.metrics.transfers
        served = CounterMetricFamily(
            "warmstart_served_bytes", "Bytes handed out: to local clients (blobs they then read) and to peers",
            labels=["to"],
        )
        served.add_metric(["client"], self.metrics.served_client_bytes)
        served.add_metric(["peer"], transfers.peer_bytes_served)
        yield served
        if self.store is not None:
            yield from self._store(self.store)
        if self.fills_in_flight is not None:
            yield from self._fetch(transfers, self.fills_in_flight())

    def _store(self, store: Store) -> Iterator[Metric]:
        yield GaugeMetricFamily("warmstart_cache_used_bytes", "Bytes of blobs and partial files in the cache",
                                value=store.used_bytes)
        yield GaugeMetricFamily("warmstart_cache_capacity_bytes", "The cache's --capacity", value=store.capacity)
        yield GaugeMetricFamily("warmstart_cache_blobs", "Complete blobs in the cache", value=store.blob_count)
        pinned = store.pinned_bytes()  # refreshed by Metrics.refresh before each scrape
        if pinned is not None:
            yield GaugeMetricFamily(
                "warmstart_cache_pinned_bytes", "Bytes of blobs of pinned models (never evicted)", value=pinned,
            )
        yield CounterMetricFamily("warmstart_evictions", "Blobs evicted (least recently used) to make room",
                                  value=store.evictions)
        try:
            st = os.statvfs(store.root)
        except OSError:
            return
        yield GaugeMetricFamily("warmstart_cache_filesystem_size_bytes", "Size of the filesystem holding the cache",
                                value=st.f_blocks * st.f_frsize)
        yield GaugeMetricFamily("warmstart_cache_filesystem_avail_bytes",
                                "Bytes free for the agent on the filesystem holding the cache",
                                value=st.f_bavail * st.f_frsize)

    def _fetch(self, transfers: Transfers, fills_in_flight: int) -> Iterator[Metric]:
        fetched = CounterMetricFamily("warmstart_fetched_bytes", "Bytes received into the cache, by source",
                                      labels=["source"])
        fetched.add_metric(["origin"], transfers.origin_bytes)
        fetched.add_metric(["peer"], transfers.peer_bytes_received)
        yield fetched
        yield GaugeMetricFamily("warmstart_fills_in_flight", "Files being filled now", value=fills_in_flight)
        yield CounterMetricFamily("warmstart_peer_pieces_rejected", "Pieces from peers refused (hash mismatch)",
                                  value=transfers.peer_pieces_rejected)
        yield CounterMetricFamily("warmstart_peer_files_repaired",
                                  "Files whose peer pieces failed the origin's digest and were fetched again",
                                  value=transfers.peer_files_repaired)
        peers = GaugeMetricFamily(
            "warmstart_peers", "Other agents this node knows, by state: live (used for pieces), "
            "penalised (answering but sent bad bytes), down (not answering)", labels=["state"],
        )
        counts = self.peers.state_counts() if self.peers is not None else {"live": 0, "penalised": 0, "down": 0}
        for state, n in counts.items():
            peers.add_metric([state], n)
        yield peers
