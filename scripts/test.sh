#!/bin/sh
# The test command: create the environment, then lint, type-check and run every test (slow ones
# too). Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for a quick run.
. "$(dirname "$0")/env.sh"
run ruff check .
run ruff format --check .
run mypy
# tests/test_plots.py draws the plots pages in a real headless Chromium: install Debian's when it
# is missing and we can (root with apt-get, as in CI); elsewhere that test is skipped.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "lorapipe: installing chromium and chromium-driver with apt-get (for tests/test_plots.py)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq chromium chromium-driver >/dev/null; } \
      || echo "lorapipe: apt-get could not install them: tests/test_plots.py will be skipped"
  else
    echo "lorapipe: no chromium/chromedriver and no root apt-get: tests/test_plots.py will be skipped"
  fi
fi
run pytest "$@"
