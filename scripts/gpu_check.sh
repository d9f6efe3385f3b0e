#!/usr/bin/env bash
# One call on the GPU machine: build the extension with all cores, run the tests, run the
# benchmark, and leave logs and JSON in the folder given as $1. Stages are picked with $2, a comma
# list of build, test, families, bench, bench_backward, bench_head_dims, memcheck, racecheck,
# narrowed (default build,test,bench), so that a call fits the device's time limit. The build
# targets the GPU it sees (sm_90 on an H200; setup.py says so); FLASH_VARLEN_ARCHS=80,90 builds the full set.
#
#   bash scripts/gpu_check.sh "$OUT"                 # build, tests, targets.md benchmark
#   bash scripts/gpu_check.sh "$OUT" build,test      # no benchmark
#
# FLASH_VARLEN_COMMIT=<sha> names the commit in the benchmark record when the copy of the tree
# on the GPU machine cannot resolve it with git.
#
# The GPU machine has no network: the CUTLASS headers travel as the nvidia-cutlass wheel in
# .whl/ (see README, "Developing"), installed here into a scratch folder, headers only.
set -uo pipefail

out_dir=${1:?usage: gpu_check.sh OUT_DIR [stages]}
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

if has_stage families; then
    # The GPU tests once per kernel family that runs on this GPU, each forced with
    # FLASH_VARLEN_KERNEL_FAMILY (the test stage runs whichever dispatch picks).
    families=$(python3 - <<'PY'
import os
import torch
from flash_varlen._extension import load_extension
extension = load_extension()
major, minor = torch.cuda.get_device_capability()
for family, dtype, bucket in sorted(set((f, d, b) for f, d, b in extension.compiled_kernels())):
    os.environ["FLASH_VARLEN_KERNEL_FAMILY"] = family
    try:
        extension.select_kernel_family("forward", dtype, bucket, False, major * 10 + minor)
    except NotImplementedError:
        continue
    print(family)
PY
)
    families=$(echo "$families" | sort -u)
    for family in $families; do
        FLASH_VARLEN_KERNEL_FAMILY=$family python3 -m pytest tests -q -m gpu -p no:cacheprovider \
            > "$out_dir/tests_$family.log" 2>&1
        rc=$?
        echo "tests of family $family rc=$rc: $(tail -1 "$out_dir/tests_$family.log")" | tee -a "$out_dir/summary.txt"
        [ $rc -ne 0 ] && status=$rc
    done
fi

if has_stage bench; then
    python3 benchmarks/bench_forward.py --out "$out_dir/bench.json" > "$out_dir/bench.log" 2>&1
    rc=$?
    echo "bench rc=$rc" | tee -a "$out_dir/summary.txt"
    tail -16 "$out_dir/bench.log"
    [ $rc -ne 0 ] && status=$rc
fi

if has_stage bench_backward; then
    # Forward and backward on the targets.md workloads, with the deterministic backward too.
    python3 benchmarks/bench_backward.py --out "$out_dir/bench_backward.json" \
        > "$out_dir/bench_backward.log" 2>&1
    rc=$?
    echo "bench_backward rc=$rc" | tee -a "$out_dir/summary.txt"
    tail -24 "$out_dir/bench_backward.log"
    [ $rc -ne 0 ] && status=$rc
fi

if has_stage bench_head_dims; then
    # The other head-dim buckets (not in targets.md) against PyTorch's varlen_attn.
    python3 benchmarks/bench_forward.py --out "$out_dir/bench_head_dims.json" \
        --workloads docs,equal2k --layouts mha_d64,mha_d96,mha_d192,mha_d256 \
        --impl ours,varlen_attn > "$out_dir/bench_head_dims.log" 2>&1
    rc=$?
    echo "bench_head_dims rc=$rc" | tee -a "$out_dir/summary.txt"
    tail -20 "$out_dir/bench_head_dims.log"
    [ $rc -ne 0 ] && status=$rc
fi

sanitize() {  # tool, direction
    compute-sanitizer --tool "$1" --error-exitcode 1 \
        python3 "scripts/memcheck_$2.py" > "$out_dir/$1_$2.log" 2>&1
    local rc=$?
    echo "$1 $2 rc=$rc: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|memcheck cases' \
        "$out_dir/$1_$2.log" | tr '\n' ' ')" | tee -a "$out_dir/summary.txt"
    [ $rc -ne 0 ] && status=$rc
}

if has_stage memcheck; then
    # Tiles that hang past the ends of exactly-sized tensors, under the memory checker.
    for direction in forward backward; do sanitize memcheck $direction; done
fi

if has_stage racecheck; then
    # Shared-memory hazards and barrier use of the warp-specialized sm90 kernels (TMA, named
    # barriers; the forward's O staged over Q, the backward's dS and dQ staged for wgmma and the
    # bulk reduce-add): both directions.
    for tool in racecheck synccheck; do
        for direction in forward backward; do sanitize $tool $direction; done
    done
fi

if has_stage narrowed; then
    # A development build narrowed to one kernel pair must refuse every other (dtype, bucket)
    # with NotImplementedError (the full build skips that test). Built in a scratch copy so the
    # full in-place build stays.
    scratch=/tmp/flash_varlen_narrowed
    rm -rf "$scratch" && mkdir -p "$scratch"
    cp -r setup.py pyproject.toml csrc flash_varlen tests "$scratch"/
    rm -f "$scratch"/flash_varlen/_C*.so
    (cd "$scratch" && FLASH_VARLEN_DTYPES=bf16 FLASH_VARLEN_HEAD_DIMS=128 FLASH_VARLEN_ARCHS=90 \
        python3 setup.py build_ext --inplace > "$out_dir/narrowed_build.log" 2>&1 &&
        python3 -m pytest tests/test_forward_gpu.py -q -rs -p no:cacheprovider \
            -k "missing_kernels or d128-causal-q113k203-mha" \
            > "$out_dir/narrowed_tests.log" 2>&1)
    rc=$?
    echo "narrowed rc=$rc: $(tail -1 "$out_dir/narrowed_tests.log")" | tee -a "$out_dir/summary.txt"
    [ $rc -ne 0 ] && status=$rc
fi
exit $status
