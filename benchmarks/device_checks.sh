#!/usr/bin/env bash
# The GPU checks of a device lease, in order of value, each step under its own time limit so that a slow
# one cannot take the others' time: correctness first (tests/test_gpu.py: the GPU paths; then every NA
# backend against float64), then benchmarks/gpu.py's sections. All of them take longer than one call's 10
# minutes: name the steps a call runs. Each step's log goes to $OUT, where the device tool brings it back;
# the steps that finish append their tables to RESULTS.md, copied there after each. Exits 1 when a step
# failed or was cut. Needs the kit of benchmarks/device_kit.sh in .device/ (carried). On the device
# machine, from the repository's root:
#   bash benchmarks/device_checks.sh                      # every step
#   bash benchmarks/device_checks.sh gpu-tests pipeline   # some, in the order given
#   PIPELINE_RUNS=cpu,base bash benchmarks/device_checks.sh pipeline   # some of gpu.py's pipeline runs
#   PIPELINE_CORES=8 bash benchmarks/device_checks.sh pipeline          # as a node of 8 CPUs per GPU
#   KERNEL_CASES="7x7 or 9x21" bash benchmarks/device_checks.sh kernel-tests  # some shapes (pytest -k)
set -uo pipefail
cd "$(dirname "$0")/.." || exit
OUT=${OUT:-/tmp/device-checks}
mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache  # shared by the steps
failed=()
step() {
    local limit=$1 name=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    local start=$SECONDS
    timeout -k 10 "$limit" bash benchmarks/device_run.sh "$@" >"$OUT/$name.log" 2>&1
    local code=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $code after $((SECONDS - start)) s"
    [ "$code" -eq 0 ] || failed+=("$name")
    cp benchmarks/RESULTS.md "$OUT/"  # the tables recorded so far, should the call be cut
}
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,driver_version --format=csv
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
# limits from the first lease (2026-11-30): the GPU tests ~40 s plus ~10 s per kernel case (flex
# compiles), an eager model row a few seconds, a pipeline run ~30-40 s (eight fit in the step); compiled rows run only where
# `compile: auto` compiles (a failing compile took ~50 s on torch 2.11)
run_step() {
    case $1 in
    gpu-tests) step 120 gpu-tests python3 -m pytest -v -rA --tb=short -p no:cacheprovider tests/test_gpu.py \
        -k "not every_backend" ;;
    pipeline)
        touch /tmp/before-pipeline
        step 330 pipeline python3 benchmarks/gpu.py --only pipeline --record \
            ${PIPELINE_RUNS:+--pipeline-runs "$PIPELINE_RUNS"} ${PIPELINE_CORES:+--cores "$PIPELINE_CORES"}
        # Ray Data's executor logs in full (gpu.py prints a summary of each run's)
        for session in $(find /tmp/ray -maxdepth 1 -name 'session_2*' -newer /tmp/before-pipeline); do
            tar -C "$session/logs" -czf "$OUT/ray-data-$(basename "$session").tar.gz" ray-data
        done ;;
    models) step 80 models python3 benchmarks/gpu.py --only models --record ;;
    decode) step 30 decode python3 benchmarks/gpu.py --only decode --record ;;
    accuracy) step 30 accuracy python3 benchmarks/gpu.py --only accuracy --record ;;
    kernel-tests) step 150 kernel-tests python3 -m pytest -v -rA --tb=short -p no:cacheprovider \
        tests/test_gpu.py -k "every_backend${KERNEL_CASES:+ and ($KERNEL_CASES)}" ;;
    kernels) step 60 kernels python3 benchmarks/gpu.py --only kernels --record ;;
    *) echo "no step $1" && failed+=("$1") ;;
    esac
}
for name in "${@:-gpu-tests pipeline models decode accuracy kernel-tests kernels}"; do
    for one in $name; do run_step "$one"; done
done
[ ${#failed[@]} -eq 0 ] || { echo "failed or cut: ${failed[*]}"; exit 1; }
