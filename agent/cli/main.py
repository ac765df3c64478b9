"""The `agent` command: the daemon (`serve`) and the operator's verbs.

Every flag has a ``WARMSTART_*`` environment variable (read when the command
runs, never at import). The verbs other than ``serve`` talk to the local agent
over its Unix socket through the client's transport, the same path an
inference pod uses. Exit codes: 0 done, 1 the operation failed (one line on
stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from agent.defaults import (
    DEFAULT_CACHE_DIR,
    DEFAULT_CAPACITY,
    DEFAULT_CONNECTIONS,
    DEFAULT_LISTEN,
    DEFAULT_PEER_DNS_INTERVAL,
    DEFAULT_PEER_HEDGE_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_RETRIES,
    DEFAULT_PIECE_SIZE,
    DEFAULT_SOCKET,
    MAX_PIECE_SIZE,
    MIN_PIECE_SIZE,
)
from agent.units import format_size, parse_size
from client._transport import AgentConnection
from client.errors import WarmstartError

PLAIN_PROGRESS_SECONDS = 2.0


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_flag(name: str) -> bool:
    """A yes/no setting from the environment: 1, true, yes or on (any case) is yes."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent", description="warmstart node agent")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the node daemon")
    s.add_argument("--cache-dir", default=_env("WARMSTART_CACHE_DIR", DEFAULT_CACHE_DIR))
    s.add_argument("--socket", default=_env("WARMSTART_SOCKET", DEFAULT_SOCKET))
    s.add_argument("--listen", default=_env("WARMSTART_LISTEN", DEFAULT_LISTEN))
    s.add_argument("--capacity", default=_env("WARMSTART_CAPACITY", DEFAULT_CAPACITY))
    s.add_argument("--piece-size", default=_env("WARMSTART_PIECE_SIZE", str(DEFAULT_PIECE_SIZE)))
    s.add_argument("--connections", type=int, default=int(_env("WARMSTART_CONNECTIONS", str(DEFAULT_CONNECTIONS))))
    s.add_argument("--log-level", default=_env("WARMSTART_LOG_LEVEL", "INFO"))
    s.add_argument("--socket-mode", default=_env("WARMSTART_SOCKET_MODE", "660"),
                   help="octal permissions of the local socket (default 660: owner and group only)")
    s.add_argument("--socket-group", default=_env("WARMSTART_SOCKET_GROUP", "") or None,
                   help="group (name or gid) that owns the local socket: the pods allowed to use it")
    s.add_argument("--read-timeout", type=float,
                   default=float(_env("WARMSTART_READ_TIMEOUT", str(DEFAULT_READ_TIMEOUT))),
                   help="seconds an origin or peer body may stall before the request is retried")
    s.add_argument("--retries", type=int, default=int(_env("WARMSTART_RETRIES", str(DEFAULT_RETRIES))),
                   help="tries per piece against the origin (backoff with jitter between them)")
    s.add_argument("--warm-set", default=_env("WARMSTART_WARM_SET", "") or None,
                   help="YAML file of models to keep warm (a mounted ConfigMap; edits apply without a restart)")
    s.add_argument("--warm-set-poll", type=float, default=float(_env("WARMSTART_WARM_SET_POLL", "0.5")),
                   help="seconds between looks at the warm-set file")
    s.add_argument("--drop-behind", action=argparse.BooleanOptionalAction,
                   default=_env_flag("WARMSTART_DROP_BEHIND"),
                   help="write back and drop fetched blobs from the page cache as they are verified, so a "
                        "prefetch does not fill RAM (or the agent's memory limit) with a second copy of the model")
    s.add_argument("--peers", default=_env("WARMSTART_PEERS", ""),
                   help="static peer list HOST:PORT,... (this node's own address is ignored)")
    s.add_argument("--peer-dns", default=_env("WARMSTART_PEER_DNS", "") or None,
                   help="DNS name listing the peers (a Kubernetes headless Service); port = --listen's")
    s.add_argument("--peer-dns-interval", type=float,
                   default=float(_env("WARMSTART_PEER_DNS_INTERVAL", str(DEFAULT_PEER_DNS_INTERVAL))))
    s.add_argument("--peer-token-file", default=_env("WARMSTART_PEER_TOKEN_FILE", "") or None,
                   help="file with the shared peer token (a mounted Secret); peers are off without it")
    s.add_argument("--advertise", default=_env("WARMSTART_ADVERTISE", "") or None,
                   help="HOST:PORT other nodes know this one by (default: --listen unless it is 0.0.0.0)")
    s.add_argument("--peer-hedge-timeout", type=float,
                   default=float(_env("WARMSTART_PEER_HEDGE_TIMEOUT", str(DEFAULT_PEER_HEDGE_TIMEOUT))),
                   help="seconds to wait for a peer's answer before asking the next owner")

    def with_socket(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--socket", default=None, help="agent socket (default $WARMSTART_SOCKET or %s)" % DEFAULT_SOCKET)
        return c

    c = with_socket("prefetch", "fetch a model into this node's cache")
    c.add_argument("ref")
    c.add_argument("--pin", action="store_true", help="never evict it for capacity")
    c.add_argument("--all-nodes", action="store_true", help="also on every live peer (before a scale-up)")
    c = with_socket("stats", "byte counters (origin, peers) and peer states")
    c.add_argument("--json", action="store_true")
    c = with_socket("ls", "list cached models (and the warm set, if the agent has one)")
    c.add_argument("--json", action="store_true")
    c = with_socket("warm-set", "the warm set's entries: revision, state, progress, errors")
    c.add_argument("action", nargs="?", choices=["status"], default="status")
    c.add_argument("--json", action="store_true")
    c = with_socket("evict", "unpin a model and delete its blobs")
    c.add_argument("ref")
    c = with_socket("verify", "re-hash a cached model; re-fetch what is corrupt")
    c.add_argument("ref")
    from agent.cli import artifacts as cli_artifacts

    cli_artifacts.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "artifacts":
            from agent.cli import artifacts as cli_artifacts

            return cli_artifacts.run(args)
        conn = AgentConnection(args.socket)
        if args.command == "prefetch" and args.all_nodes:
            return _prefetch_all(conn, args.ref, args.pin, sys.stderr)
        if args.command == "prefetch":
            return _prefetch(conn, args.ref, args.pin, sys.stderr)
        if args.command == "stats":
            return _stats(conn, args.json)
        if args.command == "ls":
            return _ls(conn, args.json)
        if args.command == "warm-set":
            from agent.cli.warm_set import show_warm_set

            return show_warm_set(conn, args.json)
        if args.command == "evict":
            out = conn.request_json("POST", "/v1/evict", {"ref": args.ref})
            print(f"evicted {out['ref']}: freed {format_size(out['freed_bytes'])}")
            for kept in out["kept"]:
                print(f"  kept {kept['digest'][:16]}: {kept['reason']}")
            return 0
        if args.command == "verify":
            result = _follow(conn.stream("POST", "/v1/verify", {"ref": args.ref}), sys.stderr)
            print(f"verified {args.ref}: {result['checked']} checked, {result['corrupt']} corrupt, "
                  f"{result['repaired']} re-fetched")
            return 0
    except WarmstartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


def _serve(args: argparse.Namespace) -> int:
    import logging  # here: the other commands are short-lived clients and log nothing

    from agent.config import AgentConfig

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        piece_size = parse_size(args.piece_size)
        if not MIN_PIECE_SIZE <= piece_size <= MAX_PIECE_SIZE:
            raise ValueError(f"--piece-size must be between {format_size(MIN_PIECE_SIZE)} and {format_size(MAX_PIECE_SIZE)}")
        if args.connections < 1:
            raise ValueError("--connections must be at least 1")
        peers = tuple(a.strip() for a in args.peers.split(",") if a.strip())
        if (peers or args.peer_dns) and not args.peer_token_file:
            raise ValueError("--peers/--peer-dns need --peer-token-file (the shared token peers authenticate with)")
        if args.peer_token_file:
            from agent.peers.membership import read_token, split_hostport

            read_token(args.peer_token_file)
            for addr in peers + ((args.advertise,) if args.advertise else ()):
                split_hostport(addr)
        if args.warm_set_poll <= 0:
            raise ValueError("--warm-set-poll must be positive")
        if args.peer_hedge_timeout <= 0 or args.peer_dns_interval <= 0:
            raise ValueError("--peer-hedge-timeout and --peer-dns-interval must be positive")
        if args.read_timeout <= 0 or args.retries < 1:
            raise ValueError("--read-timeout must be positive and --retries at least 1")
        socket_mode = _socket_mode(args.socket_mode)
        socket_gid = _group_id(args.socket_group) if args.socket_group else None
        config = AgentConfig(
            cache_dir=args.cache_dir,
            socket=args.socket,
            listen=args.listen,
            capacity=parse_size(args.capacity),
            piece_size=piece_size,
            connections=args.connections,
            peers=peers,
            peer_dns=args.peer_dns,
            peer_dns_interval=args.peer_dns_interval,
            peer_token_file=args.peer_token_file,
            advertise=args.advertise,
            peer_hedge_timeout=args.peer_hedge_timeout,
            read_timeout=args.read_timeout,
            retries=args.retries,
            socket_mode=socket_mode,
            socket_gid=socket_gid,
            warm_set=os.path.abspath(args.warm_set) if args.warm_set else None,
            warm_set_poll=args.warm_set_poll,
            drop_behind=args.drop_behind,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import asyncio  # the daemon's dependencies only for `serve`: the other verbs start faster

    from agent.daemon import serve

    try:
        asyncio.run(serve(config))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _socket_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"--socket-mode must be octal permissions like 660, got {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"--socket-mode must be octal permissions like 660, got {text!r}")
    return mode


def _group_id(name: str) -> int:
    import grp

    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"--socket-group: no group named {name!r}") from None


def _prefetch(conn: AgentConnection, ref: str, pin: bool, out: TextIO) -> int:
    result = _follow(conn.stream("POST", "/v1/prefetch", {"ref": ref, "pin": pin}), out)
    fetched = result.get("fetched_bytes", 0)
    secs = max(result.get("seconds", 0.0), 1e-6)
    how = (
        f"{format_size(fetched)} fetched in {secs:.1f}s, {format_size(fetched / secs)}/s"
        if fetched
        else "already cached, nothing fetched"
    )
    print(
        f"{result['ref']}@{result['revision']}: {format_size(result['total_bytes'])} in cache ({how})"
        + (", pinned" if pin else "")
    )
    return 0


def _prefetch_all(conn: AgentConnection, ref: str, pin: bool, out: TextIO) -> int:
    """One line per node as it finishes; exit 1 if any node failed (the others still finished)."""
    result: dict[str, Any] | None = None
    shown: set[str] = set()

    def show(node: dict[str, Any]) -> None:
        shown.add(node["node"])
        if node.get("status") == "complete":
            print(f"{node['node']}: complete in {node.get('seconds', 0):.1f}s", flush=True)
        else:
            print(f"{node['node']}: error: {node.get('message')}", flush=True)

    for line in conn.stream("POST", "/v1/prefetch-all", {"ref": ref, "pin": pin}):
        event = line.get("event")
        if event == "resolved":
            out.write(f"{line.get('ref')}@{line.get('revision')}: {format_size(line.get('total_bytes', 0))} "
                      f"on {len(line.get('nodes', []))} nodes\n")
            for addr in line.get("skipped", []):
                print(f"{addr}: skipped (not answering)")
        elif event == "node":
            show(line)
        elif event == "error":
            raise WarmstartError(str((line.get("error") or {}).get("message", "prefetch failed")))
        elif event == "complete":
            result = line
            for node in line.get("nodes", []):
                if node["node"] not in shown:
                    show(node)
        out.flush()
    if result is None:
        raise WarmstartError("the agent closed the stream before the operation completed")
    if result.get("failed"):
        print(f"error: {len(result['failed'])} node(s) failed: {', '.join(result['failed'])}", file=sys.stderr)
        return 1
    return 0


def _stats(conn: AgentConnection, as_json: bool) -> int:
    data = conn.request_json("GET", "/v1/stats")
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"origin bytes         {format_size(data['origin_bytes'])}")
    print(f"peer bytes received  {format_size(data['peer_bytes_received'])}")
    print(f"peer bytes served    {format_size(data['peer_bytes_served'])}"
          f" ({format_size(data.get('peer_bytes_relayed', 0))} of it passed on as a relay parent)")
    print(f"peer pieces rejected {data['peer_pieces_rejected']}")
    print(f"peer files repaired  {data.get('peer_files_repaired', 0)} "
          f"({format_size(data.get('peer_bytes_repaired', 0))} fetched again from the origin)")
    if data.get("self"):
        print(f"this node            {data['self']}")
    for p in data.get("peers", []):
        state = "up" if p["alive"] else "down"
        if p["penalised_for_s"]:
            state += f", penalised {p['penalised_for_s']:.0f}s more"
        print(f"peer {p['addr']}: {state}")
    return 0


