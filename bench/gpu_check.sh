#!/usr/bin/env bash
# One prepared check for a lent GPU machine (issue 7, docs/benchmarks.md), under 8 minutes:
#   wheels  install the carried Python 3.12 wheels (.whl/: transformers 4.37.2, llava-torch, ...)
#   build   build llava_agile._C with its CUDA kernels against the machine's torch
#   tests   pytest tests/test_ext_cuda.py (the CUDA parity tests)
#   e2e     python bench/e2e.py --json $OUT/e2e.json
#   select  python bench/bench_select.py --device cuda (JSON to $OUT/select.json), then its
#           --baselines (cdpruner, trim, holov, prumerge_plus; $OUT/select_baselines.json)
#   parity  pytest tests/test_ext_parity.py (CPU parity, which CI runs too: last, if time is left)
# Each step has its own time limit (and all of them share --budget seconds), its log goes to
# $OUT/setup.log (wheels, build), tests.log (tests, parity), e2e.log or select.log (at most 8
# files come back from the device), and a failed or timed-out step does not stop the next.
# $OUT/summary.txt holds the machine, versions and every step's status; exit 1 if any failed.
#
#   bash bench/gpu_check.sh                        # everything (on the device: OUT is set)
#   bash bench/gpu_check.sh --steps "e2e"          # rerun some steps on a warm machine
#   bash bench/gpu_check.sh --dry-run              # print the plan, run nothing
#   bash bench/gpu_check.sh --cpu --steps "e2e"    # CPU rehearsal: e2e --tiny, CPU build, ...
# Environment: OUT (default out/gpu_check), PYTHON (python3), WHEELS (.whl), SITE (/tmp/site),
# E2E_ARGS, SELECT_ARGS (arguments after --device/--out), MAX_JOBS (16).
# shellcheck disable=SC2317  # the do_* steps run through `bash -c` (exported functions)
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

DRY=0 CPU=0
ALL="wheels build tests e2e select parity"
STEPS=$ALL
BUDGET=450
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --cpu) CPU=1 ;;
        --steps) STEPS=${2:?--steps needs a list}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case $BUDGET in ''|*[!0-9]*) echo "gpu_check.sh: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
for s in $STEPS; do
    case " $ALL " in *" $s "*) ;;
        *) echo "gpu_check.sh: unknown step '$s' ($ALL)" >&2; exit 2 ;;
    esac
done

OUT=${OUT:-$ROOT/out/gpu_check}
mkdir -p "$OUT" || exit 2
export PY=${PYTHON:-python3} ROOT OUT CPU
export WHEELS=${WHEELS:-$ROOT/.whl} SITE=${SITE:-/tmp/site}
export E2E_ARGS=${E2E_ARGS:-} MAX_JOBS=${MAX_JOBS:-16}
export SELECT_ARGS=${SELECT_ARGS:---dims 4096 --keeps 64 --batches 1 8 --repeat 10}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
fi
DEADLINE=$(( $(date +%s) + BUDGET ))
SUMMARY=$OUT/summary.txt
FAILED=0
: >"$SUMMARY"

# ------------------------------------------------------------------ steps (run in a child bash)
do_wheels() {
    if [ -d "$SITE/transformers-4.37.2.dist-info" ] && [ -d "$SITE/llava" ]; then
        echo "wheels already installed in $SITE"
    else
        ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS (copy /work/shared/wheels-py312 there and carry it)"; return 1; }
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHEELS"/*.whl || return 1
    fi
    PYTHONPATH=$SITE:$PYTHONPATH "$PY" -c "
import transformers, tokenizers, llava, llava.model.language_model.llava_llama
print('transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)
assert transformers.__version__ == '4.37.2', transformers.__version__"
}

ext_ready() {  # the extension imports and has kernels for this run's device
    "$PY" -c "
import llava_agile.backend as b, sys
dev = 'cpu' if $CPU else 'cuda'
sys.exit(0 if b.ext_available(dev) else print(b.unavailable_reason(dev)) or 1)"
}

do_build() {
    if ext_ready >/dev/null 2>&1; then echo "llava_agile._C already built for this device"; return 0; fi
    LLAVA_AGILE_CUDA=$([ "$CPU" = 1 ] && echo 0 || echo 1) "$PY" setup.py build_ext --inplace || return 1
    ext_ready
}

run_pytest() {  # file [pytest args]: nothing to do when the file is absent
    [ -f "$1" ] || { echo "$1 absent: nothing to run"; return 0; }
    "$PY" -m pytest -q -p no:cacheprovider -rs "$@"
}

do_tests() { run_pytest tests/test_ext_cuda.py; }

do_parity() {
    local par=""
    "$PY" -c "import xdist" 2>/dev/null && par="-n 8"
    # shellcheck disable=SC2086
    run_pytest tests/test_ext_parity.py $par
}

do_e2e() {
    local mode=""
    [ "$CPU" = 1 ] && mode="--tiny"
    # shellcheck disable=SC2086
    "$PY" bench/e2e.py $mode --json "$OUT/e2e.json" $E2E_ARGS
}

do_select() {
    [ -f bench/bench_select.py ] || { echo "bench/bench_select.py absent: nothing to run"; return 0; }
    local flag=--out dev=cuda
    "$PY" bench/bench_select.py --help 2>/dev/null | grep -q -- '--json' && flag=--json
    [ "$CPU" = 1 ] && dev="cpu --quick"
    # shellcheck disable=SC2086
    "$PY" bench/bench_select.py --device $dev $flag "$OUT/select.json" $SELECT_ARGS || return 1
    "$PY" bench/bench_select.py --help 2>/dev/null | grep -q -- '--baselines' || return 0
    # shellcheck disable=SC2086
    "$PY" bench/bench_select.py --device ${dev%% *} --baselines --dims 4096 --keeps 64 192 \
        --repeat 5 $flag "$OUT/select_baselines.json"
}
export -f do_wheels ext_ready do_build run_pytest do_tests do_e2e do_select do_parity

# ------------------------------------------------------------------ runner
logname() { case $1 in wheels|build) echo setup ;; tests|parity) echo tests ;; *) echo "$1" ;; esac; }

