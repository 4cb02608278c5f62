#!/usr/bin/env bash
# Install mmsr with its test dependencies into ./.venv and run the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,minilm]'
exec .venv/bin/python -m pytest -q "$@"
