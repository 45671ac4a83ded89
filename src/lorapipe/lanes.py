"""Lanes: a batch's rows split over MLX streams on the CPU, one lane per core, in training
steps and in eval's prefill and decoding (lorapipe.decode).

On MLX's CPU backend a stream runs one operation at a time on one thread. The BLAS spreads each
matrix product over the cores, but everything between the products (norms, RoPE, softmax,
swiglu, their gradients, the optimizer) runs on that one thread while the BLAS's other threads
wait. With lanes, each lane computes the loss and gradient of its share of a batch's rows on a
stream of its own, with a one-thread BLAS, so every core does both kinds of work. The lanes'
losses and gradients are weighed by their learned tokens: a step computes the batch's mean, as
one lane does, up to float rounding (the trainer combines them; `Batches.split` cuts the rows).
In eval each lane prefills and decodes its share of the prompts with a KV cache of its own: rows
never meet in a forward pass, so the count changes the speed, not the outputs.

Two process-wide settings make lanes run side by side:
- MLX's `eval` lists its work breadth-first only `MLX_BFS_MAX_WIDTH` arrays wide (20), then
  depth-first, and queues at most 10 operations ahead of the threads running them: one
  lane's whole backward pass would be queued before the other's, and the lanes would take turns.
  `prepare` widens it; MLX reads it once, at the process's first `eval`.
- The BLAS runs each call on one thread while lanes run (`blas_threads`), else two lanes'
  products would each ask for every core.

Where MLX computes on the CPU, `LORAPIPE_CPU_LANES` sets the count (1: no lanes); by default it
is the BLAS's thread count. On a GPU there is one lane (a GPU runs a batch's work side by side by
itself).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from lorapipe import runtime
from lorapipe.errors import LorapipeError

ENV_VAR = "LORAPIPE_CPU_LANES"
BFS_WIDTH_VAR = "MLX_BFS_MAX_WIDTH"
WIDE = "1000000"  # wider than any training step's graph


class LanesError(LorapipeError):
    """LORAPIPE_CPU_LANES is not a positive whole number."""


def _requested() -> int | None:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise LanesError(f"{ENV_VAR}={value!r}: expected a whole number of lanes, 1 or more")
    return int(value)


def _on_cpu() -> bool:
    import mlx.core as mx

    return bool(mx.default_device() == mx.cpu)


def count(rows: int) -> int:
    """How many lanes a batch of `rows` rows (this process's share of it) runs on: never more
    than its rows."""
    requested = _requested()  # checked on a GPU too: a bad value is an error everywhere
    return max(1, min(_chosen(requested), rows)) if _on_cpu() else 1


def _chosen(requested: int | None) -> int:
    """The count on the CPU: the one requested, else one per BLAS thread."""
    return requested or runtime.blas_info().threads or 1


def prepare(lanes: int) -> None:
    """Let `lanes` lanes run side by side: call before this process's first `mx.eval` (MLX
    reads the width once). A width the user set is kept; with one lane nothing changes."""
    if lanes > 1:
        os.environ.setdefault(BFS_WIDTH_VAR, WIDE)


def streams(count: int) -> list[Any]:
    """`count` streams on the default device: its default stream, then streams made once per
    process and reused (by every training run and decoding batch that asks)."""
    import mlx.core as mx

    device = mx.default_device()
    extra = _extra_streams.setdefault(str(device), [])
    extra += [mx.new_stream(device) for _ in range(count - 1 - len(extra))]
    return [mx.default_stream(device), *extra[: count - 1]]


_extra_streams: dict[str, list[Any]] = {}


@contextlib.contextmanager
def blas_threads(count: int | None) -> Iterator[None]:
    """Inside, the BLAS serving MLX runs each call on `count` threads (OpenBLAS, MKL), then on
    as many as before; None, or a BLAS that cannot be told, changes nothing."""
    previous = None if count is None else runtime.blas_info().threads
    if count is None or previous is None or not runtime.set_blas_threads(count):
        yield
        return
    try:
        yield
    finally:
        runtime.set_blas_threads(previous)


def origin() -> str:
    """Where the count comes from, for the train log and `lorapipe doctor`."""
    if os.environ.get(ENV_VAR, "").strip():
        return f"set by {ENV_VAR}"
    return f"one per BLAS thread; {ENV_VAR}=1: one stream"


def describe() -> str:
    """What `lorapipe doctor` prints on MLX's CPU backend."""
    try:
        requested = _requested()
    except LanesError as exc:
        return str(exc)
    return f"{_chosen(requested)} ({origin()})"
