"""Helpers shared by several test modules: the repository, projects to run stages in, params.yaml
edits, and running `lorapipe`, `dvc` and `git` as a user would. Test modules import from here,
never from one another."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# --- params.yaml --------------------------------------------------------------------------------


def set_params(project: Path, **values: object) -> None:
    """Edit params.yaml as a user would (comments kept): set_params(p, **{"split.seed": 7}).
    Unchecked, so that tests can write the invalid values whose errors they test."""
    from lorapipe.params import edit_params_file

    edit_params_file(project / "params.yaml", values, check=False)


# Secret-shaped values for the environment of runs that must not leak them, built at run time so
# no scanner mistakes this file for a leak.
SECRETS = {
    "HF_TOKEN": "hf_" + "Zq7" * 11,
    "AWS_SECRET_ACCESS_KEY": "wJalr" + "XUtnFEMI" * 4,
    "WANDB_API_KEY": "0f" * 20,
    "OPENAI_API_KEY": "sk-" + "proj" + "A1b2C3d4" * 5,
}

# --- a project for the train stage and what follows it ------------------------------------------

ITERS = 240  # make_project's training steps


def make_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Chat rows of a small task the tiny model learns: compress a request to its fields."""
    rng = random.Random(seed)
    names = ["Alice", "Bob", "Chen", "Dana", "Emil", "Fay"]
    rows = []
    for i in range(n):
        who, day = rng.choice(names), rng.randint(1, 28)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Compress the text."},
                    {"role": "user", "content": f"Please meet {who} on day {day} about item {i}."},
                    {"role": "assistant", "content": f"meet | {who} | day {day} | item {i}"},
                ],
                "meta": {"source": f"rows.jsonl:{i + 1}"},
            }
        )
    return rows


def make_project(project: Path, tiny_model_dir: Path) -> Path:
    """A project folder with the tiny model as its base and small sanitized splits."""
    (project / "data" / "sanitized").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, project / "models" / "base")
    for name, n, seed in (("train", 48, 1), ("valid", 8, 2)):
        path = project / "data" / "sanitized" / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n, seed)))
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    set_params(
        project,
        **{
            "train.iters": ITERS,
            "train.epochs": None,
            "train.batch_size": 4,
            "train.save_every": 20,
            "train.steps_per_report": 10,
            "train.steps_per_eval": 40,
            "train.val_batches": -1,
            "train.warmup_steps": 5,
            # dropout draws random numbers: resume must restore the RNG
            "lora.dropout": 0.1,
        },
    )
    return project


# --- running lorapipe -----------------------------------------------------------------------------


def start(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`lorapipe ARGS` (default: train) in `project`, started and not waited for; `env` adds
    environment variables (LORAPIPE_PROCESSES=2: two data-parallel processes)."""
    return subprocess.Popen(
        [sys.executable, "-m", "lorapipe.cli", *(args or ("train",))],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def cli(
    project: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = start(project, *args, env=env)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train(project: Path) -> subprocess.CompletedProcess[str]:
    return cli(project, "train")


def wait_for_checkpoint(project: Path, proc: subprocess.Popen[str], step: int) -> None:
    """Wait until the run in `project` has saved a checkpoint at `step` or later."""
    latest = project / "models" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    raise AssertionError("no checkpoint in time")


def outcome(project: Path) -> tuple[dict[str, Any], list[str], list[str]]:
    """A finished run's adapter arrays, and its train and validation loss rows (step, value)."""
    import mlx.core as mx

    adapters = mx.load(str(project / "models" / "adapters" / "adapters.safetensors"))
    log = project / "dvclive" / "train" / "plots" / "metrics"
    losses = [
        (log / "train" / "loss.tsv").read_text().splitlines(),
        (log / "val" / "loss.tsv").read_text().splitlines(),
    ]
    # Drop the timestamp column: only steps and values must match.
    train_loss, val_loss = ([line.split("\t")[-2:] for line in rows] for rows in losses)
    return adapters, train_loss, val_loss


# --- running dvc and git ------------------------------------------------------------------------

BRANCH = "main"
# DVC commits experiments through its own git library, which needs an identity even on a machine
# where none is configured.
IDENTITY = {
    "GIT_AUTHOR_NAME": "lorapipe tests",
    "GIT_AUTHOR_EMAIL": "tests@lorapipe.invalid",
    "GIT_COMMITTER_NAME": "lorapipe tests",
    "GIT_COMMITTER_EMAIL": "tests@lorapipe.invalid",
}


def command_env() -> dict[str, str]:
    # The stages call `lorapipe`, installed beside this interpreter. No model hub is reachable
    # in CI: HF_HUB_OFFLINE makes sure nothing even tries. One BLAS thread: the tiny model gains
    # nothing from more, and processes side by side on a 2-core machine each spinning several
    # OpenBLAS threads run many times slower. (Queue workers would split the cores themselves:
    # tests/test_workers.py drops this setting to see them do it.)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {
        **os.environ,
        "PATH": path,
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        **IDENTITY,
    }


def dvc(
    cwd: Path, *args: str, timeout: float = 1800, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`dvc ARGS` in `cwd`, in command_env() plus `env`."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        env={**command_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dvc_ok(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = dvc(cwd, *args, env=env)
    assert result.returncode == 0, (
        f"`dvc {' '.join(args)}` failed in {cwd}:\n{result.stdout}\n{result.stderr}"
    )
    return result


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=lorapipe tests", "-c", "user.email=tests@lorapipe.invalid", *args],
        cwd=cwd,
        env=command_env(),
        capture_output=True,
        text=True,
        errors="replace",  # the demo data holds invalid UTF-8 on purpose
    )
    assert result.returncode == 0, f"`git {' '.join(args)}` failed in {cwd}:\n{result.stderr}"
    return result.stdout


