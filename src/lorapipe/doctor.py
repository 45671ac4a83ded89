"""`lorapipe doctor`'s check of the DVC remote: where `dvc push`/`dvc pull` go by default, and
what is wrong there, with the command that fixes it. DVC's own message for a missing remote
folder (`Missing cache files ... Is your cache up to date?`) never says the folder is missing."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RemoteCheck:
    summary: str  # what `lorapipe doctor` prints beside "dvc remote"
    problem: str | None = None  # what is broken, and the command that fixes it (exit 1)
    # What only `dvc push`/`pull` will meet (no remote, a missing or empty folder), and the
    # command that fixes it; the pipeline itself runs (exit 0).
    note: str | None = None


def check_remote(project: Path) -> RemoteCheck:
    """The default DVC remote of the project at `project`: defined, reachable where that can be
    told without the network (a local folder), and not empty when outputs were pushed to it."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.fs import get_cloud_fs
    from dvc.repo import Repo

    try:
        repo = Repo(str(project))
    except NotDvcRepoError:
        return RemoteCheck("not in a DVC project (run `lorapipe doctor` in your clone)")
    with repo:
        name = repo.config["core"].get("remote")
        remotes = repo.config["remote"]
        if not name:
            return RemoteCheck(
                "none",
                note="no default DVC remote, so `dvc push` and `dvc pull` have nowhere to go; fix: "
                "dvc remote add --default storage PATH_OR_URL",
            )
        if name not in remotes:
            return RemoteCheck(
                f"{name} (not defined)",
                f"core.remote names '{name}', which no config defines; fix: "
                f"dvc remote add --default {name} PATH_OR_URL",
            )
        fs_class, _, path = get_cloud_fs(repo.config, **remotes[name])
        if fs_class.protocol not in ("local", "file"):
            return RemoteCheck(
                f"{name}: {remotes[name]['url']} (not contacted; `dvc status --cloud` does)"
            )
        where = Path(path)
        if not where.is_dir():
            # A note, not a failure: training needs no remote, and a fresh clone of a project
            # whose remote is a shared folder often lacks it until the user points at it.
            return RemoteCheck(
                f"{name}: {where} (missing)",
                note=f"warning: the default remote '{name}' is the folder {where}, which does "
                "not exist, so "
                "`dvc pull` finds no data there ('Missing cache files'). Fix: point your clone "
                f"at the folder the team pushes to: dvc remote modify --local {name} url PATH "
                f"(or, to start a new remote there: mkdir -p {shlex.quote(str(where))})",
            )
        if not any(where.iterdir()):
            return RemoteCheck(
                f"{name}: {where} (empty)",
                note=f"the default remote '{name}' ({where}) holds nothing yet: `dvc push` "
                "from the clone that has the outputs",
            )
        return RemoteCheck(f"{name}: {where}")
