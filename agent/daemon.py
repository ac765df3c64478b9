"""`agent serve`: open the store, start the sites, run until SIGTERM, shut down in order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import aiohttp
from aiohttp import web

from agent.api.local import local_app, node_app
from agent.config import AgentConfig
from agent.fetch.fetcher import Fetcher
from agent.metrics import Metrics
from agent.service import ModelService
from agent.origins import Origins
from agent.api.peer import PeerState
from agent.peers.client import PeerClient
from agent.peers.membership import Membership, read_token
from agent.store.store import Store
from agent.units import format_size
from agent.warmset.reconciler import WarmSet, add_warm_set_routes

log = logging.getLogger(__name__)
IO_THREADS = 16


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


async def _warm_up(origins: Origins) -> None:
    """Build the origins' clients, then take everything built so far out of the garbage collector's walks.

    botocore's clients hold hundreds of thousands of long-lived objects (service
    models, endpoint rules). Every full collection walked them all again: perf put
    11% of the agent's CPU in the collector while it filled a cold model (many
    short-lived containers per body chunk trigger collections). ``gc.freeze``
    moves what exists now to a generation that is never collected; the fetch
    path's own garbage is collected as before.
    """
    await origins.warm_up()
    gc.collect()
    gc.freeze()
    log.debug("froze %d long-lived objects out of the garbage collector's walks", gc.get_freeze_count())


def _prepare_socket_path(path: str) -> None:
    """Create the socket's directory; remove a stale socket, refuse a live one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left over from a killed agent
    else:
        raise SystemExit(f"error: another agent already serves {path}")
    finally:
        probe.close()


def _start_peers(
    config: AgentConfig, fetcher: Fetcher, peer_state: PeerState
) -> tuple[aiohttp.ClientSession, asyncio.Task[None] | None]:
    """Membership, its probe task and the peer client; the fetcher asks peers from now on."""
    assert peer_state.token is not None
    membership = Membership(
        config.listen,
        static=config.peers,
        dns_name=config.peer_dns,
        dns_interval=config.peer_dns_interval,
        advertise=config.advertise,
    )
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=64, ttl_dns_cache=10),
        auto_decompress=False,
        read_bufsize=4 * 1024 * 1024,
    )
    client = PeerClient(session, peer_state.token.decode(), config.peer_hedge_timeout, config.read_timeout)
    fetcher.peers = membership
    fetcher.peer_client = client
    peer_state.membership = membership
    task = None
    if config.peers or config.peer_dns:
        task = asyncio.create_task(membership.run(client.ping), name="peers")
        log.info("peers: %s%s; this node is %s", ",".join(config.peers) or "-",
                 f" + DNS {config.peer_dns}" if config.peer_dns else "", membership.me)
    else:
        log.info("peer API on (token set) but no --peers/--peer-dns: serving peers only")
    return session, task


async def serve(config: AgentConfig) -> None:
    host, port = config.listen_address
    pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="warmstart-io")
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=8, thread_name_prefix="warmstart"))
    ready = {"store": False}
    peer_state = PeerState(read_token(config.peer_token_file) if config.peer_token_file else None)
    metrics = Metrics()
    node_runner = web.AppRunner(node_app(ready, peer_state, metrics), access_log=None)
    await node_runner.setup()
    await web.TCPSite(node_runner, host, port).start()
    log.info("health and metrics on http://%s:%d (/livez, /readyz, /metrics)", host, port)

    store = Store(config.cache_dir, config.capacity, pool, config.drop_behind)
    await store.open()
    session = aiohttp.ClientSession(  # origins' metadata; their range bodies go through Origins.ranges
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=config.read_timeout),
        auto_decompress=False,
        trust_env=True,  # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as boto3, huggingface_hub and the range client
    )
    origins = Origins(session, pool, config.read_timeout, config.connections)
    fetcher = Fetcher(store, config.connections, config.retries, metrics)
    metrics.watch(store, fetcher)
    service = ModelService(store, fetcher, origins, config.piece_size)
    peer_session, membership_task = None, None
    if peer_state.token is not None:
        peer_session, membership_task = _start_peers(config, fetcher, peer_state)
        peer_state.service = service

    _prepare_socket_path(config.socket)
    warm_set = WarmSet(config.warm_set, service, poll=config.warm_set_poll) if config.warm_set else None
    metrics.watch_warm_set(warm_set)  # set-wide series even without one (the alert rules read them)
    app = local_app(service)
    add_warm_set_routes(app, warm_set)
    local_runner = web.AppRunner(app, access_log=None)
    await local_runner.setup()
    await web.UnixSite(local_runner, config.socket).start()
    if config.socket_gid is not None:
        os.chown(config.socket, -1, config.socket_gid)
    os.chmod(config.socket, config.socket_mode)
    ready["store"] = True
    log.info(
        "serving %s on %s; cache %s (capacity %s, pieces %s, %d connections)",
        "local API", config.socket, config.cache_dir, format_size(config.capacity),
        format_size(config.piece_size), config.connections,
    )

    syncer = asyncio.create_task(store.sync_loop(), name="sync")
    warm_up = asyncio.create_task(_warm_up(origins), name="warm-up origins")
    warm_task = asyncio.create_task(warm_set.run(), name="warm set") if warm_set is not None else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        ready["store"] = False
        if warm_task is not None and warm_set is not None:
            warm_task.cancel()
            await warm_set.close()
        await local_runner.cleanup()
        await node_runner.cleanup()
        for flight in list(fetcher.flights.values()):
            if flight.task:
                flight.task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*(f.task for f in fetcher.flights.values() if f.task), return_exceptions=True)
        syncer.cancel()
        warm_up.cancel()
        if membership_task is not None:
            membership_task.cancel()
        if peer_session is not None:
            await peer_session.close()
        await store.sync()
        await origins.close()
        await session.close()
        pool.shutdown(wait=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.socket)