def commit_all(project: Path, message: str) -> None:
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", message)


def ran_stages(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The stages `dvc repro` ran, in order."""
    return [
        line.split("'")[1]
        for line in result.stdout.splitlines()
        if line.startswith("Running stage")
    ]


def tree_digest(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path, with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- the experiments queue --------------------------------------------------------------------


def queue(project: Path, *set_params_args: str) -> list[str]:
    """`dvc exp run --queue -S ...`; the names of the queued experiments."""
    args = [a for value in set_params_args for a in ("-S", value)]
    queued = dvc_ok(project, "exp", "run", "--queue", *args)
    names = re.findall(r"Queued experiment '([^']+)'", queued.stdout + queued.stderr)
    assert names, queued.stdout + queued.stderr
    return names


def queue_states(status: str) -> dict[str, str]:
    """`dvc queue status` -> {experiment name: Queued | Running | Success | Failed}."""
    states = {}
    for line in status.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] != "Task" and not line.startswith("Worker"):
            states[parts[1]] = parts[-1]
    return states


def run_queue(
    project: Path,
    names: list[str],
    jobs: int = 2,
    limit_s: float = 900,
    env: dict[str, str] | None = None,
) -> None:
    """`dvc queue start -j N` (in `env`, default command_env()), then wait (bounded) until the
    named experiments have finished and the workers have exited; fail with each failed run's
    log."""
    # The workers are daemons that inherit stdout: hand them a file, not a pipe, or this call
    # would wait for the whole queue.
    with (project.parent / f"{project.name}-queue.log").open("a") as log:
        started = subprocess.run(
            [sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)],
            cwd=project,
            env=command_env() if env is None else env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    assert started.returncode == 0, "dvc queue start failed"
    deadline = time.monotonic() + limit_s
    while True:
        asked = dvc(project, "queue", "status")
        racing = "unexpected error - Expecting value" in asked.stderr
        if asked.returncode != 0 and racing and time.monotonic() < deadline:
            # DVC read a task's JSON file while its worker was writing it (a race in
            # `dvc queue status`, cf. treeverse/dvc#8014): ask again.
            time.sleep(3)
            continue
        assert asked.returncode == 0, f"`dvc queue status` failed:\n{asked.stdout}\n{asked.stderr}"
        status = asked.stdout
        states = queue_states(status)
        done = all(states.get(n) in ("Success", "Failed") for n in names)
        if done and "0 active" in status:
            break
        if time.monotonic() > deadline:
            dvc(project, "queue", "kill", *names)
            dvc(project, "queue", "stop", "--kill")
            pytest.fail(f"the queue did not finish in {limit_s:.0f} s:\n{status}")
        time.sleep(3)
    failed = [n for n in names if states[n] != "Success"]
    assert not failed, "\n".join(dvc(project, "queue", "logs", n).stdout for n in failed)


# --- copies of the repository -------------------------------------------------------------------

# The tiny model's hidden size is 64, so quantization groups of 32; a few steps and rows suffice.
TINY_RUN: dict[str, object] = {
    "train.iters": 20,
    "train.steps_per_eval": 10,
    "train.val_batches": 4,
    "train.save_every": 10,
    "quantize.group_size": 32,
    "quantize.loss_batches": 4,
    "eval.max_rows": 8,
    "eval.batch_size": 8,
}


def cached_outputs() -> list[str]:
    """The pipeline's DVC-cached output paths (dvc.yaml with params.yaml's `paths` filled in)."""
    import yaml

    paths = yaml.safe_load((REPO / "params.yaml").read_text())["paths"]
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    found = []
    for stage in stages.values():
        for out in stage.get("outs", []):
            name, options = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if (options or {}).get("cache", True):
                found.append(re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m[1]], name))
    return found


def copy_repo(dest: Path) -> Path:
    """Copy the files git would clone (tracked + untracked-not-ignored) into a new git repo."""
    skip = cached_outputs()
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        outputs_here = any(name == o or name.startswith(f"{o}/") for o in skip)
        if source.is_file() and not outputs_here:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "clone")
    return dest


def fresh_copy(dest: Path) -> Path:
    """What a clone of this working tree holds (copy_repo), on branch BRANCH."""
    copy_repo(dest)
    git(dest, "branch", "-M", BRANCH)
    return dest


def tiny_project(dest: Path, model: Path) -> Path:
    """A fresh copy set to the tiny model and a shrunken run, committed."""
    fresh_copy(dest)
    set_params(dest, **{"model.source": str(model), **TINY_RUN})
    commit_all(dest, "tiny model, short run")
    return dest


# --- the data stages' row events -----------------------------------------------------------------


def collect(events: Iterable[tuple[str, int, Any]]) -> dict[str, list[Any]]:
    """A data stage's (file, part, row) events as its files hold them: each file's rows, its
    parts joined in part order."""
    parts: dict[str, dict[int, list[Any]]] = {}
    for name, part, row in events:
        parts.setdefault(name, {}).setdefault(part, []).append(row)
    return {name: [r for _, rows in sorted(p.items()) for r in rows] for name, p in parts.items()}
