#!/usr/bin/env bash
# GPU check, one short run on one CUDA machine (an H100 or H200 with a CUDA torch, no network needed):
# the execution paths against the reference loop on CUDA in float32 and float64, then step times against
# torch's fused and foreach Adam.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]              # OUT_DIR defaults to ${OUT:-runs/gpu_check}
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh    # stop after the environment and the CUDA check
#
# PYTHON (default python3) runs everything; adaptopt is installed with `pip install --no-deps -e .` only if
# `import adaptopt` fails (offline: no build isolation, no index; if that fails too, src/ goes on PYTHONPATH).
# Every stage runs under `timeout`, and all of them within GPU_CHECK_BUDGET seconds (default 420): stages
# get at most TESTS_TIMEOUT (240) and BENCH_TIMEOUT (150) seconds, and never more than the budget has left.
# OUT_DIR gets report.md and the raw logs: env.log, install.log (only if it installed), tests-float32.log,
# tests-float64.log, step_speed.log.
#
# Exit status: 0 all passed; 1 the equivalence tests failed or ran out of time; 2 no CUDA device, no
# python or no importable adaptopt; 3 the tests passed but the benchmark failed or ran out of time.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 2
if [[ $# -gt 0 ]]; then
    OUT_DIR=$1
elif [[ -n ${OUT:-} ]]; then
    OUT_DIR=$OUT
else
    OUT_DIR=$ROOT/runs/gpu_check
fi
if ! mkdir -p -- "$OUT_DIR" || ! OUT_DIR=$(cd -- "$OUT_DIR" && pwd); then
    echo "gpu_check: cannot create $OUT_DIR" >&2
    exit 2
fi
cd "$ROOT" || exit 2

PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-420}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
REPORT=$OUT_DIR/report.md
FENCE='```'
: >"$REPORT"

say() { printf '%s\n' "$*" | tee -a "$REPORT"; }
# block FILE [LINES]: the file (or its last LINES lines) as a code block in the report.
block() {
    {
        echo "$FENCE"
        if [[ -n ${2:-} ]]; then tail -n "$2" -- "$1"; else cat -- "$1"; fi
        echo "$FENCE"
    } | tee -a "$REPORT"
}
# limit WANTED: WANTED seconds, or what the budget has left after a 20 s reserve (0: no time left).
limit() {
    local left=$((BUDGET - SECONDS - 20))
    ((left < 10)) && left=0
    echo $(($1 < left ? $1 : left))
}
# stage LOG SECONDS COMMAND...: run COMMAND under timeout, appending its output to LOG; sets RC.
stage() {
    local log=$1 seconds=$2 started=$SECONDS
    shift 2
    if ((seconds == 0)); then
        echo "skipped: the ${BUDGET} s budget is spent" >>"$log"
        RC=124
        return
    fi
    {
        printf '$'
        printf ' %q' "$@"
        echo
    } >>"$log"
    timeout -k 10 "$seconds" "$@" >>"$log" 2>&1
    RC=$?
    local how="exit $RC"
    ((RC == 124 || RC == 137)) && how="timed out after ${seconds} s (exit $RC)"
    echo "($how, $((SECONDS - started)) s)" >>"$log"
}
# outcome RC: how a stage ended, in words.
outcome() {
    case $1 in
    0) echo "ok (exit 0)" ;;
    124 | 137) echo "TIMED OUT (exit $1)" ;;
    *) echo "FAILED (exit $1)" ;;
    esac
}
finish() {
    say ""
    say "Total: ${SECONDS} s. Exit status $1: $2"
    exit "$1"
}

say "# GPU check"
say ""
if COMMIT=$(git rev-parse --short HEAD 2>/dev/null); then
    COMMIT="commit $COMMIT, $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') paths changed"
else
    COMMIT="not a git checkout"
fi
say "$(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(hostname 2>/dev/null || echo unknown), $ROOT ($COMMIT)," \
    "output in $OUT_DIR"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    finish 2 "no python: '$PYTHON' is not on PATH (set PYTHON)"
fi

# ---- Environment: nvidia-smi and torch --------------------------------------------------------------------
PROBES=$(mktemp -d) || exit 2
trap 'rm -rf -- "$PROBES"' EXIT
cat >"$PROBES/gpu_check_versions.py" <<'EOF'
import platform

import torch

cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}")
print(f"torch.cuda.is_available(): {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
EOF
cat >"$PROBES/gpu_check_cuda.py" <<'EOF'
import sys

try:
    import torch
except ImportError as error:
    sys.exit(f"no CUDA device: torch cannot be imported ({error})")
if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    sys.exit(f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__})")
x = torch.ones(1 << 20, device="cuda")
torch.cuda.synchronize()
assert float(x.sum()) == 1 << 20
print(f"CUDA works on {torch.cuda.get_device_name(0)}")
EOF
ENV_LOG=$OUT_DIR/env.log
if command -v nvidia-smi >/dev/null 2>&1; then
    SMI=$(timeout -k 5 30 nvidia-smi --format=csv \
        --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,power.limit 2>&1)
