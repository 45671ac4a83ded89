"""Data-parallel training and evaluation through MLX's own launcher, with one setting.

`LORAPIPE_PROCESSES=N` (several processes on this machine: N GPUs, or CPU processes over the
ring backend) or `LORAPIPE_HOSTFILE=hosts.json` (several machines, a hostfile as
`mlx.distributed_config` writes it) makes `lorapipe train` and `lorapipe eval` start themselves
again as that many processes under `mlx.launch`, so `dvc repro` and `dvc exp run` need nothing
else. The process count changes the speed, not the result: it is an environment setting, not a
param, and DVC neither re-runs nor invalidates a stage when it changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lorapipe.errors import LorapipeError

# The stages that share their work among launched processes; the others run as one.
DISTRIBUTED = ("train", "eval")


class LaunchError(LorapipeError):
    """The data-parallel settings do not describe a run."""


def default_backend() -> str:
    """NCCL where MLX runs on CUDA, else the ring backend (TCP: CPUs and Macs)."""
    for name in ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda"):
        try:
            version(name)
            return "nccl"
        except PackageNotFoundError:
            continue
    return "ring"


def launch_command(argv: list[str], env: dict[str, str]) -> list[str] | None:
    """The mlx.launch command that runs `lorapipe ARGV` as several processes, or None when this
    run is one process (nothing asked for, or this already is one of the launched processes)."""
    if "MLX_RANK" in env:
        return None
    processes, hostfile = env.get("LORAPIPE_PROCESSES", "1"), env.get("LORAPIPE_HOSTFILE")
    if not processes.isdigit() or int(processes) < 1:
        raise LaunchError(f"LORAPIPE_PROCESSES: {processes!r} is not a number of processes")
    if hostfile is None and int(processes) == 1:
        return None
    backend = env.get("LORAPIPE_DISTRIBUTED") or default_backend()
    command = [str(Path(sys.executable).with_name("mlx.launch")), "--backend", backend]
    if hostfile is not None:
        if not Path(hostfile).is_file():
            raise LaunchError(f"LORAPIPE_HOSTFILE: {hostfile} not found")
        command += ["--hostfile", hostfile]
    else:
        command += ["-n", processes]
        if backend == "ring" and "OPENBLAS_NUM_THREADS" not in env:
            # N processes share this machine's cores; N x all-cores BLAS threads thrash.
            threads = max(1, (os.cpu_count() or 1) // int(processes))
            command += ["--env", f"OPENBLAS_NUM_THREADS={threads}"]
    return [*command, "--", sys.executable, "-m", "lorapipe.cli", *argv]


# Where each launched process leaves its exit code: mlx.launch itself exits 0 whatever its
# processes did, so the launching `lorapipe train` reads these to fail as it must.
STATUS_DIR = "LORAPIPE_STATUS_DIR"


def process_count(command: list[str]) -> int:
    """How many processes `command` (from launch_command) starts."""
    if "--hostfile" in command:
        hosts = json.loads(Path(command[command.index("--hostfile") + 1]).read_text())
        return len(hosts) if isinstance(hosts, list) else 1
    return int(command[command.index("-n") + 1])


def run(command: list[str], stage: str, checkpoints: str) -> int:
    """Run `command` (its processes print as they go) and return 0 only if every process
    finished; else say which did not, and how to go on (training: from the last checkpoint)."""
    parent = Path(".dvc/tmp") if Path(".dvc/tmp").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="lorapipe-launch-", dir=parent) as status:
        split = command.index("--")
        command = [*command[:split], "--env", f"{STATUS_DIR}={Path(status).resolve()}",
                   *command[split:]]  # fmt: skip
        print(f"lorapipe {stage}: {' '.join(command)}", flush=True)
        subprocess.run(command, check=False)
        codes = {int(p.stem.split("-")[1]): int(p.read_text()) for p in Path(status).iterdir()}
    expected = process_count(command)
    failed = [r for r in range(expected) if codes.get(r) != 0]
    if not failed:
        return 0
    what = ", ".join(
        f"process {r} ({'exit code ' + str(codes[r]) if r in codes else 'killed or lost'})"
        for r in failed
    )
    go_on = (
        f"the last checkpoint is kept in {checkpoints}; run `dvc repro train` to resume (with "
        "any number of processes)"
        if stage == "train"
        else f"nothing was written; run `dvc repro {stage}` again"
    )
    print(f"lorapipe {stage}: error: {what} of {expected} did not finish; {go_on}", file=sys.stderr)
    return 1


def report_status(code: int, env: dict[str, str]) -> None:
    """In a launched process: leave this process's exit code for `run` to read."""
    if STATUS_DIR in env and "MLX_RANK" in env:
        Path(env[STATUS_DIR], f"rank-{env['MLX_RANK']}").write_text(str(code))


def all_gather_json(value: Any, group: Any) -> list[Any]:
    """Every process's `value` (JSON-able), in rank order, in every process: its UTF-8 bytes
    padded to the longest, through one MLX all_gather (works across machines)."""
    import mlx.core as mx
    import numpy as np

    if group.size() == 1:
        return [value]
    data = json.dumps(value).encode()
    sizes = mx.distributed.all_gather(mx.array([len(data)], mx.int32), group=group).tolist()
    padded = np.frombuffer(data.ljust(max(sizes), b" "), np.uint8)
    gathered = np.array(mx.distributed.all_gather(mx.array(padded)[None], group=group))
    return [json.loads(row[:size].tobytes()) for row, size in zip(gathered, sizes, strict=True)]
