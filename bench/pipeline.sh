#!/bin/sh
# The main job's time per stage, from an empty cache: a fresh `git clone` of HEAD into DIR (a new
# folder), then `dvc repro -f -s STAGE` for each stage in the pipeline's order, timed. The
# clone's DVC cache starts empty, so nothing is restored from a cache; -f because the metrics
# files are in git: a stage whose inputs come out byte for byte as the committed dvc.lock records
# them (eval@base, after the deterministic base import) would be skipped as up to date. Set-up
# (the environment) is excluded: it uses this checkout's .venv (run scripts/pipeline.sh --dry or
# scripts/test.sh once first).
#
#   sh bench/pipeline.sh /tmp/lorapipe-bench [bench/results/pipeline-cpu-stages.txt]
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:?usage: bench/pipeline.sh DIR [OUT]}
out=${2:-$here/bench/results/pipeline-cpu-stages.txt}
[ ! -e "$dir" ] || { echo "bench/pipeline.sh: $dir exists; give a new folder" >&2; exit 1; }
git clone -q "$here" "$dir"
[ -e "$here/../shared" ] && [ ! -e "$dir/../shared" ] && ln -s "$here/../shared" "$dir/../shared"
PATH="$here/.venv/bin:$PATH"
cd "$dir"
# The stages in an order dvc.yaml allows (each after what it depends on).
stages=$(dvc stage list --name-only)
{
  echo "# $(date -u +%F), $(uname -m), $(nproc) cores, $(git rev-parse --short HEAD); dvc repro -f -s STAGE (s)"
  total=0
  for stage in $stages; do
    t0=$(date +%s%N)
    dvc repro -q -f -s "$stage" >/dev/null
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    total=$((total + ms))
    printf '%s %d.%d\n' "$stage" $((ms / 1000)) $((ms % 1000 / 100))
  done
  printf 'total %d.%d (%d min %d s)\n' $((total / 1000)) $((total % 1000 / 100)) \
    $((total / 60000)) $((total / 1000 % 60))
} | tee "$out"
