#!/usr/bin/env bash
# Install mmsr with its test dependencies into ./.venv and run the test suite.
# Usage: bash scripts/test.sh [--quick] [pytest args...]
#   --quick  leaves out the tests marked `slow` (fresh processes: kills and resumes, torchrun,
#            locks, memory limits, scripts; whole pipelines), for a check in about two minutes;
#            CI runs everything. The `cuda` tests run on a GPU machine (scripts/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
quick=()
if [ "${1:-}" = "--quick" ]; then
    quick=(-m "not slow")
    shift
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,minilm]'
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q "${quick[@]}" "$@"
