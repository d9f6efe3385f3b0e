#!/usr/bin/env bash
# One call on the GPU machine: build the extension with all cores, run the tests, run the
# benchmark, and leave logs and JSON in the folder given as $1. Stages can be picked with $2
# (comma list of build,test,bench; default all) so that a call fits the device's time limit.
#
#   bash scripts/gpu_check.sh "$OUT"                 # everything
#   bash scripts/gpu_check.sh "$OUT" build,test      # no benchmark
#
# FLASH_VARLEN_COMMIT=<sha> names the commit in the benchmark record when the copy of the tree
# on the GPU machine cannot resolve it with git.
#
# The GPU machine has no network: the CUTLASS headers travel as the nvidia-cutlass wheel in
# .whl/ (see README, "Developing"), installed here into a scratch folder, headers only.
set -uo pipefail

out_dir=${1:?usage: gpu_check.sh OUT_DIR [build,test,bench]}
stages=${2:-build,test,bench}
mkdir -p "$out_dir"
export PYTHONUNBUFFERED=1
status=0

has_stage() { [[ ",$stages," == *",$1,"* ]]; }

if ! python3 -c "import cutlass_library" 2>/dev/null && ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cutlass_site .whl/nvidia_cutlass-*.whl
    export PYTHONPATH=/tmp/cutlass_site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out_dir/gpu.txt"

if has_stage build; then
    start=$(date +%s)
    MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace > "$out_dir/build.log" 2>&1
    rc=$?
    echo "build rc=$rc wall_s=$(( $(date +%s) - start )) jobs=${MAX_JOBS:-16}" | tee -a "$out_dir/summary.txt"
    if [ $rc -ne 0 ]; then tail -40 "$out_dir/build.log"; exit $rc; fi
fi

if has_stage test; then
    python3 -m pytest tests -q -rs -p no:cacheprovider --junitxml="$out_dir/tests.xml" > "$out_dir/tests.log" 2>&1
    rc=$?
    echo "tests rc=$rc: $(tail -1 "$out_dir/tests.log")" | tee -a "$out_dir/summary.txt"
    grep -E "^(FAILED|ERROR)" "$out_dir/tests.log" | head -30
    [ $rc -ne 0 ] && status=$rc
fi

if has_stage bench; then
    python3 benchmarks/bench_forward.py --out "$out_dir/bench.json" > "$out_dir/bench.log" 2>&1
    rc=$?
    echo "bench rc=$rc" | tee -a "$out_dir/summary.txt"
    tail -30 "$out_dir/bench.log"
    [ $rc -ne 0 ] && status=$rc
fi
exit $status
