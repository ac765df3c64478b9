"""The `agent` command: the daemon (`serve`) and the operator's verbs.

``serve``'s flags come from the settings table in agent/config.py: each has a
``WARMSTART_*`` environment variable, read when ``serve`` runs (never at import,
never for another verb: a bad ``WARMSTART_CONNECTIONS`` must not break
``agent ls``). The verbs other than ``serve`` talk to the local agent over its
Unix socket through the client's transport, the same path an inference pod uses,
and do not import agent.config: its dataclasses cost them ~6 ms on a cold node.
Exit codes: 0 done, 1 the operation failed (one line on stderr), 2 usage or a
bad setting (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from agent.units import format_size
from client.errors import WarmstartError
from client.transport import DEFAULT_SOCKET, SOCKET_ENV, AgentConnection

PLAIN_PROGRESS_SECONDS = 2.0


def version() -> str:
    """The installed distribution's version; from a source tree that is not installed, pyproject.toml's."""
    from importlib import metadata  # here: only `agent --version` pays for it

    try:
        return metadata.version("warmstart")
    except metadata.PackageNotFoundError:
        import tomllib
        from pathlib import Path

        try:
            with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
                return str(tomllib.load(f)["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked (argparse's own wants the string while the parser is built)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"warmstart {version()}")
        parser.exit()


def _command_of(argv: Sequence[str]) -> str | None:
    """The verb named on the command line (the top-level parser takes no option with a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def add_serve_flags(s: argparse.ArgumentParser) -> None:
    """One flag per row of the settings table, with its help, default and variable. Each flag's default here is
    None: a flag not given falls back to its variable, then to the table's default (AgentConfig.from_texts), so
    that parsing and checking a value is done in one place for both."""
    from agent.config import settings

    for name, setting, default in settings():
        text = f"{setting.help} (default: {setting.show(default)}; env {setting.env})".replace("%", "%%")
        if setting.boolean:
            s.add_argument(setting.flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            metavar = setting.flag.removeprefix("--").upper().replace("-", "_")
            s.add_argument(setting.flag, dest=name, default=None, metavar=metavar, help=text)


def build_parser(serve_flags: bool = True) -> argparse.ArgumentParser:
    """The whole parser. ``serve_flags=False`` leaves ``serve``'s flags out (and agent.config unimported): what
    every other verb runs with."""
    p = argparse.ArgumentParser(prog="agent", description="warmstart node agent")
    p.add_argument("--version", action=_VersionAction, help="print the installed version and exit")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the node daemon", description="Run the node daemon. Every flag has a "
                       "WARMSTART_* environment variable; a flag given wins over its variable.")
    if serve_flags:
        add_serve_flags(s)

    def with_socket(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--socket", default=None, help=f"agent socket (default ${SOCKET_ENV} or {DEFAULT_SOCKET})")
        return c

    c = with_socket("prefetch", "fetch a model into this node's cache")
    c.add_argument("ref")
    c.add_argument("--pin", action="store_true", help="never evict it for capacity")
    c.add_argument("--all-nodes", action="store_true", help="also on every live peer (before a scale-up)")
    c.add_argument("--json", action="store_true", help="print the result as JSON (progress still on stderr)")
    add_selection_flags(c)
    c = with_socket("stats", "byte counters (origin, peers) and peer states")
    c.add_argument("--json", action="store_true", help="print the counters as JSON")
    c = with_socket("ls", "list cached models (and the warm set, if the agent has one)")
    c.add_argument("--json", action="store_true", help="print the list as JSON")
    c = with_socket("warm-set", "the warm set's entries: revision, state, progress, errors")
    c.add_argument("action", nargs="?", choices=["status"], default="status")
    c.add_argument("--json", action="store_true", help="print the status as JSON")
    c = with_socket("evict", "unpin a model and delete its blobs")
    c.add_argument("ref")
    c.add_argument("--json", action="store_true", help="print what was freed and kept as JSON")
    c = with_socket("verify", "re-hash a cached model; re-fetch what is corrupt or missing")
    c.add_argument("ref")
    c.add_argument("--json", action="store_true", help="print the counts as JSON (progress still on stderr)")
    from agent.cli import artifacts as cli_artifacts

    cli_artifacts.add_parser(sub)
    return p


def add_selection_flags(c: argparse.ArgumentParser) -> None:
    """Which files of the revision (agent/selection.py); as ``huggingface-cli download`` spells them."""
    c.add_argument("--include", action="extend", nargs="+", default=[], metavar="GLOB",
                   help="fetch only the files matching these globs (instead of the loader's files)")
    c.add_argument("--exclude", action="extend", nargs="+", default=[], metavar="GLOB",
                   help="do not fetch the files matching these globs")
    c.add_argument("--all-files", action="store_true",
                   help="fetch every file of the revision (default: the files a loader reads: the safetensors "
                        "weights, configs, tokenizer; not other weight formats)")


def selection_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields of ``--include`` / ``--exclude`` / ``--all-files`` (none for the default)."""
    body: dict[str, Any] = {}
    if args.include:
        body["include"] = list(args.include)
    if args.exclude:
        body["exclude"] = list(args.exclude)
    if args.all_files:
        body["all_files"] = True
    return body


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(serve_flags=_command_of(argv) == "serve").parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "artifacts":
            from agent.cli import artifacts as cli_artifacts

            return cli_artifacts.run(args)
        conn = AgentConnection(args.socket)
        if args.command == "prefetch" and args.all_nodes:
            return _prefetch_all(conn, args.ref, args.pin, sys.stderr, args.json, selection_body(args))
        if args.command == "prefetch":
            return _prefetch(conn, args.ref, args.pin, sys.stderr, args.json, selection_body(args))
        if args.command == "stats":
            return _stats(conn, args.json)
        if args.command == "ls":
            return _ls(conn, args.json)
        if args.command == "warm-set":
            from agent.cli.warm_set import show_warm_set

            return show_warm_set(conn, args.json)
        if args.command == "evict":
            out = conn.request_json("POST", "/v1/evict", {"ref": args.ref})
            if args.json:
                print(json.dumps(out, indent=2))
                return 0
            print(f"evicted {out['ref']}: freed {format_size(out['freed_bytes'])}")
            for kept in out["kept"]:
                print(f"  kept {kept['digest'][:16]}: {kept['reason']}")
            return 0
        if args.command == "verify":
            result = _follow(conn.stream("POST", "/v1/verify", {"ref": args.ref}), sys.stderr)
            print(json.dumps(result, indent=2) if args.json else verify_summary(args.ref, result))
            return 0
    except WarmstartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


def _serve(args: argparse.Namespace) -> int:
    import logging  # here: the other commands are short-lived clients and log nothing

    from agent.config import AgentConfig, SettingError, settings

    try:
        config = AgentConfig.from_texts({name: getattr(args, name) for name, _, _ in settings()}, os.environ)
    except SettingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    import asyncio  # the daemon's dependencies only for `serve`: the other verbs start faster

    from agent.daemon import serve

    try:
        asyncio.run(serve(config))
    except (OSError, WarmstartError) as exc:  # (a cache another agent holds, a socket directory it cannot write)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def verify_summary(ref: str, result: dict[str, Any]) -> str:
    """What `agent verify` found. ``checked`` counts the files that were cached (and re-hashed); ``repaired``
    the files fetched afterwards: the corrupt ones plus those that were never cached (a partial model)."""
    name = f"{result.get('ref', ref)}@{result['revision']}" if result.get("revision") else ref
    checked, corrupt, repaired = result["checked"], result["corrupt"], result["repaired"]
    missing = max(0, repaired - corrupt)
    text = (f"verified {name}: {checked} file{'s' if checked != 1 else ''} checked, {corrupt} corrupt, "
            f"{repaired} re-fetched")
    if missing:
        text += f" ({missing} {'was' if missing == 1 else 'were'} not cached)"
    unchecked = result.get("without_origin_digest") or []
    if unchecked:
        shown = ", ".join(unchecked[:5]) + (" ..." if len(unchecked) > 5 else "")
        text += (f"\n{len(unchecked)} file{'s' if len(unchecked) != 1 else ''} without an origin digest "
                 f"(checked against their own bytes only: the origin gives none): {shown}")
    return text


def _prefetch(
    conn: AgentConnection, ref: str, pin: bool, out: TextIO, as_json: bool = False,
    selection: dict[str, Any] | None = None,
) -> int:
    result = _follow(conn.stream("POST", "/v1/prefetch", {"ref": ref, "pin": pin, **(selection or {})}), out)
    if as_json:
        print(json.dumps({**result, "pinned": pin}, indent=2))
        return 0
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
    if result.get("skipped_files"):
        print(f"skipped {result['skipped_files']} files, {format_size(result.get('skipped_bytes', 0))} "
              "(not read by a loader, or not matched: --all-files or --include fetch them)")
    return 0


def _prefetch_all(
    conn: AgentConnection, ref: str, pin: bool, out: TextIO, as_json: bool = False,
    selection: dict[str, Any] | None = None,
) -> int:
    """One line per node as it finishes (with ``--json``, one JSON document at the end instead); exit 1 if any
    node failed (the others still finished)."""
    result: dict[str, Any] | None = None
    shown: set[str] = set()

    def show(node: dict[str, Any]) -> None:
        shown.add(node["node"])
        if as_json:
            return
        if node.get("status") == "complete":
            print(f"{node['node']}: complete in {node.get('seconds', 0):.1f}s", flush=True)
        else:
            print(f"{node['node']}: error: {node.get('message')}", flush=True)

    for line in conn.stream("POST", "/v1/prefetch-all", {"ref": ref, "pin": pin, **(selection or {})}):
        event = line.get("event")
        if event == "resolved":
            out.write(f"{line.get('ref')}@{line.get('revision')}: {format_size(line.get('total_bytes', 0))} "
                      f"on {len(line.get('nodes', []))} nodes\n")
            for addr in line.get("skipped", []):
                if not as_json:
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
    if as_json:
        result.pop("event", None)
        print(json.dumps(result, indent=2))
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
    """Show progress lines (a live bar on a terminal, a line every few seconds otherwise); return the
    ``complete`` line, less its ``event``, with the ref, revision and size of the ``resolved`` line where it
    does not repeat them (verify's does not)."""
    tty = out.isatty()
    last_plain = 0.0
    resolved: dict[str, Any] = {}
    for line in lines:
        event = line.get("event")
        if event == "complete":
            if tty:
                out.write("\r\033[K")
            result = {k: v for k, v in line.items() if k != "event"}
            for key in ("ref", "revision", "total_bytes"):
                if key in resolved:
                    result.setdefault(key, resolved[key])
            return result
        if event == "resolved":
            resolved = line
            out.write(_resolved_text(line) + "\n")
        elif event == "progress" and "total_bytes" in line:
            text = _progress_text(line)
            if tty:
                out.write("\r\033[K" + text)
            elif time.monotonic() - last_plain >= PLAIN_PROGRESS_SECONDS:
                out.write(text + "\n")
                last_plain = time.monotonic()
        out.flush()
    raise WarmstartError("the agent closed the stream before the operation completed")


def _resolved_text(line: dict[str, Any]) -> str:
    """``REF@REV: SIZE`` and, where the agent says (prefetch does, verify does not), the files and what was cached:
    a count it did not send is left out, never shown as ``?`` or 0."""
    text = f"{line.get('ref')}@{line.get('revision')}: "
    if "files" in line:
        text += f"{line['files']} files, "
    text += format_size(line.get("total_bytes", 0))
    if "cached_bytes" in line:
        text += f", {format_size(line['cached_bytes'])} already cached"
    if line.get("skipped_files"):
        text += f" ({line['skipped_files']} files, {format_size(line.get('skipped_bytes', 0))} skipped)"
    return text


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
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for m in data["models"]:  # below the table, so the table's columns stay what scripts read
        if m.get("stale_since"):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["stale_since"]))
            print(f"{m['ref']}: stale since {since}: its origin is unreachable; serving cached revision "
                  f"{m['revision'][:12]}")
        if m.get("without_origin_digest"):
            print(f"{m['ref']}: {m['without_origin_digest']} cached file(s) without an origin digest: checked "
                  "against their own bytes only (`agent verify` lists them)")
    print(f"cache: {format_size(data['used_bytes'])} used of {format_size(data['capacity_bytes'])}")
    if warm is not None:
        print()
        show_warm_set(conn, False, warm)
    return 0
