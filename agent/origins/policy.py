"""Where origin requests may go: the addresses a redirect, or a reference a peer names, may reach.

Why: an origin's redirect is chosen by whoever runs (or has taken over) the
origin, and a peer's ``/peer/v1/prefetch`` names any ``https://`` URL. Followed
blindly, either makes this node fetch from its own loopback, from the cloud
metadata service (169.254.169.254) or from in-cluster services, cache the
answer and hand it to peers. So a redirect to another origin, and a
peer-named reference, may only reach public addresses, judged on the IP
addresses the name resolves to (a name can resolve to 127.0.0.1), and the
connection then goes to exactly those addresses. What the operator configured
is trusted as it is: ``AWS_ENDPOINT_URL``, ``HF_ENDPOINT`` and an ``https://``
reference given on the local socket may be in-cluster; ``allow_private``
extends that trust to every redirect and peer-named reference (a cluster whose
mirrors redirect to in-cluster storage). A redirect from https to plain http
is refused whatever the policy: it would drop TLS mid-fetch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass

from client.errors import AccessDeniedError, FetchFailedError

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Addresses that are not the public internet: loopback, link-local (cloud metadata),
# private and unique-local, shared (carrier-grade NAT; some clusters' pod ranges),
# "this network", unspecified, multicast and broadcast.
NON_PUBLIC: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "255.255.255.255/32",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
    )
)


class AddressRefusedError(AccessDeniedError):
    """A redirect or a peer-named reference would reach an address the policy refuses.

    The message names the host, never the port or whether anything listens
    there: it may go back to a peer.
    """


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses judged requests may reach.

    ``allow_private`` turns the judging off (the operator trusts every target);
    ``refused`` is the set of networks that count as non-public (tests narrow it
    to one loopback address, so a trusted origin and a refused target can both
    live on 127.0.0.0/8).
    """

    allow_private: bool = False
    refused: tuple[Network, ...] = NON_PUBLIC

    def allows(self, address: str) -> bool:
        """Whether a connection to the IP ``address`` is allowed (a malformed address is not)."""
        if self.allow_private:
            return True
        try:
            ip: Address = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is not part of it
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        return not any(ip in net for net in self.refused if net.version == ip.version)

    async def addresses(self, host: str, port: int, what: str) -> list[str]:
        """The IP addresses ``host`` resolves to, all of them allowed; else AddressRefusedError.

        Every address must pass, not just one: a name with a public and a
        private address would otherwise reach the private one whenever the
        connection tries it. The caller connects to these addresses, not to
        the name again (a second lookup could answer differently).
        """
        if not host:
            raise AddressRefusedError(f"refusing {what}: no host")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            log.info("resolving %s for %s failed: %s", host, what, exc)
            raise FetchFailedError(f"cannot resolve {host} for {what}") from None
        found = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not found:
            raise FetchFailedError(f"cannot resolve {host} for {what}")
        refused = [a for a in found if not self.allows(a)]
        if refused:
            log.warning("refused %s: %s resolves to %s (not public)", what, host, ", ".join(refused))
            raise AddressRefusedError(
                f"refusing {what}: {host} is not a public address (loopback, link-local, private or multicast); "
                "an operator can allow in-cluster targets (docs/OPERATIONS.md)"
            )
        return found


def downgrade(source: str, target: str) -> bool:
    """Whether following a redirect from URL ``source`` to URL ``target`` would drop TLS."""
    return source.lower().startswith("https:") and not target.lower().startswith("https:")
