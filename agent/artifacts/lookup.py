"""The node's compile artifacts as the API uses them: its index, and lookups that ask peers.

One :class:`Artifacts` per agent, built by the daemon once the store is open
and shared by the local routes (agent/api/artifacts.py) and the peer routes
(agent/api/artifacts_peer.py). A bundle missing here is asked of the
rendezvous owner of its (key, fingerprint) first, then of the other live peers
(agent/artifacts/peer_fetch.py); concurrent lookups of the same bundle share
one such search. Peers are asked only under ``--artifact-trust`` signed or
token, and a peer's entry is loaded only if it is trusted under the setting
(agent/artifacts/signing.py); a refused one is logged, counted
(warmstart_artifact_refused_total{reason}) and the next peer is asked.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from agent.artifacts.index import ArtifactIndex, Entry
from agent.artifacts.peer_fetch import fetch_blob, fetch_entry
from agent.artifacts.signing import ArtifactTrust
from agent.errors import ArtifactPeerError, ArtifactRefusedError
from agent.metrics import Metrics
from agent.peers.client import PeerClient
from agent.peers.membership import Membership
from agent.peers.placement import rendezvous
from agent.singleflight import SingleFlight
from client.errors import ArtifactNotFoundError
from client.fingerprint import describe_diff, fingerprint_id

log = logging.getLogger(__name__)


class Artifacts:
    """The artifact index plus the peers to ask when a bundle is not here."""

    def __init__(self, index: ArtifactIndex, metrics: Metrics, peers: tuple[Membership, PeerClient] | None,
                 trust: ArtifactTrust | None = None) -> None:
        self.index = index
        self.metrics = metrics
        self.peers = peers
        self.trust = trust or ArtifactTrust()
        self._searches: SingleFlight[tuple[str, str], tuple[Entry, str] | None] = SingleFlight()

    async def lookup(self, key: str, fingerprint: dict[str, str], use_peers: bool) -> tuple[Entry, str]:
        """The entry for (key, fingerprint) with its blob here, fetched from a peer if need be: (entry, source)."""
        index = self.index
        await index.load()
        fpid = fingerprint_id(fingerprint)
        found = index.get(key, fpid)
        if found is not None:
            await index.store.touch([found.digest])
            return found, "local"
        asked = use_peers and self.peers is not None and self.trust.peers_allowed
        if asked:
            got = await self._searches.run((key, fpid), lambda: self._from_peers(key, fpid))
            if got is not None:
                return got
        raise ArtifactNotFoundError(self._not_found_message(key, fingerprint, asked))

    async def publish_upload(self, key: str, fingerprint: dict[str, str], read: Callable[[int], Awaitable[bytes]],
                             size: int) -> tuple[Entry, str | None]:
        """A bundle pushed on this node's socket: stored, signed when this node holds a signing key, published."""
        digest, sha256 = await self.index.adopt(read, size)
        sig = self.trust.sign(key, fingerprint, size, digest, sha256)
        return await self.index.publish(key, fingerprint, digest, size, sha256=sha256, sig=sig)

    async def _from_peers(self, key: str, fpid: str) -> tuple[Entry, str] | None:
        """Ask the rendezvous owner of (key, fingerprint) first, then the other live peers."""
        assert self.peers is not None
        membership, client = self.peers
        order = [a for a in rendezvous([*membership.live(), membership.me], f"artifact|{key}", int(fpid, 16))
                 if a != membership.me]
        for addr in order:
            try:
                found = await fetch_entry(client, addr, key, fpid)
                if found is None:
                    continue
                reason = self.trust.refusal(found.key, found.fingerprint, found.size, found.digest, found.sha256,
                                            found.sig)
                if reason is not None:
                    raise ArtifactRefusedError(reason, f"--artifact-trust {self.trust.mode}")
                if not self.index.store.has_blob(found.digest):
                    await fetch_blob(client, addr, self.index, found)
                    self.metrics.transfers.peer_bytes_received += found.size
                entry, _ = await self.index.publish(found.key, found.fingerprint, found.digest, found.size,
                                                    publisher=found.publisher, created=found.created,
                                                    sha256=found.sha256, sig=found.sig)
                log.info("artifact %s [%s] came from peer %s", key, fpid, addr)
                return entry, f"peer {addr}"
            except ArtifactRefusedError as exc:
                self.metrics.artifact_refused.labels(exc.reason).inc()
                log.warning("artifact %s [%s] from peer %s %s", key, fpid, addr, exc)
            except ArtifactPeerError as exc:
                log.warning("artifact %s [%s] from peer %s failed: %s", key, fpid, addr, exc)
        return None

    def _not_found_message(self, key: str, fingerprint: dict[str, str], asked_peers: bool) -> str:
        where = "on this node or its peers" if asked_peers else "on this node"
        if not asked_peers and self.peers is not None and not self.trust.peers_allowed:
            where += " (peers not asked: --artifact-trust off)"
        others = [e for e in self.index.entries.values() if e.key == key]
        if not others:
            return f"no artifact {key!r} {where}"
        lines = [f"no artifact {key!r} for this fingerprint ({fingerprint_id(fingerprint)}) {where}; this node has:"]
        for e in others:
            if e.fingerprint_id == fingerprint_id(fingerprint):
                lines.append(f"  {e.fingerprint_id}: same fingerprint, but its bundle was evicted")
            else:
                lines.append(f"  {e.fingerprint_id}: differs in {describe_diff(fingerprint, e.fingerprint)}")
        return "\n".join(lines)
