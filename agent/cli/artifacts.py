"""`agent artifacts ls|push|pull|rm`: compile artifacts for servers that own their cache directories.

    agent artifacts pull KEY --into ~/.cache/vllm     # before starting the server
    agent artifacts push KEY --from ~/.cache/vllm     # after it is warm
    agent artifacts ls [KEY]                          # what exists, and whether it fits this node

These run where the inference server runs (its image has its torch), so the
fingerprint they compute is the server's: torch/triton/CUDA versions and the
GPU are read here (client/fingerprint.py). ``--fingerprint-extra`` adds the
framework's own config hash. ``pull`` exits 1 with the reason when nothing
matching exists; ``push`` prints the digest and size.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from agent.units import format_size
from client.errors import WarmstartError

# client.artifacts and client.fingerprint are imported where used: every `agent`
# command builds this parser, and a cold `agent prefetch` should not read them.

KIND = "dir"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser("artifacts", help="compile artifacts: list, push a cache directory, pull one")
    verbs = a.add_subparsers(dest="artifacts_command", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        v = verbs.add_parser(name, help=help)
        v.add_argument("--socket", default=None, help="agent socket (default $WARMSTART_SOCKET)")
        v.add_argument("--fingerprint-extra", default=os.environ.get("WARMSTART_FINGERPRINT_EXTRA") or None,
                       help="the framework's config hash, part of the fingerprint (env WARMSTART_FINGERPRINT_EXTRA)")
        v.add_argument("--kind", default=None,
                       help="bundle kind: 'dir' (push/pull of a directory, the default) or 'torch-compile' "
                            "(compile_cache's); ls matches each bundle against its own kind unless given")
        return v

    v = verb("ls", "list bundles, and whether each matches this node's fingerprint")
    v.add_argument("key", nargs="?")
    v.add_argument("--json", action="store_true")
    v = verb("push", "publish a cache directory as KEY (for this node's fingerprint)")
    v.add_argument("key")
    v.add_argument("--from", dest="source", required=True, help="the directory to publish")
    v = verb("pull", "install the bundle of KEY for this node's fingerprint into a directory")
    v.add_argument("key")
    v.add_argument("--into", required=True, help="the directory to install into (merged, created if missing)")
    v = verb("rm", "forget KEY's bundles (all fingerprints, or --fingerprint-id)")
    v.add_argument("key")
    v.add_argument("--fingerprint-id", default=None)


def run(args: argparse.Namespace) -> int:
    verb = args.artifacts_command
    if verb == "rm":
        from client.transport import AgentConnection

        body: dict[str, Any] = {"key": args.key}
        if args.fingerprint_id:
            body["fingerprint_id"] = args.fingerprint_id
        out = AgentConnection(args.socket).request_json("POST", "/v1/artifacts/remove", body)
        print(f"removed {len(out['removed'])} bundle(s) of {args.key}")
        return 0
    from client.artifacts import pull_dir, push_dir
    from client.fingerprint import current_fingerprint

    fp = current_fingerprint(args.kind or KIND, args.fingerprint_extra)
    if verb == "push":
        try:
            entry = push_dir(args.key, args.source, fp, socket=args.socket)
        except OSError as exc:
            raise WarmstartError(f"cannot push {args.source}: {exc}") from None
        print(f"pushed {args.key} [{entry['fingerprint_id']}]: {entry['digest']} {format_size(entry['size'])}"
              + (f" (replaced {entry['replaced']})" if entry.get("replaced") else ""))
        return 0
    if verb == "pull":
        answer = pull_dir(args.key, args.into, fp, socket=args.socket)
        entry = answer["entry"]
        print(f"pulled {args.key} [{entry['fingerprint_id']}] from {answer.get('source')}: "
              f"{answer['files']} files, {format_size(entry['size'])} into {args.into}")
        return 0
    return _ls(args, fp)


def _ls(args: argparse.Namespace, fp: dict[str, str]) -> int:
    from client.artifacts import list_artifacts
    from client.fingerprint import describe_diff, fingerprint_diff, fingerprint_id

    data = list_artifacts(args.key, socket=args.socket)
    mine = fingerprint_id(fp)
    for a in data["artifacts"]:
        here = fp if args.kind else {**fp, "kind": a["fingerprint"].get("kind", KIND)}
        a["matches"] = a["fingerprint_id"] == fingerprint_id(here)
        a["differs"] = fingerprint_diff(here, a["fingerprint"])
        a["why"] = describe_diff(here, a["fingerprint"])
    if args.json:
        print(json.dumps({**data, "fingerprint": fp, "fingerprint_id": mine}, indent=2))
        return 0
    print(f"this node [{mine}]: " + ", ".join(f"{k}={v}" for k, v in fp.items()))
    rows = [("KEY", "FINGERPRINT", "KIND", "SIZE", "AGE", "MATCH")]
    notes = []
    now = time.time()
    for a in data["artifacts"]:
        fa = a["fingerprint"]
        state = "yes" if a["matches"] else "no: " + ", ".join(a["differs"])
        if not a["present"]:
            state += " (bundle evicted)"
        rows.append((a["key"], a["fingerprint_id"], fa.get("kind", "?"), format_size(a["size"]),
                     _age(now - a["created"]), state))
        if not a["matches"]:
            notes.append(f"  {a['key']} [{a['fingerprint_id']}]: {a['why']}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if notes:
        print("why not:")
        print("\n".join(notes))
    return 0


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"
