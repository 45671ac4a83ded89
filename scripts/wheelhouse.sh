#!/bin/sh
# Build a wheelhouse for an offline install: every locked dependency of lorapipe (uv.lock, the
# tests' tools included) as wheels for one Python and platform, plus lorapipe itself, in DIR.
#
#   scripts/wheelhouse.sh DIR [cpu|cuda] [PYTHON_VERSION] [PLATFORM_TAG]
#     (defaults: cpu, 3.12, manylinux x86-64; macOS: cpu and e.g. macosx_14_0_arm64)
#
# Run it where PyPI is reachable, copy DIR to the offline machine, and there run the README's
# commands with LORAPIPE_WHEELHOUSE=DIR (and LORAPIPE_BACKEND=cuda for the CUDA backend):
# scripts/env.sh installs from DIR alone, without uv and without the network. With `cuda`, the
# CUDA runtime wheels (nvidia-*) are left out: the machine's own are reused (PyTorch's, say,
# seen through a virtual environment with --system-site-packages).
set -eu
[ $# -ge 1 ] || { sed -n '2,12p' "$0"; exit 2; }
dir=$1; backend=${2:-cpu}; python=${3:-3.12}; platform=${4:-}
cd "$(dirname "$0")/.."
. scripts/uv.sh
mkdir -p "$dir"
case "$backend" in
  cpu) groups="--group cpu" ;;
  cuda) groups="--no-group cpu --group cuda" ;;
  *) echo "wheelhouse: the backend is cpu or cuda, not '$backend'" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086  # $groups is several arguments
"$UV" export --locked --no-hashes --no-emit-project --no-annotate --no-header $groups \
  --format requirements-txt > "$dir/requirements.txt.all"
# The lock is universal: keep the pins whose markers hold on the target (its Python and
# platform, not this machine's), without markers; with cuda, without nvidia-*.
python3 - "$dir/requirements.txt.all" "$python" "${platform:-manylinux_x86_64}" "$backend" \
  > "$dir/requirements.txt" <<'PY'
import sys
from pip._vendor.packaging.requirements import Requirement

lines, python, platform, backend = sys.argv[1:]
mac = platform.startswith("macosx")
machine = "arm64" if platform.endswith("arm64") else "aarch64" if "aarch64" in platform else "x86_64"
target = {
    "python_version": python, "python_full_version": f"{python}.0",
    "sys_platform": "darwin" if mac else "linux", "platform_system": "Darwin" if mac else "Linux",
    "platform_machine": machine, "os_name": "posix", "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
for line in open(lines):
    line = line.strip()
    if not line or line.startswith(("#", "-")):
        continue
    requirement = Requirement(line)
    if requirement.marker is not None and not requirement.marker.evaluate(target):
        continue
    if backend == "cuda" and requirement.name.startswith("nvidia-"):
        continue  # the machine's own CUDA libraries serve
    print(f"{requirement.name}{requirement.specifier}")
PY
rm "$dir/requirements.txt.all"
if [ -z "$platform" ]; then
  set -- --platform manylinux_2_39_x86_64 --platform manylinux_2_35_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64
else
  set -- --platform "$platform"
fi
# One wheel at a time: a package published as source only (a pure-Python one) is built here.
grep -v '^\s*$' "$dir/requirements.txt" | while read -r requirement; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python" \
    --implementation cp "$@" --platform any -d "$dir" "$requirement" 2>/dev/null \
  || python3 -m pip wheel -q --no-deps -w "$dir" "${requirement%%;*}" \
  || { echo "wheelhouse: no wheel for $requirement" >&2; exit 1; }
done
# lorapipe's build backend and its editable-install helper, for `pip install -e .` offline.
python3 -m pip download -q --only-binary=:all: --python-version "$python" --implementation cp \
  "$@" --platform any -d "$dir" hatchling editables
echo "wheelhouse: $(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir"