def _follow(lines: Iterator[dict[str, Any]], out: TextIO) -> dict[str, Any]:
    """Show progress lines (a live bar on a terminal, a line every few seconds otherwise)."""
    tty = out.isatty()
    last_plain = 0.0
    for line in lines:
        event = line.get("event")
        if event == "complete":
            if tty:
                out.write("\r\033[K")
            return line
        if event == "resolved":
            total, cached = line.get("total_bytes", 0), line.get("cached_bytes", 0)
            out.write(f"{line.get('ref')}@{line.get('revision')}: {line.get('files', '?')} files, "
                      f"{format_size(total)}, {format_size(cached)} already cached\n")
        elif event == "progress" and "total_bytes" in line:
            text = _progress_text(line)
            if tty:
                out.write("\r\033[K" + text)
            elif time.monotonic() - last_plain >= PLAIN_PROGRESS_SECONDS:
                out.write(text + "\n")
                last_plain = time.monotonic()
        out.flush()
    raise WarmstartError("the agent closed the stream before the operation completed")


def _progress_text(line: dict[str, Any]) -> str:
    done, total, rate = line["done_bytes"], line["total_bytes"], line.get("rate_bps", 0.0)
    pct = 100.0 * done / total if total else 100.0
    eta = f"ETA {max(0, total - done) / rate:.0f}s" if rate > 0 else "ETA --"
    return f"{format_size(done)} / {format_size(total)}  {pct:5.1f}%  {format_size(rate)}/s  {eta}"


def _ls(conn: AgentConnection, as_json: bool) -> int:
    from agent.cli.warm_set import show_warm_set, warm_set_status

    data = conn.request_json("GET", "/v1/models")
    warm = warm_set_status(conn)
    if as_json:
        print(json.dumps({**data, "warm_set": warm} if warm is not None else data, indent=2))
        return 0
    rows = [("MODEL", "REVISION", "SIZE", "CACHED", "PINNED", "LAST USE")]
    for m in data["models"]:
        last = time.strftime("%Y-%m-%d %H:%M", time.localtime(m["last_used"])) if m["last_used"] else "-"
        pct = 100 * m["cached_bytes"] / m["total_size"] if m["total_size"] else 100
        rows.append((m["ref"], m["revision"][:12], format_size(m["total_size"]), f"{pct:.0f}%",
                     "yes" if m["pinned"] else "no", last))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"cache: {format_size(data['used_bytes'])} used of {format_size(data['capacity_bytes'])}")
    if warm is not None:
        print()
        show_warm_set(conn, False, warm)
    return 0
