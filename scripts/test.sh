#!/usr/bin/env bash
# Install mmsr with its test dependencies into ./.venv and run the test suite.
# Usage: bash scripts/test.sh [--quick] [pytest args...]
#   --quick  leaves out the tests marked `slow` (fresh processes: kills and resumes, torchrun,
#            locks, memory limits, scripts; whole pipelines), for a check in about two minutes;
#            CI runs everything. The `cuda` tests run on a GPU machine (scripts/gpu_check.sh).
# The suite runs on MMSR_TEST_WORKERS pytest-xdist workers (default 2; 0 runs it in this process),
# each taking whole files, the slowest first (tests/conftest.py); `-n 0` among the pytest args
# does the same for one run.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=()
if [ "${1:-}" = "--quick" ]; then
    quick=(-m "not slow")
    shift
fi
[ -x .venv/bin/python ] || python3 -m venv .venv

# uv installs the same versions as pip several times faster (parallel unpacking, hard links from
# its cache). It is taken from the package index into the venv and given pip's own settings
# (indexes, find-links, constraints), which it does not read itself; where it cannot be had, pip
# installs as before. Its cache is uv's usual one (UV_CACHE_DIR, else ~/.cache/uv), so a second
# clean clone on the same machine links the ~6 GB of wheels (torch's CUDA build) from it: about
# 4 s instead of 22 s, and no second copy on disk. Neither compiles bytecode at install: of the venv's ~31,000 modules the
# suite imports ~3,200, which Python compiles and caches on first import (below) at a third of the
# CPU time of compiling them all.
install_with_uv() {
    .venv/bin/python -m pip install -q --disable-pip-version-check 'uv>=0.5' || return 1
    local args=() key value v
    while IFS='=' read -r key value; do
        value=${value#\'} value=${value%\'}
        for v in $value; do
            case ${key#*.} in
                index-url) args+=(--index-url "$v") ;;
                extra-index-url) args+=(--extra-index-url "$v") ;;
                find-links) args+=(--find-links "$v") ;;
                constraint) args+=(--constraint "$v") ;;
            esac
        done
    done < <(.venv/bin/python -m pip config list 2>/dev/null)
    .venv/bin/uv pip install -q --python .venv/bin/python \
        --index-strategy unsafe-best-match "${args[@]}" -e '.[test,minilm]'
}
install_with_uv || .venv/bin/python -m pip install -q --disable-pip-version-check --no-compile -e '.[test,minilm]'
# the bytecode cache is what lets the suite's ~100 fresh processes skip compiling torch again
unset PYTHONDONTWRITEBYTECODE

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
workers=()
if [ "${MMSR_TEST_WORKERS:-2}" != 0 ]; then
    workers=(-n "${MMSR_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder)
fi
exec .venv/bin/python -m pytest -q "${quick[@]}" "${workers[@]}" "$@"
