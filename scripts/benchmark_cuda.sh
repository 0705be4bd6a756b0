#!/usr/bin/env bash
# The GPU measurements of docs/performance.md: fp16, 512x512, 50 steps, ours against diffusers in one process,
# first eager, then with both UNets compiled (CUDA graphs, then autotuned kernels as well). Each run has its own
# time limit, so one that fails or runs long still leaves the others' tables.
#
#   bash scripts/benchmark_cuda.sh [OUTDIR] [more scripts/benchmark.py flags, which win over these]
#
# Needs a CUDA GPU and requirements-test.txt's diffusers ($PYTHON picks the interpreter, default python3).
# Tables land in OUTDIR (default bench-cuda/), one markdown file per run, with the run's log beside it.
# A CPU dry run of the same steps on the tiny test model:
#   bash scripts/benchmark_cuda.sh /tmp/bench-dry --device cpu --precisions fp32 --sizes 64 \
#       --config tests/configs/tiny.yaml --repeats 1
set -u
out=${1:-bench-cuda}
shift $(($# > 0 ? 1 : 0))
limit=${BENCH_LIMIT_S:-400}  # seconds per run; max-autotune compiles for minutes
out=$(mkdir -p "$out" && cd "$out" && pwd) || exit 2  # absolute: the runs below start in the repository root
cd "$(dirname "$0")/.." || exit 2

common=(--device cuda --precisions fp16 --sizes 512 --vs diffusers --steps 50 --repeats 20)
status=0
run() {
    local name=$1
    shift
    echo "== $name: ${PYTHON:-python3} scripts/benchmark.py ${common[*]} $* ${extra[*]}"
    PYTHONUNBUFFERED=1 timeout "$limit" "${PYTHON:-python3}" scripts/benchmark.py "${common[@]}" "$@" "${extra[@]}" \
        >"$out/$name.md" 2>"$out/$name.log"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "   failed (exit $rc; 124 = over ${limit} s); the end of $out/$name.log:"
        tail -n 5 "$out/$name.log"
        status=1
    else
        grep -E "^\| [a-z0-9-]+ \| |^Note" "$out/$name.md"  # the table's rows and notes
    fi
}
extra=("$@")
run eager --rows text,unet,vae
run compiled-reduce-overhead --rows unet --compile reduce-overhead
run compiled-max-autotune --rows unet --compile max-autotune
exit $status
