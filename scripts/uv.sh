# Sourced: make sure uv exists (installed from PyPI into .tools/uv if not); sets UV.
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
