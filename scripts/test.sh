#!/bin/sh
# The test command: create the environment, then lint, type-check and run every test (slow ones
# too). Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for a quick run.
. "$(dirname "$0")/env.sh"
run ruff check .
run ruff format --check .
run mypy
run pytest "$@"
