"""``python -m client snapshot REF``: print the model's snapshot directory, for shell use.

    vllm serve "$(python -m client snapshot s3://models/llama)" --load-format warmstart

The model is fetched into the node cache first if needed (:func:`client.snapshot`).
Standard library only (no torch import). Exit codes as the agent CLI: 0 success
(the path alone on stdout), 1 the operation failed (``error: ...`` on stderr, one
line), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys

import client
from client.transport import DEFAULT_TIMEOUT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client", description="warmstart client commands")
    sub = parser.add_subparsers(dest="command", required=True)
    snap = sub.add_parser("snapshot", help="print the read-only directory of a model in the node cache (fetching it)")
    snap.add_argument("ref", help="model reference: s3://..., gs://..., az://..., hf://..., https://..., /ABS/PATH")
    snap.add_argument("--socket", help="the agent's socket (default $WARMSTART_SOCKET, else /run/warmstart/agent.sock)")
    snap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                      help="seconds of agent silence before giving up (default %(default)s)")
    snap.add_argument("--include", action="extend", nargs="+", metavar="GLOB",
                      help="only the files matching these globs (default: the files a loader reads)")
    snap.add_argument("--exclude", action="extend", nargs="+", metavar="GLOB",
                      help="not the files matching these globs")
    snap.add_argument("--all-files", action="store_true", help="every file of the revision")
    args = parser.parse_args(argv)
    try:
        path = client.snapshot(args.ref, socket=args.socket, timeout=args.timeout, include=args.include,
                               exclude=args.exclude, all_files=args.all_files)
    except client.WarmstartError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
