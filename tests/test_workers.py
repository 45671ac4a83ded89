"""lorapipe.workers: under `dvc queue start -j N`, each experiment gets its own GPU or its share
of the cores' BLAS threads; outside a queue nothing changes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorapipe import runtime
from lorapipe.workers import THREAD_VARIABLES, Share, find_worker, share
from tests.helpers import command_env, commit_all, dvc_ok, git, queue, run_queue

# --- share: what a worker gets ------------------------------------------------------------------


def test_outside_a_queue_nothing_changes() -> None:
    assert share(None, 1, 8, "cpu", 0, {}) == Share()
    assert share(None, 1, 8, "cuda", 4, {}) == Share()
    # A process mlx.launch started: the lorapipe process that launched it already chose.
    assert share(2, 2, 8, "cpu", 0, {"MLX_RANK": "1"}) == Share()


def test_cpu_workers_split_the_cores() -> None:
    two = share(2, 2, 2, "cpu", 0, {})
    assert two.env == dict.fromkeys(THREAD_VARIABLES, "1")
    assert two.message == "dvc queue worker 2 (2 running, 2 cores): 1 BLAS thread"
    assert share(1, 3, 16, "cpu", 0, {}).env["OPENBLAS_NUM_THREADS"] == "5"
    assert share(1, 4, 2, "cpu", 0, {}).env["OPENBLAS_NUM_THREADS"] == "1"  # never 0
    assert share(1, 1, 8, "cpu", 0, {}).message.endswith(": 8 BLAS threads")


def test_cpu_threads_set_by_the_user_are_kept() -> None:
    kept = share(1, 2, 8, "cpu", 0, {"OPENBLAS_NUM_THREADS": "8"})
    assert kept.env == {}
    assert "keeping your OPENBLAS_NUM_THREADS=8 (4 BLAS threads would share them)" in kept.message


def test_cpu_data_parallel_processes_split_the_worker_share() -> None:
    dp = share(1, 2, 8, "cpu", 0, {"LORAPIPE_PROCESSES": "2"})
    assert dp.env["OPENBLAS_NUM_THREADS"] == "2"
    assert dp.message.endswith("2 BLAS threads in each of its 2 processes")


def test_each_worker_gets_its_own_gpu() -> None:
    devices = [share(w, 4, 64, "cuda", 4, {}).env["CUDA_VISIBLE_DEVICES"] for w in (1, 2, 3, 4)]
    assert devices == ["0", "1", "2", "3"]
    assert share(2, 4, 64, "cuda", 4, {}).message == (
        "dvc queue worker 2: GPU 2 of 4 (CUDA_VISIBLE_DEVICES=1)"
    )


def test_gpus_come_from_cuda_visible_devices_when_set() -> None:
    visible = {"CUDA_VISIBLE_DEVICES": "GPU-aa, GPU-bb"}  # UUIDs pass through as they are
    assert [share(w, 2, 64, "cuda", 8, visible).env for w in (1, 2)] == [
        {"CUDA_VISIBLE_DEVICES": "GPU-aa"},
        {"CUDA_VISIBLE_DEVICES": "GPU-bb"},
    ]
    none = share(1, 1, 64, "cuda", 8, {"CUDA_VISIBLE_DEVICES": ""})
    assert none.env == {} and "no GPU found" in none.message


def test_more_workers_than_gpus_share_cards_and_say_so() -> None:
    third = share(3, 3, 64, "cuda", 2, {})
    assert third.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert "shared with worker 1" in third.message
    assert "dvc queue start -j 2" in third.message


def test_data_parallel_and_other_backends_are_left_alone() -> None:
    dp = share(2, 2, 64, "cuda", 8, {"LORAPIPE_PROCESSES": "2"})
    assert dp.env == {} and "dvc queue start -j 1" in dp.message
    hosts = share(1, 2, 64, "cpu", 0, {"LORAPIPE_HOSTFILE": "hosts.json"})
    assert hosts.env == {} and "left as they are" in hosts.message
    assert share(1, 2, 10, "metal", 0, {}) == Share()  # one GPU on a Mac, shared


# --- find_worker: the queue worker among this process's ancestors --------------------------------

FIND = "from lorapipe.workers import find_worker; print(find_worker())"


def fake_worker(name: str, code: str = "import time; time.sleep(60)") -> subprocess.Popen[str]:
    """A process whose command line is a DVC queue worker's, running `code`."""
    return subprocess.Popen(
        [sys.executable, "-c", code, "exp", "queue-worker", name, "--clean"],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_find_worker_walks_ancestors_and_counts_the_queue_s_workers() -> None:
    assert find_worker() is None  # pytest runs in no queue
    others = [
        fake_worker("dvc-exp-abc123-1@localhost"),
        fake_worker("dvc-exp-fff000-3@localhost"),  # another project's queue
    ]
    try:
        # A grandchild, as a stage command is one of `dvc exp exec-run`.
        run = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {FIND!r}])"
        worker = fake_worker("dvc-exp-abc123-2@localhost", run)
        out, _ = worker.communicate(timeout=60)
    finally:
        for other in others:
            other.kill()
            other.wait()
    assert out.strip() == "(2, 2)"


# --- the real thing: `dvc queue start -j 2` ------------------------------------------------------

# Each experiment waits (bounded) until both have started, so the two run at once, in the two
# workers; then `lorapipe doctor` prints the BLAS it loaded and that BLAS's thread count.
BARRIER = """\
import sys, time
from pathlib import Path
folder = Path(sys.argv[1])
(folder / sys.argv[2]).touch()
deadline = time.monotonic() + 60
while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
    time.sleep(0.1)
"""


@pytest.mark.skipif(
    sys.platform != "linux" or runtime.mlx_backend()[0] != "cpu",
    reason="counts lorapipe's OpenBLAS threads: MLX's Linux CPU backend",
)
def test_two_queue_workers_each_take_half_the_cores(tmp_path: Path) -> None:
    project, barrier = tmp_path / "project", tmp_path / "barrier"
    project.mkdir()
    barrier.mkdir()
    git(project, "init", "-q")
    dvc_ok(project, "init", "-q")
    (project / "barrier.py").write_text(BARRIER)
    (project / "params.yaml").write_text("x: 0\n")
    (project / "dvc.yaml").write_text(
        "stages:\n"
        "  doctor:\n"
        f"    cmd: python barrier.py {barrier} ${{x}} && lorapipe doctor\n"
        "    params: [x]\n"
    )
    commit_all(project, "a stage that reports its BLAS")
    names = queue(project, "x=1,2")
    env = {k: v for k, v in command_env().items() if k not in THREAD_VARIABLES}
    run_queue(project, names, jobs=2, limit_s=180, env=env)

    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // 2)
    plural = "s" if threads != 1 else ""
    seen = set()
    for name in names:
        log = dvc_ok(project, "queue", "logs", name).stdout
        said = re.search(rf"lorapipe: dvc queue worker (\d) \(2 running, {cores} cores\): "
                         rf"{threads} BLAS thread{plural}\n", log)  # fmt: skip
        assert said, log
        seen.add(int(said[1]))
        # And the OpenBLAS that MLX uses runs that many threads (its own count, not the env's).
        assert re.search(rf"blas +openblas \(lorapipe\), {threads} thread{plural}:", log), log
    assert seen == {1, 2}
