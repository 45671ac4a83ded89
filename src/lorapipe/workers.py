"""DVC queue workers: each experiment gets its own GPU, or its share of the CPU's cores.

`dvc queue start -j N` starts N workers, `dvc exp queue-worker dvc-exp-<hash>-<number>@localhost`
(<hash>: the project folder's; <number>: 1 to N), each running one experiment at a time as
worker -> `dvc exp exec-run` -> the stage command (`lorapipe train`). Left alone, every
experiment takes the first GPU, or every core's worth of OpenBLAS threads: two workers with two
threads each on 2 cores thrash (bench/README.md). So before MLX loads, a lorapipe command run by
a queue worker (found among its ancestor processes) sets

  CUDA backend  CUDA_VISIBLE_DEVICES to one GPU: worker k takes the k-th of the visible GPUs
                (CUDA_VISIBLE_DEVICES's list if set, else every GPU nvidia-smi lists)
  CPU backend   OPENBLAS_NUM_THREADS, MKL_NUM_THREADS and OMP_NUM_THREADS to cores // workers
                (the workers running now), unless one of them is set already: then it keeps yours

and says so in one line on stderr (in `dvc queue logs`). Outside a queue worker, and with MLX's
Metal backend (one GPU, shared), it changes nothing and prints nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")
_WORKER_NAME = re.compile(r"dvc-exp-(?P<queue>[0-9a-f]+)-(?P<number>\d+)@")


@dataclass(frozen=True)
class Share:
    """What one queue worker's experiment should use: variables to set before MLX loads, and
    the line that says so ("" outside a queue worker)."""

    env: dict[str, str] = field(default_factory=dict)
    message: str = ""


def share(
    worker: int | None,
    workers: int,
    cores: int,
    backend: str,
    gpus: int,
    environ: Mapping[str, str],
) -> Share:
    """The share of queue worker number `worker` (None: not in a queue) of `workers` running,
    on `cores` cores and `gpus` GPUs (counted only where CUDA_VISIBLE_DEVICES is unset)."""
    if worker is None or "MLX_RANK" in environ:  # mlx.launch's processes: their parent chose
        return Share()
    who = f"dvc queue worker {worker}"
    if "LORAPIPE_HOSTFILE" in environ:
        return Share(message=f"{who}: GPUs and threads left as they are (LORAPIPE_HOSTFILE)")
    count = environ.get("LORAPIPE_PROCESSES", "1")
    processes = int(count) if count.isdigit() and int(count) > 0 else 1  # launch.py says why not
    if backend == "cuda":
        return _gpu(who, worker, processes, gpus, environ)
    if backend == "cpu":
        who += f" ({workers} running, {cores} cores)"
        return _threads(who, workers, processes, cores, environ)
    return Share()


def _gpu(who: str, worker: int, processes: int, gpus: int, environ: Mapping[str, str]) -> Share:
    if processes > 1:
        # mlx.launch sets each NCCL process's CUDA_VISIBLE_DEVICES to its rank, whatever it was.
        return Share(
            message=f"{who}: GPUs left as they are: the {processes} processes of "
            f"LORAPIPE_PROCESSES take GPUs 0 to {processes - 1} in every worker; queue "
            "data-parallel runs with `dvc queue start -j 1`"
        )
    if "CUDA_VISIBLE_DEVICES" in environ:
        visible = [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    else:
        visible = [str(i) for i in range(gpus)]
    if not visible:
        return Share(message=f"{who}: no GPU found; CUDA_VISIBLE_DEVICES left as it is")
    index = (worker - 1) % len(visible)
    message = f"{who}: GPU {index + 1} of {len(visible)} (CUDA_VISIBLE_DEVICES={visible[index]})"
    if worker > len(visible):
        message += (
            f", shared with worker {index + 1}: more workers than GPUs; use "
            f"`dvc queue start -j {len(visible)}` or fewer"
        )
    return Share({"CUDA_VISIBLE_DEVICES": visible[index]}, message)


def _threads(
    who: str, workers: int, processes: int, cores: int, environ: Mapping[str, str]
) -> Share:
    threads = max(1, cores // (workers * processes))
    each = f"{threads} BLAS thread{'s' if threads != 1 else ''}"
    if processes > 1:
        each += f" in each of its {processes} processes"
    yours = [f"{name}={environ[name]}" for name in THREAD_VARIABLES if name in environ]
    if yours:
        return Share(message=f"{who}: keeping your {', '.join(yours)} ({each} would share them)")
    return Share(dict.fromkeys(THREAD_VARIABLES, str(threads)), f"{who}: {each}")


# --- this process ------------------------------------------------------------------------------


def _worker_name(cmdline: list[str]) -> tuple[str, int] | None:
    """(queue, number) of a `dvc exp queue-worker NAME` command line, else None."""
    if "queue-worker" not in cmdline[:-1]:
        return None
    found = _WORKER_NAME.match(cmdline[cmdline.index("queue-worker") + 1])
    return (found["queue"], int(found["number"])) if found else None


def find_worker() -> tuple[int, int] | None:
    """(this worker's number, how many of its queue's workers run now) when a DVC queue worker
    is among this process's ancestors, else None."""
    import psutil

    def name(process: psutil.Process) -> tuple[str, int] | None:
        try:
            return _worker_name(process.cmdline())
        except psutil.Error:  # gone, or another user's
            return None

    mine = next(filter(None, map(name, psutil.Process().parents())), None)
    if mine is None:
        return None
    numbers = {
        found[1] for p in psutil.process_iter() if (found := name(p)) and found[0] == mine[0]
    }
    return mine[1], len(numbers | {mine[1]})


def _cores() -> int:
    """The cores this process may run on (a container's or `taskset`'s, where Linux tells)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _gpu_count() -> int:
    """NVIDIA GPUs on this machine, without loading CUDA (mlx.core must not be imported yet)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def apply(environ: MutableMapping[str, str] = os.environ) -> Share:
    """In a queue worker's experiment, set its share in `environ` and say so; call before
    anything loads MLX or a BLAS (runtime.setup())."""
    found = find_worker()
    if found is None:
        return Share()
    from lorapipe import runtime

    backend = runtime.mlx_backend()[0]
    gpus = _gpu_count() if backend == "cuda" and "CUDA_VISIBLE_DEVICES" not in environ else 0
    result = share(*found, _cores(), backend, gpus, environ)
    environ.update(result.env)
    if result.message:
        print(f"lorapipe: {result.message}", file=sys.stderr, flush=True)
    return result
