#!/usr/bin/env bash
# Forward (or backward) speed of several commits in one GPU run: the way to tell which change
# moved a number, since two runs on two machines differ by up to ~2.5% on the same tree.
#
# Here (no GPU needed):  bash scripts/compare_trees_forward.sh pack DIR REV...
#   writes DIR/<rev>.tar (the build inputs of each commit, git archive) for the device call.
# On the GPU machine:    bash scripts/compare_trees_forward.sh run DIR OUT [BENCH ARGS...]
#   builds every DIR/*.tar in parallel, narrowed to the sm90 family, bf16, head dim 128 (about
#   three minutes on 16 cores), then runs benchmarks/bench_forward.py of each tree with that
#   family forced, one tree after the other, and prints one table (TFLOP/s, a column per tree).
#   BENCH ARGS default to: --layouts mha,gqa --workloads docs,short,equal2k
#
# Builds made here instead (no device time spent compiling): build each commit's worktree with
# the GPU machine's Python (3.12) and the same narrowing, then
#   bash scripts/compare_trees_forward.sh pack-built DIR NAME WORKTREE
# writes DIR/NAME.tar.xz (the extension and its build record), and on the GPU machine
#   bash scripts/compare_trees_forward.sh run-built DIR OUT [BENCH ARGS...]
# benchmarks each NAME with the checkout's Python package and that extension (the trees must
# differ in csrc/ only).
#
# COMPARE_FAMILY (default sm90): the kernel family forced in the benchmarks (for run-built trees
# of another family; `run` builds the sm90 family only).
# COMPARE_DIRECTION (default forward): backward runs benchmarks/bench_backward.py --impl ours
# instead (the backward alone, each tree's own forward before it) and tabulates its backward rates.
# COMPARE_ROUNDS (default 1): benchmark every tree that many times, in turn, the order reversed
# every other round (the machine drifts: its dense rate moved by up to 9% between the trees of
# one call on 2026-12-05), and print the mean of the rounds with each tree's largest
# round-to-round difference.
#
# The CUTLASS headers come from .whl/ as in scripts/gpu_check.sh.
set -uo pipefail

mode=${1:?usage: compare_trees_forward.sh pack DIR REV... | run DIR OUT [BENCH ARGS...]}
dir=${2:?missing DIR}
shift 2

if [ "$mode" = pack-built ]; then
    name=${1:?missing NAME}
    worktree=${2:?missing WORKTREE}
    mkdir -p "$dir"
    tar cJf "$dir/$name.tar.xz" -C "$worktree/flash_varlen" \
        $(cd "$worktree/flash_varlen" && ls _C.cpython-*.so) _build_info.py
    echo "$dir/$name.tar.xz: $(git -C "$worktree" log -1 --format='%h %s' | cut -c1-90)"
    exit 0
fi

if [ "$mode" = pack ]; then
    mkdir -p "$dir"
    for rev in "$@"; do
        git archive --format=tar -o "$dir/${rev//\//_}.tar" "$rev" -- setup.py pyproject.toml csrc flash_varlen benchmarks
        echo "$dir/${rev//\//_}.tar: $(git log -1 --format='%h %s' "$rev" | cut -c1-90)"
    done
    exit 0
fi

out=${1:?missing OUT}
shift
family=${COMPARE_FAMILY:-sm90}
direction=${COMPARE_DIRECTION:-forward}
case "$direction" in
    forward) bench=(benchmarks/bench_forward.py --impl ours --families "$family") ;;
    backward) bench=(benchmarks/bench_backward.py --impl ours) ;;
    *) echo "COMPARE_DIRECTION must be forward or backward, not $direction" >&2; exit 2 ;;
