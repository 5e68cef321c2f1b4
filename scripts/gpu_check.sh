#!/usr/bin/env bash
# The GPU check (docs/gpu.md): on a bare GPU machine with torch, Triton and transformers
# (no vLLM, no network, atlas-rl not installed), run the tests marked `gpu` and measure
# verification, drafting and the policy's step cost; results go to one folder:
#   gpu-check.json, gpu-check.md (pasteable into docs/gpu.md), pytest.txt, <stage>.log
#
#   bash scripts/gpu_check.sh                 # folder: $OUT if set, else ./gpu-check-out
#   bash scripts/gpu_check.sh --out DIR
#   bash scripts/gpu_check.sh --cpu-smoke     # toy sizes on the CPU, Triton interpreted (CI)
#
# Every stage runs in its own process under a hard time limit: a failure or a CUDA fault
# is logged into the results and the next stage runs. The limits keep the whole run under
# 9 minutes (expected on an H100/H200: ~5); torch.compile runs last, only in the time left.
# --budget-scale 0.5 halves every limit.
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-./gpu-check-out}"
SMOKE=0
SCALE=1
PY="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR="$2"; shift 2 ;;
        --cpu-smoke) SMOKE=1; shift ;;
        --budget-scale) SCALE="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # we cd below
START=$(date +%s)
log() { echo "[gpu-check $(( $(date +%s) - START ))s] $*"; }

# pyproject maps atlas_rl.kernels -> kernels/ and atlas_rl.integrations -> integrations/
# (package-dir); without an install, a folder of links gives the same package layout.
# Everything runs from inside it, so that the repository's own atlas_rl/ (which lacks
# kernels/) is not what `python -m` finds first on sys.path.
SHIM="$(mktemp -d "${TMPDIR:-/tmp}/atlas-gpu-check.XXXXXX")"
trap 'rm -rf "$SHIM"' EXIT
mkdir "$SHIM/atlas_rl"
for entry in "$REPO"/atlas_rl/*; do
    ln -s "$entry" "$SHIM/atlas_rl/$(basename "$entry")"
done
ln -s "$REPO/kernels" "$SHIM/atlas_rl/kernels"
ln -s "$REPO/integrations" "$SHIM/atlas_rl/integrations"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
cd "$SHIM"

if ! "$PY" -c "import atlas_rl.kernels.rejection, atlas_rl.speculators, atlas_rl.gpu_bench" \
        > "$OUT_DIR/import.log" 2>&1; then
    log "atlas_rl does not import: see $OUT_DIR/import.log"
    cat "$OUT_DIR/import.log"
    exit 1
fi

limit() { awk -v s="$1" -v k="$SCALE" 'BEGIN { printf "%d", s * k }'; }
EXTRA=()
if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    EXTRA=(--cpu-smoke)
    log "--cpu-smoke: toy sizes on the CPU, Triton kernels interpreted"
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || log "WARNING: torch sees no CUDA device; the measurements will be CPU figures"
fi
rm -f "$OUT_DIR/gpu-check.json"
FAILED=0

# stage NAME HARD_LIMIT_S: python -m atlas_rl.gpu_bench --stage NAME, budget a bit under
# the hard limit so that it writes its results before it would be killed.
stage() {
    local name="$1" hard
    hard="$(limit "$2")"
    log "stage $name (limit ${hard}s)"
    timeout -k 5 "$hard" "$PY" -m atlas_rl.gpu_bench --stage "$name" --out "$OUT_DIR" \
        --budget-s "$(( hard * 85 / 100 ))" ${EXTRA[@]+"${EXTRA[@]}"} > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT_DIR/$name.log"
    if [ $rc -ne 0 ]; then
        FAILED=1
        [ $rc -eq 124 ] || [ $rc -eq 137 ] && log "stage $name hit its ${hard}s limit"
        log "stage $name failed (exit $rc): $OUT_DIR/$name.log"
    fi
}

# 1. the tests marked gpu (kernels compiled and exact, distributions, drafter on CUDA)
TESTS="not run (--cpu-smoke: tests/test_kernels_triton.py covers the CPU)"
if [ "$SMOKE" = 0 ]; then
    hard="$(limit 110)"
    log "tests marked gpu (limit ${hard}s) -> $OUT_DIR/pytest.txt"
    if "$PY" -c "import pytest" 2>/dev/null; then
        timeout -k 5 "$hard" "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider \
            --rootdir "$REPO" -c "$REPO/pyproject.toml" "$REPO/tests/test_gpu.py" \
            > "$OUT_DIR/pytest.txt" 2>&1
    else  # no pytest on the machine: the same tests through a minimal runner
        timeout -k 5 "$hard" "$PY" "$REPO/scripts/gpu_tests_runner.py" "$REPO/tests/test_gpu.py" \
            > "$OUT_DIR/pytest.txt" 2>&1
    fi
    rc=$?
    TESTS="$(grep -E '(passed|failed|error|skipped)' "$OUT_DIR/pytest.txt" | tail -n 1)"
    [ $rc -eq 124 ] && TESTS="cut at ${hard}s: $TESTS"
    [ $rc -ne 0 ] && FAILED=1
    tail -n 15 "$OUT_DIR/pytest.txt"
fi

# 2. measurements: limits (s) sum with the tests' to 480 s
stage env 25
stage verify 120
stage drafter 60
stage proposer 40
stage step 110
stage project 15
# 3. torch.compile (a first compile alone can take a minute): in what is left of 500 s
LEFT=$(( $(limit 500) - ($(date +%s) - START) ))
if [ "$SMOKE" = 0 ] && [ "$LEFT" -ge 45 ]; then
    stage compile "$(awk -v l="$LEFT" -v k="$SCALE" 'BEGIN { printf "%d", (l > 75 ? 75 : l) / k }')"
fi
"$PY" -m atlas_rl.gpu_bench --stage report --out "$OUT_DIR" --tests-summary "$TESTS" \
    ${EXTRA[@]+"${EXTRA[@]}"} > "$OUT_DIR/report.log" 2>&1 || FAILED=1

log "done ($(( $(date +%s) - START ))s in all): $OUT_DIR/gpu-check.md, $OUT_DIR/gpu-check.json"
[ -f "$OUT_DIR/gpu-check.md" ] && cat "$OUT_DIR/gpu-check.md"
exit $FAILED
