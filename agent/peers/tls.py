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
inside TLS. Certificates are read at start: a renewed Secret takes effect at
the agent's next restart (cert-manager renews well before expiry; the rollout
that follows a renewal restarts the agents).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any

FILES = ("tls.crt", "tls.key", "ca.crt")


class PeerTLSError(ValueError):
    """The TLS directory cannot be used; the message names the file and why (shown as a setting's problem)."""


@dataclass(frozen=True)
class PeerTLS:
    """This node's TLS contexts for the peer API and the name every peer's certificate must carry."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    name: str

    @classmethod
    def load(cls, directory: str, name: str) -> PeerTLS:
        """Read the directory (blocking: at start) and build both contexts; PeerTLSError when unusable."""
        paths = {f: os.path.join(directory, f) for f in FILES}
        missing = [f for f, p in paths.items() if not os.path.isfile(p)]
        if missing:
            raise PeerTLSError(f"{directory} lacks {', '.join(missing)} (a cert-manager Secret has all three)")
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
        return cls(server, client, name)

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
