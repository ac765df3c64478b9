"""Peer traffic over TLS: ``--peer-tls-dir`` (cert-manager's Secret shape) and ``--peer-tls-name``.

Why: the peer API carries the shared token and model bytes between nodes; on a
network others can read, the token would be in clear and a machine that is not
an agent could pose as one. With ``--peer-tls-dir`` the ``--listen`` port
speaks only HTTPS, and every peer request is HTTPS with mutual verification:

- the directory holds ``tls.crt`` (this node's certificate, chain allowed),
  ``tls.key`` and ``ca.crt``, as a cert-manager ``Certificate``'s Secret does
  (deploy/peer-tls-certificate.yaml); nothing else is read from it;
- as a client, this node checks that the peer's certificate chains to ``ca.crt``
  and carries ``--peer-tls-name`` (a DNS name in its subjectAltName; the peer's
  address does not matter, so pod IPs need not be in certificates), and
  presents its own certificate;
- as a server, it asks every client for a certificate chaining to ``ca.crt``
  (optional at the handshake, so kubelet probes and Prometheus can still reach
  ``/livez``, ``/readyz`` and ``/metrics`` over HTTPS without one) and the peer
  routes (``/peer/...``) answer 403 unless the client's certificate was
  verified and carries ``--peer-tls-name`` (agent/api/peer.py ``peer_auth``).

The token is still required on top (defence in depth); it only ever travels
inside TLS.

Renewal (``--peer-tls-reload SECONDS``, :meth:`PeerTLS.watch`): cert-manager
rewrites the mounted Secret's files well before expiry, and nothing restarts the
agent then. Every interval the three files are read; when their bytes changed
and the new set loads cleanly, it is loaded into the *same* two contexts the
listening site and the peer client already hold, so every new handshake (either
way) uses it; connections already open keep theirs. A set that does not load
(a key that does not match, a half-written file) is logged once and the old one
keeps serving. ``load_verify_locations`` adds to a context's trust store, it
cannot take out: after a CA rotation the old CA stays trusted until the next
restart (which is what lets peers still on the old certificate in).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FILES = ("tls.crt", "tls.key", "ca.crt")

log = logging.getLogger(__name__)


class PeerTLSError(ValueError):
    """The TLS directory cannot be used; the message names the file and why (shown as a setting's problem)."""


def _paths(directory: str) -> dict[str, str]:
    """Each of :data:`FILES` in ``directory``."""
    return {f: os.path.join(directory, f) for f in FILES}


def _read_set(directory: str) -> dict[str, bytes]:
    """The three files' bytes (blocking); PeerTLSError when one is missing or unreadable."""
    paths = _paths(directory)
    missing = [f for f, p in paths.items() if not os.path.isfile(p)]
    if missing:
        raise PeerTLSError(f"{directory} lacks {', '.join(missing)} (a cert-manager Secret has all three)")
    try:
        out = {}
        for f, p in paths.items():
            with open(p, "rb") as fh:
                out[f] = fh.read()
        return out
    except OSError as exc:
        raise PeerTLSError(f"{directory}: {exc.strerror or exc}") from None


def _digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for f in FILES:
        h.update(len(files[f]).to_bytes(8, "big") + files[f])
    return h.hexdigest()


def _contexts(directory: str, paths: dict[str, str]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Fresh server and client contexts from the three files at ``paths`` (read from ``directory``, named in
    errors); PeerTLSError when they do not load together."""
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=paths["ca.crt"])
        server.load_cert_chain(paths["tls.crt"], paths["tls.key"])
        server.verify_mode = ssl.CERT_OPTIONAL  # probes without a certificate; /peer/ checks it (peer_auth)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=paths["ca.crt"])
        client.load_cert_chain(paths["tls.crt"], paths["tls.key"])
    except ssl.SSLError as exc:
        raise PeerTLSError(f"{directory}: {exc.reason or exc} (tls.crt, tls.key and ca.crt must be PEM, "
                           "and the key must match the certificate)") from None
    except OSError as exc:
        raise PeerTLSError(f"{directory}: {exc.strerror or exc}") from None
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    client.check_hostname = True  # against --peer-tls-name, given as server_hostname (PeerClient.request)
    return server, client


class RenewalRefused(PeerTLSError):
    """A renewed set in the directory cannot be used; ``key`` tells one such set from another (reported once)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(eq=False)
class PeerTLS:
    """This node's TLS contexts for the peer API and the name every peer's certificate must carry.

    ``server`` and ``client`` are the objects the site and the peer client hold
    for the agent's whole life; a reload changes what is loaded in them, never
    which objects they are.
    """

    server: ssl.SSLContext
    client: ssl.SSLContext
    name: str
    directory: str = ""
    loaded: str = field(default="", repr=False)  # sha256 of the three files' bytes now in the contexts

    @classmethod
    def load(cls, directory: str, name: str) -> PeerTLS:
        """Read the directory (blocking: at start) and build both contexts; PeerTLSError when unusable."""
        files = _read_set(directory)
        server, client = _contexts(directory, _paths(directory))
        return cls(server, client, name, directory, _digest(files))

    def stage(self, skip: str = "") -> tuple[str, str] | None:
        """A changed set, checked: (its digest, a private directory holding a copy), or None when unchanged.

        Blocking (on a thread). The bytes are read once, copied to a private
        directory and loaded there into throwaway contexts, so what :meth:`apply`
        then loads is exactly what was checked, even if the mounted files change
        meanwhile. ``skip``: the digest of a set already refused (not checked or
        reported again). Raises :class:`RenewalRefused` when the set is unusable.
        """
        try:
            files = _read_set(self.directory)
        except PeerTLSError as exc:
            raise RenewalRefused(str(exc), str(exc)) from None
        digest = _digest(files)
        if digest in (self.loaded, skip):
            return None
        copy = tempfile.mkdtemp(prefix="warmstart-tls-")
        try:
            paths = _paths(copy)
            for f, data in files.items():
                fd = os.open(paths[f], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            _contexts(self.directory, paths)
        except (PeerTLSError, OSError) as exc:
            shutil.rmtree(copy, ignore_errors=True)
            raise RenewalRefused(str(exc), digest) from None
        return digest, copy

    def apply(self, digest: str, copy: str) -> None:
        """Load a staged set into the live contexts: call on the event loop, where every handshake runs.

        Why there: OpenSSL does not promise that a context may change while
        another thread starts a connection from it; on the loop's thread no
        handshake is in progress meanwhile. Loading a small PEM set takes well
        under a millisecond. The set was loaded from the same files by
        :meth:`stage`, so a failure here is not expected; it is raised as
        RenewalRefused all the same.
        """
        paths = _paths(copy)
        try:
            for ctx in (self.server, self.client):
                ctx.load_verify_locations(cafile=paths["ca.crt"])
                ctx.load_cert_chain(paths["tls.crt"], paths["tls.key"])
        except (ssl.SSLError, OSError) as exc:
            raise RenewalRefused(f"{self.directory}: {exc}", digest) from None
        self.loaded = digest

    async def watch(self, interval: float, counted: Callable[[str], None] | None = None) -> None:
        """Every ``interval`` seconds until cancelled, load a renewed set; one log line per new set, either way.

        ``counted`` is told "loaded" or "refused" (the agent's metrics). The same
        unusable set is reported once, not every interval.
        """
        refused = ""
        while True:
            await asyncio.sleep(interval)
            try:
                staged = await asyncio.to_thread(self.stage, refused)
                if staged is None:
                    continue
                try:
                    self.apply(*staged)
                finally:
                    await asyncio.to_thread(shutil.rmtree, staged[1], True)
            except RenewalRefused as exc:
                if exc.key != refused:
                    refused = exc.key
                    log.error("peer TLS certificates changed but were not loaded, the previous ones stay in use: "
                              "%s", exc)
                    if counted is not None:
                        counted("refused")
                continue
            refused = ""
            log.info("peer TLS certificates reloaded from %s: new connections use them", self.directory)
            if counted is not None:
                counted("loaded")

    def client_problem(self, transport: Any) -> str | None:
        """Why the client on ``transport`` may not use the peer routes, or None: verified and named right.

        ``transport`` is the request's (aiohttp ``request.transport``); with
        CERT_OPTIONAL a certificate that is there was verified at the handshake.
        """
        if transport is None or transport.get_extra_info("sslcontext") is None:
            return "not over TLS"
        cert = transport.get_extra_info("peercert")
        if not cert:
            return "no client certificate"
        names = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
        if self.name not in names:
            return f"its certificate does not name {self.name!r} (names {', '.join(names) or 'none'})"
        return None
