"""`lorapipe doctor` checks the default DVC remote: a clone whose remote folder is missing gets
DVC's `Missing cache files` from `dvc pull`; doctor says the folder is missing and how to fix it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.helpers import cli, commit_all, dvc, dvc_ok, git


def doctor(project: Path) -> subprocess.CompletedProcess[str]:
    return cli(project, "doctor")


def test_doctor_names_a_missing_remote_folder_and_the_fix(tmp_path: Path) -> None:
    team = tmp_path / "team"
    team.mkdir()
    git(team, "init", "-q")
    dvc_ok(team, "init", "-q")
    dvc_ok(team, "remote", "add", "--default", "storage", "../storage")  # beside the clone
    (team / "data.txt").write_text("shared data\n")
    dvc_ok(team, "add", "data.txt")
    commit_all(team, "data")
    dvc_ok(team, "push")

    # A clone somewhere else: ../storage from there does not exist.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    git(elsewhere, "clone", "-q", str(team), "clone")
    clone = elsewhere / "clone"
    pulled = dvc(clone, "pull")
    assert pulled.returncode != 0 and "Missing cache files" in pulled.stderr  # says nothing more
    result = doctor(clone)
    assert result.returncode == 0  # a warning: `dvc repro` needs no remote
    missing = elsewhere / "storage"
    assert re.search(rf"dvc remote +storage: {missing} \(missing\)", result.stdout)
    assert (
        f"warning: the default remote 'storage' is the folder {missing}, which does not exist"
        in result.stdout
    )
    assert "dvc remote modify --local storage url PATH" in result.stdout

    # The fix it names, with the team's folder as PATH: doctor is content and the pull works.
    dvc_ok(clone, "remote", "modify", "--local", "storage", "url", str(tmp_path / "storage"))
    result = doctor(clone)
    assert result.returncode == 0 and f"storage: {tmp_path / 'storage'}\n" in result.stdout
    dvc_ok(clone, "pull")
    assert (clone / "data.txt").read_text() == "shared data\n"


def test_doctor_notes_a_project_without_a_default_remote(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    dvc_ok(tmp_path, "init", "-q")
    result = doctor(tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"dvc remote +none\n", result.stdout)
    assert "dvc remote add --default storage PATH_OR_URL" in result.stdout
