#!/usr/bin/env bash
# The one command a fresh machine runs: install everything the tests need, then run them.
#
#   scripts/test.sh [pytest args...]     e.g. scripts/test.sh tests/test_servers.py -x
#
# Installs through scripts/install.sh --test (.venv; torch 2.13.0 only if .venv has no torch; the
# project with its test extra; kubectl, promtool, prometheus, ip, openssl: why each, in install.sh),
# then runs pytest and exits with its status. pytest's "no tests
# collected" (exit 5) is a failure here: a green run must have tested something.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh --test
# The tools install.sh puts in .venv/bin (weed, kubectl, promtool, prometheus) are found on PATH.
export PATH="$PWD/.venv/bin:$PATH"

set +e
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
