# Sourced by pipeline.sh and test.sh: make sure uv exists, then create/refresh .venv from uv.lock.
# LORAPIPE_BACKEND=cuda installs MLX's CUDA backend instead of the CPU one (Linux + NVIDIA GPU).
set -eu
cd "$(dirname "$0")/.."

if command -v uv >/dev/null 2>&1; then
  UV=uv
elif [ -x .tools/uv/bin/uv ]; then
  UV=.tools/uv/bin/uv
else
  echo "lorapipe: uv not found; installing it into .tools/uv (from PyPI)" >&2
  python3 -m venv .tools/uv && .tools/uv/bin/python -m pip install -q "uv>=0.5" \
    || { echo "lorapipe: could not install uv; see https://docs.astral.sh/uv/ and re-run" >&2; exit 1; }
  UV=.tools/uv/bin/uv
fi

case "${LORAPIPE_BACKEND:-cpu}" in
  cpu) "$UV" sync --locked ;;
  cuda) "$UV" sync --locked --no-group cpu --group cuda ;;
  *) echo "lorapipe: LORAPIPE_BACKEND must be cpu or cuda, not '${LORAPIPE_BACKEND}'" >&2; exit 1 ;;
esac
# Later commands use the environment as synced above (a plain `uv run` would re-sync to the
# default groups and swap a CUDA install back to CPU).
run() { "$UV" run --no-sync "$@"; }
