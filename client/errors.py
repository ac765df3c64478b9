"""The exception tree shared by the client, the agent and the wire between them.

It lives in the client package because the client must import without the
agent's dependencies, while the agent may import anything of the client's.
Every error also subclasses the built-in a caller would naturally catch, so
``except FileNotFoundError`` still works around ``client.open_tensors``.

    WarmstartError
    ├── BadReferenceError (ValueError)      the model reference is malformed or unsafe
    ├── BadRequestError (ValueError)        a local or peer API request is malformed
    ├── ModelNotFoundError (FileNotFoundError)  bucket, object, repo or revision missing
    ├── AccessDeniedError (PermissionError) the origin refused our credentials
    ├── FetchFailedError                    the origin kept failing; retries exhausted
    │   └── IntegrityError                  bytes did not match the expected digest
    ├── CapacityError (OSError)             cache capacity or disk space exhausted
    ├── MalformedFileError (ValueError)     e.g. a bad safetensors header
    │   └── UnsafeBundleError               an artifact archive member would land outside its target
    ├── ArtifactNotFoundError (FileNotFoundError)  no artifact bundle for this key and fingerprint
    └── AgentUnavailableError (ConnectionError)  no agent answers on the socket

On the wire an error is ``{"error": {"kind": KIND, "message": MESSAGE}}``; ``KIND``
is each class's ``kind`` attribute and :func:`error_from_wire` maps it back.
"""

from __future__ import annotations

from typing import Any


class WarmstartError(Exception):
    """Base of every error warmstart raises on purpose."""

    kind = "internal"

    def to_wire(self) -> dict[str, Any]:
        return {"error": {"kind": self.kind, "message": str(self)}}


class BadReferenceError(WarmstartError, ValueError):
    kind = "bad_reference"


class BadRequestError(WarmstartError, ValueError):
    kind = "bad_request"


class ModelNotFoundError(WarmstartError, FileNotFoundError):
    kind = "not_found"


class AccessDeniedError(WarmstartError, PermissionError):
    kind = "access_denied"


class FetchFailedError(WarmstartError):
    kind = "fetch_failed"


class IntegrityError(FetchFailedError):
    kind = "integrity"


class CapacityError(WarmstartError, OSError):
    kind = "capacity"


class ResourceError(WarmstartError, OSError):
    """The agent ran out of a process resource (file descriptors, memory); the message names the setting to change."""

    kind = "resource_exhausted"


class MalformedFileError(WarmstartError, ValueError):
    kind = "malformed_file"


class AgentUnavailableError(WarmstartError, ConnectionError):
    kind = "agent_unavailable"


class UnsafeBundleError(MalformedFileError):
    """An artifact bundle that must not be installed; ``member`` names the offending archive entry."""

    kind = "unsafe_bundle"

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member


class ArtifactNotFoundError(WarmstartError, FileNotFoundError):
    """Nothing stored (here or on a peer) for this key under this fingerprint; the message says what exists."""

    kind = "artifact_not_found"


_BY_KIND: dict[str, type[WarmstartError]] = {
    cls.kind: cls
    for cls in (
        BadReferenceError,
        BadRequestError,
        ModelNotFoundError,
        AccessDeniedError,
        FetchFailedError,
        IntegrityError,
        CapacityError,
        ResourceError,
        MalformedFileError,
        AgentUnavailableError,
        UnsafeBundleError,
        ArtifactNotFoundError,
    )
}

# HTTP status the agent answers with for each kind (the local API and peers).
HTTP_STATUS: dict[str, int] = {
    "bad_reference": 400,
    "bad_request": 400,
    "malformed_file": 422,
    "unsafe_bundle": 422,
    "artifact_not_found": 404,
    "not_found": 404,
    "access_denied": 403,
    "fetch_failed": 502,
    "integrity": 502,
    "capacity": 507,
    "resource_exhausted": 503,
    "agent_unavailable": 503,
    "internal": 500,
}


def error_from_wire(payload: Any) -> WarmstartError:
    """Rebuild the typed error from an agent's JSON error body (tolerant of junk)."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        return WarmstartError(f"agent returned an unexpected error body: {payload!r:.200}")
    kind = str(err.get("kind", "internal"))
    message = str(err.get("message", "unknown error"))
    return _BY_KIND.get(kind, WarmstartError)(message)