else
    SMI="nvidia-smi: not found"
fi
VERSIONS=$(timeout -k 5 60 "$PYTHON" "$PROBES/gpu_check_versions.py" 2>&1)
printf '%s\n\n%s\n\n' "$SMI" "$VERSIONS" >"$ENV_LOG"
command -v nvidia-smi >/dev/null 2>&1 && stage "$ENV_LOG" 30 nvidia-smi
say ""
say "## Environment"
say ""
say "nvidia-smi summary, torch and CUDA versions (full nvidia-smi in env.log):"
printf '%s\n%s\n\n%s\n%s\n' "$FENCE" "$SMI" "$VERSIONS" "$FENCE" | tee -a "$REPORT"

# ---- CUDA present? -----------------------------------------------------------------------------------------
stage "$ENV_LOG" "$(limit 60)" "$PYTHON" "$PROBES/gpu_check_cuda.py"
CUDA_SAYS=$(grep -E '^(no CUDA device|CUDA works)' "$ENV_LOG" | tail -n 1)
if ((RC != 0)); then
    say ""
    say "## no CUDA device"
    say ""
    say "${CUDA_SAYS:-no CUDA device: the CUDA check exited $RC (see env.log)}"
    [[ $DRY_RUN != 0 ]] && finish 2 "no CUDA device (dry run); nothing was run on a GPU"
    finish 2 "no CUDA device; nothing was run on a GPU"
fi
say ""
say "$CUDA_SAYS."
if [[ $DRY_RUN != 0 ]]; then
    finish 0 "dry run: a CUDA device is there; stopping before the install, the tests and the benchmark"
fi

# ---- adaptopt importable (install only if not) -------------------------------------------------------------
if ! timeout -k 5 60 "$PYTHON" -c 'import adaptopt' >/dev/null 2>&1; then
    INSTALL_LOG=$OUT_DIR/install.log
    : >"$INSTALL_LOG"
    stage "$INSTALL_LOG" "$(limit 120)" "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -e .
    if ! timeout -k 5 60 "$PYTHON" -c 'import adaptopt' >>"$INSTALL_LOG" 2>&1; then
        echo "pip install did not make adaptopt importable: using PYTHONPATH=$ROOT/src" >>"$INSTALL_LOG"
        export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
        HOW="src/ is on PYTHONPATH, as pip install failed"
    else
        HOW="installed with pip install --no-deps -e ."
    fi
    if ! timeout -k 5 60 "$PYTHON" -c 'import adaptopt' >>"$INSTALL_LOG" 2>&1; then
        say ""
        block "$INSTALL_LOG" 20
        finish 2 "adaptopt cannot be imported (see install.log)"
    fi
    say ""
    say "adaptopt was not importable: $HOW (see install.log)."
fi

# ---- Equivalence of the execution paths on CUDA, float32 and float64 ----------------------------------------
say ""
say "## Execution paths against the reference, on CUDA"
say ""
TESTS_FAILED=0
# tests/test_execution.py's equivalence tests (every optimizer configuration, bucketed bitwise and compiled
# within tolerance against the reference loop) on the device and in the dtype these variables name.
for dtype in float32 float64; do
    LOG=$OUT_DIR/tests-$dtype.log
    : >"$LOG"
    stage "$LOG" "$(limit $((TESTS_TIMEOUT / 2)))" env ADAPTOPT_TEST_DEVICE=cuda ADAPTOPT_TEST_DTYPE=$dtype \
        "$PYTHON" -m pytest -p no:cacheprovider -q tests/test_execution.py -k equals_reference
    ((RC != 0)) && TESTS_FAILED=1
    say "tests/test_execution.py -k equals_reference on cuda, $dtype: $(outcome "$RC") (tests-$dtype.log)"
    block "$LOG" 15
    say ""
done

# ---- Step times on CUDA against torch's fused and foreach Adam ----------------------------------------------
say ""
say "## Step times on CUDA (benchmarks/step_speed.py --device cuda)"
say ""
BENCH_LOG=$OUT_DIR/step_speed.log
: >"$BENCH_LOG"
stage "$BENCH_LOG" "$(limit "$BENCH_TIMEOUT")" "$PYTHON" benchmarks/step_speed.py --device cuda --repeats 5 \
    --no-memory --no-epoch --contenders "torch Adam fused" "torch Adam(amsgrad=True) fused" "torch Adam foreach" \
    "ours Adam reference" "ours Adam bucketed (eager)" "ours Adam" "ours AMSGrad" "ours RAdam" "ours AdaBelief" \
    "ours Sophia"
BENCH_RC=$RC
say "$(outcome "$BENCH_RC") (step_speed.log):"
block "$BENCH_LOG" 60

if ((TESTS_FAILED)); then
    finish 1 "the equivalence tests FAILED or ran out of time"
elif ((BENCH_RC != 0)); then
    finish 3 "the equivalence tests passed; the benchmark FAILED or ran out of time"
fi
finish 0 "the equivalence tests passed and the benchmark ran"
