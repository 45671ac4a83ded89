"""The run record says what a run was made on, and nothing a run writes holds a secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import SECRETS, make_project, set_params


def test_run_record_and_no_secret_in_anything_a_run_writes(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    project = make_project(tmp_path / "project", tiny_model_dir)
    set_params(project, **{"train.iters": 20, "train.steps_per_eval": 10, "train.save_every": 10})
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
         "-m", "x"],
        cwd=project,
        check=True,
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "lorapipe.cli", "train"],
        cwd=project,
        env={**os.environ, **SECRETS},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr

    record = json.loads((project / "reports" / "run.json").read_text())
    assert {"platform", "mlx backend", "default device", "blas", "mlx", "mlx-lm", "git"} <= set(
        record
    )
    assert len(record["git"]["commit"]) == 40

    written = [p for p in project.rglob("*") if p.is_file() and ".git" not in p.parts]
    texts = [result.stdout, result.stderr] + [
        p.read_bytes().decode("utf-8", "replace") for p in written if p.stat().st_size < 5_000_000
    ]
    for name, value in SECRETS.items():
        assert not any(value in text for text in texts), f"{name} leaked"
