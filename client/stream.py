"""Follow the agent while it fills a model: which bytes of which file may be read now.

``open_tensors`` does not wait for the whole model. It asks the agent to open
the model with ``"stream": true``; the agent answers with where each file can
be read (its blob when complete, else its partial file and the pieces verified
so far) and sends a new line each time a piece or a file completes. A thread
reads those lines into :class:`ModelStream`; the loader asks it to wait until
the pieces that hold a tensor are verified, then reads them itself from the
cache files (the bytes never pass through the agent).

A partial file becomes its blob by a rename, so a descriptor opened on the
partial file stays valid and keeps reading the same bytes. The client never
reads a piece the agent has not verified. Whole-file checks (an origin's
sha256) can only run once every piece is there: the stream ends with the
agent's verdict, and :meth:`ModelStream.finish` raises if it was not success,
so a load that saw a corrupt file fails instead of returning.

An agent that does not stream (it answers with a final ``complete`` line only)
works too: every file becomes readable when that line arrives.

Holding: once told which files it will read (:meth:`ModelStream.hold`), the
stream opens each of them and takes the shared ``flock`` the agent's eviction
respects as soon as the agent names its blob or partial file (at once for those
named already, on the reader thread for those named later), and keeps them until
:meth:`ModelStream.release`. So no file an iteration reads can be evicted while it
runs, and a file already gone when it starts is a :class:`BlobEvictedError`
before anything was handed out (the caller opens again). A partial file's lock
is its blob's: the rename keeps the inode.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from client._flock import lock_shared
from client.errors import AgentUnavailableError, WarmstartError
from client.transport import DEFAULT_TIMEOUT, AgentConnection, NDJSONStream
from client.verify import BlobCheck, CorruptPieceError, expected_hashes

_HEX128 = re.compile(r"^[0-9a-f]{32}$")

OPEN_RETRIES = 5  # a partial file renamed to its blob between the agent's line and our open
OPEN_WAIT_S = 30.0  # how long one such rename may go unannounced (a loaded node's agent answers late)


class BlobEvictedError(WarmstartError):
    """A complete blob was evicted before this client could open and lock it (a race with capacity
    pressure: the agent answered, another request evicted it). Opening the model again fetches it."""


@dataclass
class FileState:
    """One file of the model as the agent last described it."""

    path: str
    size: int = 0
    piece_size: int = 0
    blob: str | None = None  # relative to the cache dir, once complete
    partial: str | None = None  # relative to the cache dir, while filling
    done: set[int] = field(default_factory=set)

    def readable(self, start: int, end: int) -> bool:
        """Whether bytes [start, end) are verified on disk."""
        if self.blob is not None or end <= start:
            return self.blob is not None or self.partial is not None
        if self.partial is None or self.piece_size <= 0:
            return False
        first, last = start // self.piece_size, (end - 1) // self.piece_size
        return all(i in self.done for i in range(first, last + 1))


class ModelStream:
    """The agent's open of one model, followed on a thread; thread-safe waits for readable bytes."""

    def __init__(
        self, ref: str, socket: str | None = None, timeout: float = DEFAULT_TIMEOUT,
        selection: dict[str, Any] | None = None,
    ) -> None:
        self.ref = ref
        conn = AgentConnection(socket, timeout)
        self.socket_path = conn.socket_path
        self.where = f"agent at {conn.socket_path} (open {ref!r})"
        # Sent here, so a dead agent, a bad reference or a missing model raise at the call.
        self._lines: NDJSONStream = conn.stream(
            "POST", "/v1/open", {"ref": ref, "stream": True, **(selection or {})}
        )
        self._cond = threading.Condition()
        self.files: dict[str, FileState] = {}
        self.cache_dir: str | None = None
        self.complete: dict[str, Any] | None = None
        self.base: str | None = None  # the reference without revision and the revision, as the agent resolved them
        self.revision: str | None = None
        self.error: BaseException | None = None
        self._listed = False  # the file list is known (a streaming head, or the complete line)
        self._closed = False
        self._to_hold: set[str] = set()  # model files to open and share-lock as soon as they are named
        self._held: dict[str, tuple[int, str]] = {}  # path -> (descriptor holding the flock, local file)
        self._released = False
        try:
            self._take(next(self._lines))  # the "resolved" head: the file list
        except StopIteration:
            raise AgentUnavailableError(f"{self.where}: the agent closed the answer before the file list") from None
        except BaseException:
            self._lines.close()
            raise
        self._thread = threading.Thread(target=self._follow, name="warmstart-open", daemon=True)
        if self.complete is None:
            self._thread.start()
        else:
            self._lines.close()

    # -- the reader thread ------------------------------------------------------
    def _follow(self) -> None:
        try:
            for line in self._lines:
                with self._cond:
                    self._take(line)
                    self._cond.notify_all()
                self._hold_named()
                if line.get("event") == "complete":
                    break
            else:
                raise AgentUnavailableError(f"{self.where}: the agent ended its answer before it completed")
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            with self._cond:
                if not self._closed:
                    self.error = exc
                self._cond.notify_all()
        finally:
            self._lines.close()

    def _take(self, line: dict[str, Any]) -> None:
        event = line.get("event")
        ref, revision = line.get("ref"), line.get("revision")
        if event in ("resolved", "complete") and isinstance(ref, str) and isinstance(revision, str):
            self.base, self.revision = ref, revision
        if event == "resolved":
            self.cache_dir = os.environ.get("WARMSTART_CACHE_DIR") or line.get("cache_dir")
            states = line.get("file_states")
            if isinstance(states, list):
                for state in states:
                    self._update(state)
                self._listed = True
        elif event == "files":
            for state in line.get("files") or []:
                self._update(state)
        elif event == "complete":
            self.cache_dir = os.environ.get("WARMSTART_CACHE_DIR") or line.get("cache_dir")
            files = line.get("files")
            if not isinstance(files, list):
                raise WarmstartError(f"{self.where}: the complete line lacks files: {line!r:.300}")
            for f in files:
                self._update(f)
            self.complete = line
            self._listed = True

    def _update(self, state: Any) -> None:
        if not (isinstance(state, dict) and isinstance(state.get("path"), str)):
            raise WarmstartError(f"{self.where}: malformed file state {state!r:.200}")
        f = self.files.setdefault(state["path"], FileState(state["path"]))
        for name in ("size", "piece_size"):
            if isinstance(state.get(name), int):
                setattr(f, name, state[name])
        if isinstance(state.get("blob"), str):
            f.blob = state["blob"]
        if isinstance(state.get("partial"), str):
            f.partial = state["partial"]
        done = state.get("done")
        if isinstance(done, list):
            f.done.update(i for i in done if isinstance(i, int))

    # -- for the loading thread ------------------------------------------------
    def names(self) -> list[str]:
        """The model's file names (from an agent that does not stream: once it completed)."""
        with self._cond:
            while not self._listed:
                if self.error is not None:
                    raise self.error
                self._cond.wait(1.0)
            return list(self.files)

    def wait_readable(self, path: str, start: int, end: int) -> FileState:
        """Block until bytes [start, end) of model file ``path`` are verified; return its state."""
        with self._cond:
            while True:
                f = self.files.get(path)
                if f is not None and f.readable(start, end):
                    return f
                if self.error is not None:
                    raise self.error
                if self.complete is not None:
                    raise WarmstartError(f"{self.where}: the model is complete but {path!r} is not readable")
                if self._closed:
                    raise WarmstartError(f"{self.where}: the stream was closed")
                self._cond.wait(1.0)

    def hold(self, paths: list[str]) -> None:
        """Open and share-lock model files ``paths`` now if the agent named them, else as soon as it does.

        Raises :class:`BlobEvictedError` when a complete blob is already gone
        (the caller has handed nothing out yet: it opens the model again).
        """
        with self._cond:
            self._to_hold.update(paths)
        for path in self._hold_named(strict=True):
            raise self._missing(path, self._state(path))

    def _hold_named(self, strict: bool = False) -> list[str]:
        """Hold every file to hold that the agent has named and is not held yet; return those that were missing.

        On the reader thread (``strict`` false) a file that cannot be held is left
        for :meth:`open` to report when the loader reaches it.
        """
        with self._cond:
            if self._released:
                return []
            todo = [(p, self.files[p]) for p in sorted(self._to_hold - self._held.keys()) if p in self.files]
            named = [(p, f.blob or f.partial, f.blob is not None) for p, f in todo if f.blob or f.partial]
            cache_dir = self.cache_dir
        missing: list[str] = []
        if not isinstance(cache_dir, str):
            return missing
        for path, rel, complete in named:
            try:
                opened = self._open_locked(cache_dir, path, rel)
            except (OSError, WarmstartError):
                if strict:
                    raise
                continue  # the loader's own open of it reports what is wrong
            if opened is None:
                if complete:  # a partial file missing was renamed to its blob: the next line names it
                    missing.append(path)
                continue
            with self._cond:
                if self._released or path in self._held:
                    os.close(opened[0])
                else:
                    self._held[path] = opened
        return missing

    def _open_locked(self, cache_dir: str, path: str, rel: str | None) -> tuple[int, str] | None:
        """``rel`` opened and share-locked, or None when it is not there (evicted, or renamed to its blob)."""
        from client import _in_cache

        local = _in_cache(cache_dir, rel, f"{self.where}: file path")
        try:
            fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            lock_shared(fd, f"{self.ref}/{path}")
        except BaseException:
            os.close(fd)
            raise
        return fd, local

    def _state(self, path: str) -> FileState:
        with self._cond:
            return self.files.get(path) or FileState(path)

    def _missing(self, path: str, f: FileState) -> WarmstartError:
        """The error for a named file that is not on disk."""
        with self._cond:
            cache_dir = self.cache_dir
        if f.blob is not None and isinstance(cache_dir, str) and os.path.isdir(os.path.join(cache_dir, "blobs")):
            return BlobEvictedError(
                f"{self.where}: {path!r} was evicted between the agent's answer and this open"
                " (the node cache is under capacity pressure); open the model again"
            )
        local = os.path.join(cache_dir or "?", f.blob or f.partial or "?")
        return WarmstartError(
            f"{self.where}: {path!r} is complete but {local} is missing; if this process sees the"
            f" node cache at another path than the agent, set WARMSTART_CACHE_DIR to it"
        )

    def open(self, path: str) -> tuple[int, str]:
        """A read-only descriptor of model file ``path`` as soon as it exists (partial or blob), share-locked.

        A held file comes as a new descriptor of the held one (the same lock):
        the caller closes it, the hold stays until :meth:`release`.
        """
        for _ in range(OPEN_RETRIES):
            f = self.wait_readable(path, 0, 0)
            with self._cond:
                held = self._held.get(path)
                cache_dir = self.cache_dir
            if held is not None:
                return os.dup(held[0]), held[1]
            if not isinstance(cache_dir, str):
                raise WarmstartError(f"{self.where}: the agent did not say where its cache is")
            opened = self._open_locked(cache_dir, path, f.blob or f.partial)
            if opened is not None:
                return opened
            if f.blob is not None:
                raise self._missing(path, f)
            self._wait_renamed(path, f)
        raise WarmstartError(f"{self.where}: could not open {path!r}: it kept moving")

    def _wait_renamed(self, path: str, seen: FileState) -> None:
        """Wait until the agent names ``path`` anew (its partial file became a blob), at most OPEN_WAIT_S.

        Other files' lines wake the condition too, so this waits for a change of
        this file's names, not for the next line: counting wake-ups would give up
        within milliseconds while another file streams progress.
        """
        deadline = time.monotonic() + OPEN_WAIT_S
        with self._cond:
            while self.error is None and self.complete is None and not self._closed:
                now = self.files.get(path)
                if now is not None and (now.blob, now.partial) != (seen.blob, seen.partial):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(min(1.0, left))

    def is_complete(self, path: str) -> bool:
        """Whether the agent has named ``path``'s complete blob: :meth:`open` would not wait for it to arrive."""
        with self._cond:
            f = self.files.get(path)
            return f is not None and f.blob is not None

    def check(self, path: str, fd: int, local: str) -> BlobCheck | None:
        """A checker of model file ``path``'s piece hashes when ``local`` (open as ``fd``) is its complete blob.

        A file opened while still partial is not checked here: the agent hashed
        each of its pieces from the bytes it wrote just before saying so.
        """
        with self._cond:
            f = self.files.get(path)
            cache_dir = self.cache_dir
        if f is None or f.blob is None or not isinstance(cache_dir, str) or local != os.path.join(cache_dir, f.blob):
            return None
        digest = f.blob.rsplit("/", 1)[-1]
        if not _HEX128.match(digest):
            raise WarmstartError(f"{self.where}: {path!r} has a blob name that is not an xxh3-128: {f.blob!r:.100}")
        size = os.fstat(fd).st_size
        if size != f.size:
            raise CorruptPieceError(
                f"{self.ref}/{path}: the cached {f.blob} has {size} bytes, not the {f.size} recorded", f.blob, 0
            )
        piece_size, hashes = expected_hashes(cache_dir, digest, size)
        return BlobCheck(fd, f.blob, size, piece_size, hashes, f"{self.ref}/{path}")

    def finish(self) -> dict[str, Any]:
        """Wait for the agent's verdict on the whole model; raise its error if it failed."""
        with self._cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self.complete is not None:
                    return self.complete
                self._cond.wait(1.0)

    def close(self) -> None:
        """Stop following (the agent keeps fetching for whoever asks next)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._lines.abort()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def release(self) -> None:
        """Stop following and drop the holds: the agent may evict these files again. Idempotent."""
        self.close()
        with self._cond:
            self._released = True
            held, self._held = list(self._held.values()), {}
        for fd, _ in held:
            os.close(fd)