record() {  # step status seconds note
    printf '%-7s %-9s %5ss  %s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"
}

step() {  # name cap_seconds
    local name=$1 cap=$2 log t0 left limit rc status
    log=$OUT/$(logname "$1").log
    t0=$(date +%s)
    left=$(( DEADLINE - t0 ))
    limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 5 ]; then
        echo "== [$name] skipped: the ${BUDGET}s budget is spent"
        record "$name" SKIPPED 0 "budget spent"
        FAILED=1
        return 1
    fi
    echo "== [$name] limit ${limit}s, log $log"
    if [ "$DRY" = 1 ]; then
        declare -f "do_$name" | sed -n '3,$p' | sed '$d' | sed 's/^/   | /'
        record "$name" DRY-RUN 0 "limit ${limit}s"
        return 0
    fi
    echo "== [$name] $(date -u +%T)" >>"$log"
    timeout --kill-after=10 "$limit" bash -c "do_$name" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=OK ;;
        124|137) status=TIMEOUT ;;
        *) status="FAILED" ;;
    esac
    [ "$rc" = 0 ] || FAILED=1
    record "$name" "$status" "$(( $(date +%s) - t0 ))" "rc=$rc $(tail -n 1 "$log" | cut -c1-90)"
    echo "   $status (rc=$rc) in $(( $(date +%s) - t0 ))s"
    [ "$rc" = 0 ] || tail -n 15 "$log" | sed 's/^/   | /'
    return $rc
}

{
    echo "gpu_check $(date -u +%FT%TZ)  steps: $STEPS  budget: ${BUDGET}s  cpu: $CPU  dry-run: $DRY"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    command -v nvcc >/dev/null && nvcc --version | tail -n 1
    "$PY" -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1
} >>"$SUMMARY"
cat "$SUMMARY"

caps() {
    case $1 in wheels) echo 90 ;; build) echo 300 ;; tests) echo 150 ;; e2e) echo 300 ;;
        select) echo 150 ;; parity) echo 150 ;; esac
}
for s in $STEPS; do [ "$DRY" = 1 ] || : >"$OUT/$(logname "$s").log"; done
case " $STEPS " in  # a rerun without the wheels step still uses what an earlier run installed
    *" wheels "*) ;;
    *) [ "$DRY" = 0 ] && [ -d "$SITE/transformers-4.37.2.dist-info" ] && export PYTHONPATH=$SITE:$PYTHONPATH ;;
esac
for s in $ALL; do
    case " $STEPS " in *" $s "*) ;; *) continue ;; esac
    if step "$s" "$(caps "$s")" && [ "$s" = wheels ] && [ "$DRY" = 0 ]; then
        export PYTHONPATH=$SITE:$PYTHONPATH
    fi
done

# the figures last, where the reply's output tail shows them
if [ -f "$OUT/e2e.log" ] && [ "$DRY" = 0 ]; then
    echo; echo "== e2e figures"; sed -n '/^== batch/,$p' "$OUT/e2e.log" | cut -c1-120
fi
[ -f "$OUT/tests.log" ] && [ "$DRY" = 0 ] && { echo; echo "== tests"; grep -E "^(== \[|[0-9]+ (passed|failed)|FAILED|ERROR)" "$OUT/tests.log" | cut -c1-160; }
[ -f "$OUT/select.log" ] && [ "$DRY" = 0 ] && { echo; echo "== select"; tail -n 14 "$OUT/select.log" | cut -c1-120; }
echo; echo "== summary ($SUMMARY)"; sed -n '/^[a-z0-9]* *\(OK\|FAILED\|TIMEOUT\|SKIPPED\|DRY-RUN\) /p' "$SUMMARY"
exit $FAILED
