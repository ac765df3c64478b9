"""The agent's internal errors: failures that one part reports to another, never to a user as they are.

What a user sees is a :class:`client.errors.WarmstartError` subclass (bad reference,
not found, access denied, capacity, integrity, fetch failed...): those cross the
local API as typed JSON errors and are defined in ``client/errors.py`` so the
client needs none of the agent. The errors here stay inside the agent; each is
caught by a named part and turned into a retry, another source, or one of the
user-facing errors:

    TransientOriginError      origins -> fetch: retry this range (5xx, SlowDown, reset, stall, short body)
    RangeIgnoredError         origins.range_http -> origins: the server sent the whole body for a range
                              (a mirror that ignores Range): read the file as one stream (origins/sequential.py)
    BusyError                 fetch -> api.peer: this node cannot serve the piece now (503; the peer moves on)
    PieceMovedError           fetch.origin_reader -> fetch: a piece waiting for an origin slot is now another's
    PeerError                 peers.client -> fetch: a peer did not deliver; try the next source
      PeerDownError             nothing answered: the peer leaves placement until a ping works
      PeerSlowError             no answer within the hedge timeout, or the body stalled
      PeerRefusedError          it answered, but not with the piece
        PeerBusyError             it answered 5xx: busy, or finishing the file; a retry may get it
      PeerCutShortError         the answer ended early (its own source failed, or it died)
      PeerLiedError             the bytes did not match the hash it stated, or the known one
    ArtifactPeerError         artifacts -> artifacts: this peer could not provide the bundle; ask the next
    WarmSetError              warmset.spec -> warmset: the file is not a valid warm set (the last good one stays)
"""

from __future__ import annotations


class TransientOriginError(Exception):
    """A failure that another attempt may not see (the fetcher retries these)."""


class RangeIgnoredError(Exception):
    """The server answered a range request with the whole body (200, maybe chunked).

    ``url`` is the URL that answered (after redirects): the one to stream the file from.
    """

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class BusyError(Exception):
    """This node cannot serve the piece right now (the requester moves on)."""


class PieceMovedError(Exception):
    """A piece this node was to fetch from the origin (it owned it) has a peer source now: members appeared.

    Raised before any byte was asked for; the fetcher asks the peers instead.
    """


class PeerError(Exception):
    """A peer did not deliver: try the next owner, finally the origin."""


class PeerDownError(PeerError):
    """Nothing answered (refused, reset, closed early): the peer leaves placement until a ping works."""


class PeerSlowError(PeerError):
    """No answer within the hedge timeout, or the body stalled."""


class PeerRefusedError(PeerError):
    """The peer answered, but not with the piece (it does not know the model, is busy, ...)."""


class PeerBusyError(PeerRefusedError):
    """The peer answered 5xx (busy, between two tries of the piece, the file moving into place): retry later.

    Unlike a 4xx (another piece size, a file it cannot check), asking the same
    peer again shortly may get the piece; a holder that refuses this way is
    retried (bounded) before the origin is asked (agent/fetch/fetcher.py).
    """


class PeerCutShortError(PeerError):
    """The answer ended early: the peer, or the fetch it was passing on as it landed, stopped.

    Not a reason to take the peer out of placement: a relay parent whose own
    source failed cuts its followers off too. If the peer itself died, the
    next request or ping finds it down.
    """


class PeerLiedError(PeerError):
    """The bytes did not match the hash the peer stated, or the piece's known hash."""


class ArtifactPeerError(Exception):
    """This peer could not provide the artifact; try the next."""


class WarmSetError(ValueError):
    """The file is not a valid warm set; the message names the key or entry at fault."""
