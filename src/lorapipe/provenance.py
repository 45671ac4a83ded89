"""What a run was made on: the small record the train stage writes beside its metrics.

dvc.lock already pins code, data and params by hash and uv.lock pins every package; this adds
what neither knows: the machine, MLX's backend and device, the BLAS and the git commit. Only
these named facts are recorded (never the environment), so no token or secret can leak into it.
"""

from __future__ import annotations

import subprocess
from typing import Any


def git_commit() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": commit, "uncommitted_changes": bool(dirty)}


def run_record() -> dict[str, Any]:
    from lorapipe import runtime

    return {**runtime.describe(), "git": git_commit()}
