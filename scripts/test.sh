#!/usr/bin/env bash
# Set up .venv with the test extras, then lint, type-check and run the whole test suite, on
# $ADAPTOPT_TEST_WORKERS worker processes (pytest-xdist; default 2, 0 runs it in this process).
# pytest exits 5 when no test ran; like any other failure, that fails this script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks docs README.md
.venv/bin/mypy
.venv/bin/python -m pytest -q -n "${ADAPTOPT_TEST_WORKERS:-2}" "$@"
