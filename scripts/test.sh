#!/usr/bin/env bash
# The one command a fresh machine runs: install everything the tests need, then run them.
#
#   scripts/test.sh [pytest args...]     e.g. scripts/test.sh tests/test_servers.py -x
#
# Installs through scripts/install.sh (.venv, torch CPU build first, the project with
# its test extra), then runs pytest and exits with its status. pytest's "no tests
# collected" (exit 5) is a failure here: a green run must have tested something.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh

set +e
.venv/bin/python -m pytest -q -ra --durations=25 "$@"  # the slowest 25 phases, so CI shows what to speed up
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
