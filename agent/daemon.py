"""`agent serve`: build the agent's parts, start its sites, run until SIGTERM, shut down in reverse order.

:func:`running` is the agent as an async context manager: every part is built
with what it needs (constructor injection) and every resource is entered on one
``AsyncExitStack``, so shutdown is the stack unwinding, in reverse order of
start, with no part reaching into another's state. :func:`serve` is the
daemon: :func:`running` plus signal handling. Tests and benches that do not
need a separate process (kill -9, RSS, the environment a process reads at
start) run :func:`running` in their own event loop.

Start order: the TCP node app first (``/livez`` answers at once, ``/readyz``
503), then the store (opened, blobs written after the last sync re-hashed),
the origins, the fetcher and peers, the local socket, and last readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from agent.api.local import local_app
from agent.api.node import Readiness, node_app
from agent.api.peer import PeerState
from agent.artifacts.index import ArtifactIndex
from agent.artifacts.lookup import Artifacts
from agent.artifacts.signing import ArtifactTrust
from agent.config import AgentConfig
from agent.fetch.fetcher import Fetcher
from agent.fetch.peer_reader import PeerReader
from agent.metrics import Metrics
from agent.origins import Origins
from agent.origins.policy import AddressPolicy
from agent.peers.client import PeerClient
from agent.peers.membership import Membership, read_token
from agent.peers.tls import PeerTLS
from agent.service import ModelService
from agent.store.lock import CacheLock
from agent.store.store import Store
from agent.units import format_size
from agent.warmset.collector import WarmSetCollector
from agent.warmset.reconciler import WarmSet
from client.errors import WarmstartError

log = logging.getLogger(__name__)
IO_THREADS = 16


class SocketInUseError(WarmstartError):
    """Another agent answers on the socket this one was told to serve."""


@dataclass(frozen=True)
class Agent:
    """The parts of a running agent, for whoever started it in-process (tests, benches)."""

    config: AgentConfig
    store: Store
    service: ModelService
    metrics: Metrics
    membership: Membership | None


async def _warm_up(origins: Origins, freeze_gc: bool) -> None:
    """Build the origins' clients, then (``freeze_gc``) take everything built so far out of the collector's walks.

    botocore's clients hold hundreds of thousands of long-lived objects (service
    models, endpoint rules). Every full collection walked them all again: perf put
    11% of the agent's CPU in the collector while it filled a cold model (many
    short-lived containers per body chunk trigger collections). ``gc.freeze``
    moves what exists now to a generation that is never collected; the fetch
    path's own garbage is collected as before. Only for a process that is the
    agent (``serve``): an agent run inside another program leaves its heap alone.
    """
    await origins.warm_up()
    if not freeze_gc:
        return
    gc.collect()
    gc.freeze()
    log.debug("froze %d long-lived objects out of the garbage collector's walks", gc.get_freeze_count())


def _prepare_socket_path(path: str) -> None:
    """Create the socket's directory; remove a stale socket, refuse a live one."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except PermissionError:
        raise PermissionError(
            errno.EACCES, f"cannot create the socket's directory {directory}: permission denied (see --socket)"
        ) from None
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left over from a killed agent
    else:
        raise SocketInUseError(f"another agent already serves {path}")
    finally:
        probe.close()


