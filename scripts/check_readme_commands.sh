#!/usr/bin/env bash
# Runs the README's two commands exactly as written, the way a new user meets them, and records
# what the README's build-time table states: wall time, peak memory, the build's own choices,
# the test counts.
#
#   bash scripts/check_readme_commands.sh OUT [install|test|install,test]   (default both)
#
# Run it from the root of the checkout to test, in the Python environment to install into: for
# the "fresh machine" rows of the README, a fresh clone and a new virtual environment, e.g.
#   git clone -q REPO /tmp/fresh && python3 -m venv /tmp/venv && . /tmp/venv/bin/activate &&
#   cd /tmp/fresh && bash scripts/check_readme_commands.sh /tmp/readme_out
# The build variables (CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS, NVCC_THREADS) are unset for the
# commands: the README promises that none is needed (the GPU machine's image sets two of them).
#
# A machine without network (the GPU machine): WHEELS=DIR installs, before the command, each
# package it names that the environment lacks, from the wheels in DIR (pip --no-index), and
# says which; the command's own installs then find them satisfied. On the GPU machine the two
# stages go in two device calls on the same warm machine (the install takes about 6.5 minutes
# with the demo, the tests about 4.5).
set -uo pipefail

out=${1:?usage: check_readme_commands.sh OUT [install|test|install,test]}
stages=${2:-install,test}
mkdir -p "$out"
has_stage() { [[ ",$stages," == *",$1,"* ]]; }

# The fenced command right under a README heading.
readme_command() {
    sed -n "/^## $1/,/^\`\`\`\$/p" README.md | grep -m1 "$2"
}

# Runs "$2" with the build variables unset, timed, memory sampled every 10 s (used MiB), output
# to $out/$1.log; one line "NAME rc=... wall_s=... peak_used_mib=..." to $out/summary.txt.
timed() {
    local name=$1 command=$2 sampler start rc
    (while true; do echo "$(date +%s) $(free -m | awk '/Mem:/{print $3}')" >> "$out/$name.mem"; sleep 10; done) &
    sampler=$!
    start=$(date +%s)
    env -u CUDA_HOME -u TORCH_CUDA_ARCH_LIST -u MAX_JOBS -u NVCC_THREADS PYTHONUNBUFFERED=1 \
        bash -c "$command" > "$out/$name.log" 2>&1
    rc=$?
    kill "$sampler"
    echo "$name rc=$rc wall_s=$(( $(date +%s) - start )) peak_used_mib=$(sort -k2 -n "$out/$name.mem" | tail -1 | cut -d' ' -f2)" \
        | tee -a "$out/summary.txt"
    return $rc
}

{
    date -u
    git log -1 --format='commit %h %s' 2>/dev/null
    echo "python: $(command -v python) ($(python -V 2>&1)); pip on PATH: $(command -v pip)"
    nproc
    free -g | head -2
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader
    env | grep -E '^(CUDA_HOME|TORCH_CUDA_ARCH_LIST|MAX_JOBS|NVCC_THREADS)=' | sed 's/^/set here, unset for the commands: /'
} > "$out/environment.txt" 2>&1

status=0
if has_stage install; then
    install=$(readme_command "Install and run the demo" '^python -m pip install torch')
    if [ -z "$install" ]; then echo "no install command found in README.md" >&2; exit 2; fi
    echo "install command: $install" >> "$out/environment.txt"
    if [ -n "${WHEELS:-}" ]; then
        for package in wheel ninja pybind11 pytest numpy nvidia-cutlass; do
            if ! python -m pip show "$package" >/dev/null 2>&1; then
                echo "installed from $WHEELS first (no network): $package" >> "$out/environment.txt"
                python -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$package" \
                    >> "$out/environment.txt" 2>&1
            fi
        done
    fi
    timed install "$install" || status=1
    grep -E '^\s*flash_varlen: ' "$out/install.log" | sort -u | head -8
    tail -12 "$out/install.log"
fi
if has_stage test; then
    tests=$(readme_command "Run the tests" '^python -m pytest')
    if [ -z "$tests" ]; then echo "no test command found in README.md" >&2; exit 2; fi
    echo "test command: $tests" >> "$out/environment.txt"
    timed tests "$tests" || status=1
    grep -E '^(FAILED|ERROR)' "$out/tests.log" | head -20
    tail -1 "$out/tests.log"
fi
exit $status
