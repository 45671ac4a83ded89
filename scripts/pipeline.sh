#!/bin/sh
# The main job: create the environment, then run the whole default pipeline (dvc repro).
# Extra arguments go to `dvc repro` (e.g. a stage name, or -f to force).
. "$(dirname "$0")/env.sh"
run lorapipe doctor
run dvc repro "$@"
