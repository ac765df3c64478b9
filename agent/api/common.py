"""What every route module shares: app keys, body parsing, typed errors as JSON, NDJSON job streams.

Long operations (prefetch, open, verify) answer with an NDJSON stream that
carries a progress line at least every second, so a client can tell a busy
agent from a dead one, and ends with ``complete`` or ``error``. Bad input is
answered with a typed error and never stops the agent. The local API
(agent/api/local.py) and the peer API (agent/api/peer.py, a peer's
``--all-nodes`` prefetch) stream the same way, through :func:`ensure_job`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agent.manifest import Manifest
from agent.metrics import Metrics
from agent.selection import DEFAULT, Selection
from agent.service import ModelService, Progress
from client.errors import HTTP_STATUS, BadRequestError, WarmstartError

log = logging.getLogger(__name__)

SERVICE: web.AppKey[ModelService] = web.AppKey("service", ModelService)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
TICK_SECONDS = 0.5
MAX_BODY = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: WarmstartError) -> web.Response:
    return web.json_response(exc.to_wire(), status=HTTP_STATUS.get(exc.kind, 500))


def count_error(request: web.Request, exc: WarmstartError) -> None:
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.api_error(exc.kind)


# Kinds that say the request itself was wrong (logged at INFO: nothing on this node needs attention);
# every other kind is a failure an operator may have to act on (WARNING), internal errors are ERRORs.
_REQUEST_KINDS = frozenset({"bad_reference", "bad_request", "not_found", "artifact_not_found", "malformed_file"})
REF: web.RequestKey[str] = web.RequestKey("ref", str)
CLIENT_GONE = 499  # the status of an answer whose client went away before it (never seen by anyone)


def log_failure(request: web.Request, exc: WarmstartError) -> None:
    """The agent's one log line for a failure a user sees: what was asked, for which model, and why."""
    level = logging.INFO if exc.kind in _REQUEST_KINDS else logging.WARNING
    what = f" {request[REF]}" if REF in request else ""
    log.log(level, "%s %s%s failed (%s): %s", request.method, request.path, what, exc.kind, exc)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Typed errors become JSON answers; anything unexpected is logged and answered 500.

    A client that goes away (a closed connection, a cancelled request) is not an error.
    """
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except ConnectionResetError:
        log.debug("%s %s: the client went away", request.method, request.path)
        return web.Response(status=CLIENT_GONE)  # written to nobody; aiohttp closes the connection quietly
    except WarmstartError as exc:
        log_failure(request, exc)
        count_error(request, exc)
        return error_response(exc)
    except Exception as exc:  # the agent keeps serving whatever one request did
        log.exception("internal error on %s %s", request.method, request.path)
        error = WarmstartError(f"internal error: {type(exc).__name__}: {exc}")
        count_error(request, error)
        return error_response(error)


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; BadRequestError for anything else."""
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError("request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequestError("request body must be a JSON object")
    return data


def ref_field(request: web.Request, body: dict[str, Any]) -> str:
    """The body's model reference (remembered on the request, so a failure's log line names it)."""
    ref = body.get("ref")
    if not isinstance(ref, str):
        raise BadRequestError('missing "ref" (a model reference string)')
    request[REF] = ref[:300]
    return ref


def flag(body: dict[str, Any], name: str) -> bool | None:
    """An optional true/false field of a request body."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise BadRequestError(f'"{name}" must be true or false')
    return value


async def stream_job(
    request: web.Request,
    progress: Progress | None,
    job: Awaitable[dict[str, Any]],
    head: dict[str, Any],
    updates: Callable[[], list[dict[str, Any]]] | None = None,
    wait_change: Callable[[float], Awaitable[None]] | None = None,
) -> web.StreamResponse:
    """Run ``job`` while streaming progress lines; finish with its result or its error.

    With ``updates``, its lines are sent as soon as ``wait_change`` returns (a
    piece or a blob completed), not only every tick: a client that streams
    tensors waits on them.
    """
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)

    async def send(line: dict[str, Any]) -> None:
        await resp.write(json.dumps(line).encode() + b"\n")

    task = asyncio.ensure_future(job)
    try:
        await send(head)
        while not task.done():
            if updates is None or wait_change is None:
                await asyncio.wait([task], timeout=TICK_SECONDS)
            else:
                for line in updates():
                    await send(line)
                change = asyncio.ensure_future(wait_change(TICK_SECONDS))
                await asyncio.wait([task, change], return_when=asyncio.FIRST_COMPLETED)
                change.cancel()
            if not task.done():
                await send(progress.snapshot() if progress else {"event": "progress"})
        try:
            result = task.result()
        except WarmstartError as exc:
            log_failure(request, exc)
            count_error(request, exc)
            await send({"event": "error", **exc.to_wire()})
        except Exception as exc:
            log.exception("internal error in %s", request.path)
            error = WarmstartError(f"internal error: {exc}")
            count_error(request, error)
            await send({"event": "error", **error.to_wire()})
        else:
            await send({"event": "complete", **result})
    except (ConnectionResetError, asyncio.CancelledError) as exc:
        # The requester went away; the fetch goes on (single flight) for whoever asks next.
        if not task.done():
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        if isinstance(exc, asyncio.CancelledError):
            raise
        log.debug("%s %s: the client went away", request.method, request.path)
        return resp
    await resp.write_eof()
    return resp


async def ensure_job(
    request: web.Request,
    service: ModelService,
    metrics: Metrics,
    ref_text: str,
    pin: bool | None,
    *,
    with_files: bool,
    with_snapshot: bool = False,
    stream: bool = False,
    selection: Selection = DEFAULT,
) -> web.StreamResponse:
    """Resolve ``ref_text``, make the files ``selection`` picks whole, stream progress (the local API's and
    the peers' prefetch). The lines count the picked files only; ``skipped_*`` says what the rest weigh."""
    ref, whole = await service.resolve(ref_text, selection=selection)
    manifest = await service.select(ref, whole, selection)
    progress = service.progress(manifest)
    metrics.count_lookup(manifest, service.verified_pieces)
    started = time.monotonic()
    skipped = {
        "skipped_files": len(whole.files) - len(manifest.files),
        "skipped_bytes": whole.total_size - manifest.total_size,
    }
    head: dict[str, Any] = {
        "event": "resolved",
        "ref": ref.base,
        "revision": manifest.revision,
        "total_bytes": manifest.total_size,
        "cached_bytes": progress.cached_at_start,
        "files": len(manifest.files),
        **skipped,
    }

    async def job() -> dict[str, Any]:
        done = await service.ensure(ref, whole, pin, selection)
        out: dict[str, Any] = {
            "ref": ref.base,
            "revision": done.revision,
            "total_bytes": done.total_size,
            "fetched_bytes": done.total_size - progress.cached_at_start,
            "seconds": round(time.monotonic() - started, 3),
            **skipped,
        }
        if with_files:
            metrics.served_to_client(done.total_size)
            out["cache_dir"] = service.store.root
            out["files"] = [{"path": f.path, "size": f.size, "blob": f"blobs/{f.digest}"} for f in done.files]
            if with_snapshot:  # only when asked: links are file work open_tensors does not need
                out["snapshot"] = await service.store.snapshot(ref, done)
        return out

    updates = None
    if stream:
        states = FileStates(service, manifest)
        head["cache_dir"] = service.store.root
        head["file_states"] = states.changed()
        updates = states.lines
    return await stream_job(request, progress, job(), head, updates, service.wait_change)


class FileStates:
    """Where each file of a manifest can be read while it fills, as lines for a streaming client.

    A file is ``blob`` (complete and verified), ``partial`` with the pieces
    verified so far (bytes of other pieces are not to be read), or neither yet.
    Only files whose state changed since the last call are returned.
    """

    def __init__(self, service: ModelService, manifest: Manifest) -> None:
        self.service = service
        self.manifest = manifest
        self._sent: dict[str, tuple[Any, ...]] = {}

    def changed(self) -> list[dict[str, Any]]:
        out = []
        for entry in self.manifest.files:
            state: dict[str, Any] = {"path": entry.path, "size": entry.size, "piece_size": entry.piece_size}
            digest = self.service.store.digest_of(entry)
            filling = self.service.filling(entry)
            if digest is not None:
                state["blob"] = f"blobs/{digest}"
            elif filling is not None:
                state["partial"], done = filling
                state["done"] = sorted(done)
            key = (state.get("blob"), state.get("partial"), len(state.get("done", ())))
            if self._sent.get(entry.path) != key:
                self._sent[entry.path] = key
                out.append(state)
        return out

    def lines(self) -> list[dict[str, Any]]:
        files = self.changed()
        return [{"event": "files", "files": files}] if files else []