async def _site(
    stack: AsyncExitStack, app: web.Application, make_site: type[web.BaseSite], *args: object, **kw: Any
) -> None:
    """Serve ``app`` on a site; its runner is cleaned up when the stack unwinds."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await make_site(runner, *args, **kw).start()


def _background(stack: AsyncExitStack, coro: Coroutine[Any, Any, None], name: str) -> None:
    """A task that lives as long as the agent: cancelled and awaited when the stack unwinds."""
    task = asyncio.create_task(coro, name=name)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    stack.push_async_callback(stop)


def _peers(
    stack: AsyncExitStack, config: AgentConfig, token: str, tls: PeerTLS | None
) -> tuple[Membership, PeerClient]:
    """Membership and the peer client (its session closed with the stack)."""
    membership = Membership(
        config.listen,
        static=config.peers,
        dns_name=config.peer_dns,
        dns_interval=config.peer_dns_interval,
        advertise=config.advertise,
    )
    # No cap per host here: the peer reader's slots bound the piece requests (PEER_CONNECTIONS_MIN,
    # agent/fetch/peer_reader.py), and a cap below them would queue requests inside aiohttp, where the
    # hedge timeout counts the wait for a connection (a node asking one peer for a 180-piece model would
    # time out on its own queue). A small read buffer, as many requests may wait at once: what a stalled
    # disk can pile up is about 2 MiB per request (aiohttp pauses the socket at twice this).
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=10),
        auto_decompress=False,
        read_bufsize=1024 * 1024,
    )
    stack.push_async_callback(session.close)
    return membership, PeerClient(session, token, config.peer_hedge_timeout, config.read_timeout, tls)


@contextlib.asynccontextmanager
async def running(config: AgentConfig, *, freeze_gc: bool = False) -> AsyncIterator[Agent]:
    """The agent, serving on its socket and port until the block exits; then everything is closed in order.

    ``freeze_gc``: this process is the agent (``serve``): see :func:`_warm_up`.
    """
    host, port = config.listen_address
    loop = asyncio.get_running_loop()
    async with AsyncExitStack() as stack:
        lock = CacheLock(config.cache_dir, config.socket)
        await asyncio.to_thread(lock.acquire)  # one agent per cache directory: a second one stops here
        stack.callback(lock.release)
        pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="warmstart-io")
        stack.callback(pool.shutdown, wait=True)
        default_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="warmstart")
        loop.set_default_executor(default_pool)
        token = read_token(config.peer_token_file) if config.peer_token_file else None
        tls = None
        if config.peer_tls_dir and config.peer_tls_name:
            tls = await asyncio.to_thread(PeerTLS.load, config.peer_tls_dir, config.peer_tls_name)
        metrics = Metrics()
        ready = Readiness()
        peer_state = PeerState(token, metrics, tls)
        await _site(stack, node_app(ready, peer_state, metrics), web.TCPSite, host, port,
                    ssl_context=tls.server if tls is not None else None)
        log.info("health and metrics on %s://%s:%d (/livez, /readyz, /metrics)%s", "https" if tls else "http",
                 host, port, f"; peers over TLS, certificates must name {tls.name}" if tls else "")

        store = Store(config.cache_dir, config.capacity, pool, config.drop_behind)
        await store.open()
        stack.push_async_callback(store.sync)  # last thing before the pool goes: what was published is durable
        session = aiohttp.ClientSession(  # origins' metadata; their range bodies go through Origins.ranges
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=config.read_timeout),
            auto_decompress=False,
            trust_env=True,  # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as boto3, huggingface_hub and the range client
        )
        stack.push_async_callback(session.close)
        origins = Origins(
            session, pool, config.read_timeout, config.connections,
            policy=AddressPolicy(allow_private=config.allow_private_redirects),
        )
        stack.push_async_callback(origins.close)

        peers = _peers(stack, config, token, tls) if token is not None else None
        peer_reader = PeerReader(
            store, metrics, *peers, config.connections, start_wait=config.peer_start_wait
        ) if peers is not None else None
        fetcher = Fetcher(
            store, metrics, config.connections, config.retries, peer_reader, open_files=config.open_files,
            origin_ceiling=config.origin_connections, origin_inflight=config.origin_inflight,
        )
        stack.push_async_callback(fetcher.close)
        service = ModelService(
            store, fetcher, origins, config.piece_size, resolve_timeout=config.resolve_timeout, metrics=metrics
        )
        trust = await asyncio.to_thread(
            ArtifactTrust.from_files, config.artifact_trust, config.artifact_signing_key, config.artifact_trusted_keys
        )
        artifacts = Artifacts(
            ArtifactIndex(store, node=peers[0].me) if peers else ArtifactIndex(store), metrics, peers, trust
        )
        metrics.watch(store, fetcher.in_flight, peers[0] if peers is not None else None)
        if peers is not None:
            membership, client = peers
            if config.peers or config.peer_dns:
                _background(stack, membership.run(lambda addr: client.ping(addr, membership.me)), "peers")
                log.info("peers: %s%s; this node is %s", ",".join(config.peers) or "-",
                         f" + DNS {config.peer_dns}" if config.peer_dns else "", membership.me)
            else:
                log.info("peer API on (token set) but no --peers/--peer-dns: serving peers only")
        peer_state.open(
            service, artifacts, peers[0].me if peers is not None else None,
            peers[0].heard_from if peers is not None else None,
        )

        warm_set = WarmSet(config.warm_set, service, poll=config.warm_set_poll) if config.warm_set else None
        metrics.register(WarmSetCollector(warm_set))  # set-wide series even without one (alert rules read them)
        if warm_set is not None:
            stack.push_async_callback(warm_set.close)
        _prepare_socket_path(config.socket)
        stack.callback(_remove_socket, config.socket)
        app = local_app(service, metrics, artifacts, warm_set, peers)
        # The socket is created with the asked mode (the umask set around bind), never wider for a moment;
        # then its group is set. (Every file the store writes has an explicit mode: a passing umask is harmless.)
        umask = os.umask(0o777 & ~config.socket_mode)
        try:
            await _site(stack, app, web.UnixSite, config.socket)
        except PermissionError as exc:
            raise PermissionError(
                exc.errno, f"cannot create the local socket {config.socket}: permission denied (its directory "
                "must be writable by the agent's user; see --socket)"
            ) from None
        finally:
            os.umask(umask)
        if config.socket_gid is not None:
            os.chown(config.socket, -1, config.socket_gid)
        os.chmod(config.socket, config.socket_mode)

        _background(stack, store.sync_loop(), "sync")
        if tls is not None and config.peer_tls_reload > 0:
            # Renewed certificates (cert-manager) for new connections, into the contexts the site and client hold.
            counted = metrics.peer_tls_reloads.labels
            _background(stack, tls.watch(config.peer_tls_reload, lambda result: counted(result).inc()),
                        "peer TLS reload")
        _background(stack, _warm_up(origins, freeze_gc), "warm-up origins")
        if warm_set is not None:
            _background(stack, warm_set.run(), "warm set")
        if peers is not None and (config.peers or config.peer_dns):
            await _first_round(peers[0], config.peer_start_wait)
        ready.ready = True
        stack.callback(setattr, ready, "ready", False)
        log.info(
            "serving %s on %s; cache %s (capacity %s, pieces %s, %d connections)",
            "local API", config.socket, config.cache_dir, format_size(config.capacity),
            format_size(config.piece_size), config.connections,
        )
        yield Agent(config, store, service, metrics, peers[0] if peers is not None else None)
        log.info("shutting down")


async def _first_round(membership: Membership, wait: float) -> None:
    """Readiness waits (at most ``wait`` s) until every peer answered once: see agent/peers/membership.py.

    A DaemonSet's pods that scale up together are told ready (and handed work)
    at about the same instant; a node that has not yet heard from the others
    would fetch every piece it thinks it owns from the origin.
    """
    if not await membership.wait_settled(wait) and wait > 0:
        log.warning("peers not heard from within --peer-start-wait %.1fs: %s (serving anyway)",
                    wait, ",".join(membership.not_answered()) or "-")


def _remove_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def serve(config: AgentConfig) -> None:
    """The daemon: the agent until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(config, freeze_gc=True):
        await stop.wait()
