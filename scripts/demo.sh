#!/usr/bin/env bash
# Quick start: install, then run the local demo (scripts/demo.py): a real S3 server
# (SeaweedFS on loopback), a real agent, all-MiniLM-L6-v2 fetched cold and opened warm.
#
#   scripts/demo.sh [--keep]      --keep leaves the servers' files in place and prints where
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
exec .venv/bin/python scripts/demo.py "$@"
