# Sourced by pipeline.sh and test.sh: create/refresh .venv from uv.lock, then define `run`.
# LORAPIPE_BACKEND=cuda installs MLX's CUDA backend instead of the CPU one (Linux + NVIDIA GPU).
# LORAPIPE_WHEELHOUSE=DIR installs from a wheelhouse (scripts/wheelhouse.sh) with no network.
set -eu
cd "$(dirname "$0")/.."
backend=${LORAPIPE_BACKEND:-cpu}
case "$backend" in
  cpu|cuda) ;;
  *) echo "lorapipe: LORAPIPE_BACKEND must be cpu or cuda, not '$backend'" >&2; exit 1 ;;
esac

if [ -n "${LORAPIPE_WHEELHOUSE:-}" ]; then
  wheels=$(cd "$LORAPIPE_WHEELHOUSE" && pwd)
  [ -f "$wheels/requirements.txt" ] \
    || { echo "lorapipe: $wheels has no requirements.txt; build it with scripts/wheelhouse.sh" >&2; exit 1; }
  stamp=$(cat "$wheels/requirements.txt" uv.lock | cksum)
  if [ "$(cat .venv/.wheelhouse 2>/dev/null)" != "$stamp" ]; then
    # CUDA: see the machine's own CUDA libraries (the wheelhouse leaves nvidia-* out).
    system=""; [ "$backend" = cuda ] && system="--system-site-packages"
    python3 -m venv --clear $system .venv
    pip="python -m pip install -q --no-index --find-links $wheels"
    # shellcheck disable=SC2086  # $pip is a command with arguments
    .venv/bin/$pip --no-deps -r "$wheels/requirements.txt" \
      && .venv/bin/$pip --no-deps -e . \
      || { echo "lorapipe: installing from $wheels failed (see above)" >&2; exit 1; }
    echo "$stamp" > .venv/.wheelhouse
  fi
  run() { PATH="$PWD/.venv/bin:$PATH" "$@"; }
else
  . scripts/uv.sh
  # Bytecode compiled once at install: every `lorapipe`/`dvc` process then starts from it, even
  # where PYTHONDONTWRITEBYTECODE is set (each stage is a new process; the tests start hundreds).
  case "$backend" in
    cpu) "$UV" sync --locked --compile-bytecode ;;
    cuda) "$UV" sync --locked --compile-bytecode --no-group cpu --group cuda ;;
  esac
  # Later commands use the environment as synced above (a plain `uv run` would re-sync to the
  # default groups and swap a CUDA install back to CPU).
  run() { "$UV" run --no-sync "$@"; }
fi
