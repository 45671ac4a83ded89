"""Work spread over a CPU's cores as threads ("lanes"), each with its own MLX stream.

On MLX's CPU backend one stream runs its operations one after another on one thread: only the
BLAS spreads a matmul over the cores, while every element-wise operation (norms, RoPE,
softmax, the cache's writes) leaves the other cores idle, or spinning in OpenBLAS's wait loop.
MLX gives each Python thread a stream of its own (MLX >= 0.32) and releases the GIL while it
evaluates, so N threads, each deciding a share of the rows with a one-thread BLAS, keep N cores
busy on all of the work. On the 2-core box a decoding step of 128 rows ran 1.29x as fast as 64
+ 64 rows on two lanes (bench/README.md, `generate.py`).

Lanes apply where MLX computes on the CPU of a Linux machine whose BLAS says how many threads
it runs (OpenBLAS, MKL): one lane per BLAS thread, so the cores a DVC queue worker was given
(lorapipe.workers sets the BLAS threads) are the lanes it runs. Elsewhere (Metal, CUDA) one.
`LORAPIPE_CPU_LANES=N` sets the count (1: off).

Threads share the model, whose forward pass some of lorapipe's code builds with a module's
class swapped for a moment (lorapipe.loss.logits_at): `building` serializes the building of
graphs (milliseconds), never their evaluation.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from contextlib import contextmanager
from typing import Any, TypeVar

from lorapipe.errors import LorapipeError

ENV_VAR = "LORAPIPE_CPU_LANES"

Share = TypeVar("Share")
Result = TypeVar("Result")

# Held while a lane builds a graph on the shared model (see the module's docstring).
building = threading.RLock()


class LanesConfigError(LorapipeError):
    """LORAPIPE_CPU_LANES is not a positive whole number."""


def count() -> int:
    """The lanes this process runs: LORAPIPE_CPU_LANES, else the BLAS's threads where MLX
    computes on a Linux CPU, else 1."""
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting:
        if not setting.isdigit() or int(setting) < 1:
            raise LanesConfigError(f"{ENV_VAR}={setting}: expected a whole number >= 1")
        return int(setting)
    import mlx.core as mx

    from lorapipe import runtime

    if sys.platform != "linux" or mx.default_device() != mx.cpu:
        return 1
    return max(1, runtime.blas_info().threads or 1)


def describe() -> str:
    """What `lorapipe doctor` prints for MLX's CPU backend."""
    try:
        lanes = count()
    except LanesConfigError as exc:
        return str(exc)
    if os.environ.get(ENV_VAR):
        return f"{lanes} for eval's decoding ({ENV_VAR}={lanes})"
    return f"{lanes} for eval's decoding: one per BLAS thread ({ENV_VAR}=N sets it)"


@contextmanager
def _one_blas_thread(lanes: int) -> Iterator[None]:
    """The BLAS on one thread a call while `lanes` threads call it (N lanes of N threads each
    on N cores thrash: bench/README.md, `workers.py`)."""
    import mlx.core as mx

    from lorapipe import runtime

    if lanes == 1:
        yield
        return
    mx.synchronize()  # no BLAS call of this thread's stream in flight while the count changes
    with runtime.blas_threads(1):
        try:
            yield
        finally:
            mx.synchronize()


def run(work: Callable[[Share], Result], shares: Sequence[Share]) -> list[Result]:
    """`work` on each share, one lane (thread) a share, each on its own MLX stream; the
    results in the shares' order. The first error a lane raised is raised here, once every
    lane has stopped."""
    if len(shares) == 1:
        return [work(shares[0])]
    with _one_blas_thread(len(shares)):
        futures = [_lanes(len(shares)).submit(work, share) for share in shares]
        wait(futures)
        return [future.result() for future in futures]


class _Lanes:
    """Threads that stay for the life of the process. MLX keeps a compile cache per thread,
    and a thread that ends after compiling aborts the process ("terminate called without an
    active exception", MLX 0.32.4), as Python's thread pools end theirs at exit: daemon
    threads are never ended, nor waited for at exit."""

    def __init__(self, count: int) -> None:
        self.jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[Any], Any], Any]]
        self.jobs = queue.SimpleQueue()
        for lane in range(count):
            name = f"lorapipe-lane-{lane}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, work: Callable[[Share], Result], share: Share) -> Future[Result]:
        future: Future[Result] = Future()
        self.jobs.put((future, work, share))
        return future

    def _serve(self) -> None:
        import mlx.core as mx

        while True:
            future, work, share = self.jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = work(share)
                mx.synchronize()  # this thread's stream drained before the next job
            except BaseException as exc:  # handed to the caller, as a thread pool does
                future.set_exception(exc)
            else:
                future.set_result(result)


_pools: dict[int, _Lanes] = {}


def _lanes(count: int) -> _Lanes:
    """`count` lanes, made once: MLX also makes a stream and its worker thread for each new
    thread, and keeps them."""
    with building:
        if count not in _pools:
            _pools[count] = _Lanes(count)
        return _pools[count]