esac
bench_args=("$@")
[ ${#bench_args[@]} -eq 0 ] && bench_args=(--layouts mha,gqa --workloads docs,short,equal2k)

if [ "$mode" = run ] && ! python3 -c "import cutlass_library" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cutlass_site .whl/nvidia_cutlass-*.whl
    export PYTHONPATH=/tmp/cutlass_site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$out"
trees=()
if [ "$mode" = run-built ]; then
    for tar in "$dir"/*.tar.xz; do
        name=$(basename "$tar" .tar.xz)
        trees+=("$name")
        tree=/tmp/compare_trees/$name
        rm -rf "$tree" && mkdir -p "$tree" && cp -r flash_varlen benchmarks "$tree"/
        rm -f "$tree"/flash_varlen/_C*.so "$tree"/flash_varlen/_build_info.py
        tar xJf "$tar" -C "$tree/flash_varlen"
    done
fi
for tar in $([ "$mode" = run ] && ls "$dir"/*.tar); do
    name=$(basename "$tar" .tar)
    trees+=("$name")
    tree=/tmp/compare_trees/$name
    rm -rf "$tree" && mkdir -p "$tree" && tar xf "$tar" -C "$tree"
    (cd "$tree" && FLASH_VARLEN_FAMILIES=sm90 FLASH_VARLEN_DTYPES=bf16 FLASH_VARLEN_HEAD_DIMS=128 \
        FLASH_VARLEN_ARCHS=90 MAX_JOBS=4 NVCC_THREADS=1 python3 setup.py build_ext --inplace \
        > "$out/build_$name.log" 2>&1; echo "build $name rc=$?") &
done
wait
rounds=${COMPARE_ROUNDS:-1}
# One benchmark at a time: the trees share the GPU.
for round in $(seq 1 "$rounds"); do
    order=("${trees[@]}")
    if [ $((round % 2)) -eq 0 ]; then
        order=($(printf '%s\n' "${trees[@]}" | tac))
    fi
    for name in "${order[@]}"; do
        # PYTHONPATH: the benchmarks put the source tree after site-packages (an installed
        # package wins there), so an installed flash_varlen would otherwise shadow every tree.
        (cd "/tmp/compare_trees/$name" && PYTHONPATH="/tmp/compare_trees/$name" \
            FLASH_VARLEN_KERNEL_FAMILY=$family python3 "${bench[@]}" \
            --out "$out/${direction}_$name.r$round.json" "${bench_args[@]}" \
            > "$out/bench_$name.r$round.log" 2>&1; echo "bench $name round $round rc=$?")
    done
done
python3 - "$out" "$family" "$direction" "$rounds" "${trees[@]}" <<'PY'
import json
import sys

out, family, direction, rounds, names = (sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                         sys.argv[5:])
# table[row][tree]: the TFLOP/s of each round that ran; clocks[row][tree]: the median SM clock
# (MHz) of each round's timing, where nvidia-smi gave one (benchmarks/gpu_clocks.py)
table: dict[str, dict[str, list[float]]] = {}
clocks: dict[str, dict[str, list[float]]] = {}
for name in names:
    for round_ in range(1, rounds + 1):
        try:
            rows = json.load(open(f"{out}/{direction}_{name}.r{round_}.json"))["rows"]
        except (OSError, KeyError, ValueError) as error:
            print(f"{name} round {round_}: no benchmark ({error})")
            continue
        for row in rows:
            key = f"{row['workload']}/{row['layout']}/{'causal' if row['causal'] else 'full'}"
            # bench_forward.py names the forced family's column; bench_backward.py has "ours".
            results = row["results"] if direction == "forward" else row["backward"]["results"]
            result = results.get(f"ours_{family}" if direction == "forward" else "ours", {})
            if result.get("tflops"):
                table.setdefault(key, {}).setdefault(name, []).append(result["tflops"])
            if result.get("gpu_clocks"):
                clock = result["gpu_clocks"]["sm_clock_mhz"]["median"]
                clocks.setdefault(key, {}).setdefault(name, []).append(clock)
print(f"{direction} TFLOP/s, mean of {rounds} round(s)" + (" (largest round-to-round difference)" if rounds > 1 else "")
      + (", @ the mean of the median SM clocks while timed" if clocks else ""))
print("| row | " + " | ".join(names) + " |")
print("| --- |" + " --- |" * len(names))
for key, values in table.items():
    cells = []
    for name in names:
        runs = values.get(name, [])
        if not runs:
            cells.append("—")
            continue
        cell = f"{sum(runs) / len(runs):.1f}"
        if len(runs) > 1:
            cell += f" ({max(runs) - min(runs):.1f})"
        mhz = clocks.get(key, {}).get(name)
        if mhz:
            cell += f" @{sum(mhz) / len(mhz):.0f} MHz"
        cells.append(cell)
    print(f"| {key} | " + " | ".join(cells) + " |")
PY
