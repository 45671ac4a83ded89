"""Training memory: how much a step may use, a trial step that fails early with what to change,
and MLX's allocator limit while training."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorapipe.batches import Batches
from lorapipe.errors import LorapipeError
from lorapipe.loss import masked_loss
from lorapipe.params import TrainParams

# Messages of the allocators that run out: Metal, CUDA, and the CPU's C++ runtime.
_OUT_OF_MEMORY = ("out of memory", "insufficient memory", "bad_alloc", "cudamalloc", "outofmemory")
ADVICE = (
    "lower train.batch_size or train.max_seq_length (with sanitize.max_tokens), or set "
    "train.grad_checkpoint: -1 (or a number of blocks)"
)


class OutOfMemory(LorapipeError):
    """A training step does not fit in the memory there is."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an error raised by MLX is an allocator running out."""
    return isinstance(exc, (RuntimeError, MemoryError)) and any(
        word in str(exc).lower() for word in _OUT_OF_MEMORY
    )


def memory_available() -> tuple[int, str]:
    """Bytes one training step may use, and where that figure comes from."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        info = mx.device_info()
        for key in ("free_memory", "max_recommended_working_set_size", "memory_size"):
            if isinstance(info.get(key), int) and info[key] > 0:
                return int(info[key]), f"the GPU's {key.replace('_', ' ')}"
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        kib = int(next(ln.split()[1] for ln in lines if ln.startswith("MemAvailable")))
        return kib * 1024, "free RAM"
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM"


def check_memory(model: Any, batches: Batches, train: TrainParams, trainable: int) -> float:
    """Fail before step 1, with what to change, if the longest batch does not fit.

    Runs one uncompiled forward and backward pass on the batch with the most tokens (compiling
    only ever needs less) and adds the optimizer's state; returns the estimate in bytes.
    """
    import mlx.core as mx
    import mlx.nn as nn

    largest = max(range(len(batches)), key=lambda i: batches.tokens[i].size)
    shape = "x".join(map(str, batches.tokens[largest].shape))
    if train.memory_limit_gb is not None:
        limit, source = int(train.memory_limit_gb * 1e9), "train.memory_limit_gb"
    else:
        limit, source = memory_available()
    mx.reset_peak_memory()
    try:
        _, grad = nn.value_and_grad(model, masked_loss)(model, *batches.arrays(largest))
        mx.eval(grad)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise OutOfMemory(
            f"train: out of memory in a trial step on the longest batch ({shape} tokens): "
            f"{exc}; {ADVICE}"
        ) from exc
    del grad
    optimizer_state = 2 * 4 * trainable  # Adam's two fp32 moments per trainable parameter
    need = mx.get_peak_memory() + optimizer_state
    mx.reset_peak_memory()
    mx.clear_cache()
    if need > limit:
        raise OutOfMemory(
            f"train: a step on the longest batch ({shape} tokens) needs about {need / 1e9:.2f} GB, "
            f"more than the {limit / 1e9:.2f} GB of {source}; {ADVICE}"
        )
    return need


@contextmanager
def memory_limit(gigabytes: float | None) -> Iterator[None]:
    """mx.set_memory_limit(gigabytes) while inside (None: leave MLX's default), then restored.
    The host queues work ahead of the device, and every buffer a queued kernel reads stays
    allocated until that kernel has run; above the limit MLX waits for queued work to finish
    before it allocates more, so the limit also bounds how far the queue runs ahead."""
    import mlx.core as mx

    if gigabytes is None:
        yield
        return
    previous = mx.set_memory_limit(int(gigabytes * 1e9))
    try:
        yield
    finally:
        mx.set_memory_limit(previous)
