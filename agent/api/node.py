"""The node app on the TCP ``--listen`` port: health, metrics, and the peer routes.

``/livez`` answers while the process runs; ``/readyz`` once the store is open
and the local socket serves (a DaemonSet's readiness probe, and the tests' and
benches' start signal); ``/metrics`` without authentication, like the health
routes; everything under ``/peer/`` needs the peer token (agent/api/peer.py).
"""

from __future__ import annotations

from aiohttp import web

from agent.api.artifacts_peer import add_artifact_peer_routes
from agent.api.common import MAX_BODY, METRICS, errors_middleware
from agent.api.peer import PeerState, add_peer_routes, peer_auth
from agent.metrics import CONTENT_TYPE, Metrics


class Readiness:
    """Whether the agent serves (the store is open and the local socket is up)."""

    def __init__(self) -> None:
        self.ready = False


READY: web.AppKey[Readiness] = web.AppKey("ready", Readiness)


async def livez(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    if request.app[READY].ready:
        return web.Response(text="ready\n")
    return web.Response(text="store not open yet\n", status=503)


async def metrics_route(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    await metrics.refresh()
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def node_app(ready: Readiness, peer: PeerState, metrics: Metrics) -> web.Application:
    """The TCP face: health, metrics, and the peer API (404 unless a peer token is set)."""
    app = web.Application(middlewares=[errors_middleware, peer_auth], client_max_size=MAX_BODY)
    app[READY] = ready
    app[METRICS] = metrics
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_route)
    add_peer_routes(app, peer)
    add_artifact_peer_routes(app)
    return app
