"""``GET /v1/warm-set`` (the warm set's status) and ``GET /v1/warm-set/metrics`` on the local API."""

from __future__ import annotations

from aiohttp import web

from agent.warmset.collector import metrics_text
from agent.warmset.reconciler import WarmSet


def add_warm_set_routes(app: web.Application, warm_set: WarmSet | None) -> None:
    """``GET /v1/warm-set`` (JSON status; 404 ``not_found`` without --warm-set) and ``/v1/warm-set/metrics``."""
    async def status(request: web.Request) -> web.Response:
        if warm_set is None:
            return web.json_response({"error": {"kind": "not_found", "message":
                                      "this agent has no warm set (start it with --warm-set FILE)"}}, status=404)
        return web.json_response(warm_set.status())

    async def metrics(request: web.Request) -> web.Response:
        body = metrics_text(warm_set) if warm_set is not None else b""
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    app.router.add_get("/v1/warm-set", status)
    app.router.add_get("/v1/warm-set/metrics", metrics)
