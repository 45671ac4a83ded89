"""exp on MLX's x86-64 CPU backend as a power of two: in swiglu, attention and the loss.

MLX's Linux x86-64 CPU wheel is built for baseline x86-64, which has no fused multiply-add
instruction, so its exp (which sigmoid, softmax and logsumexp use) runs one element at a time
through a polynomial whose six multiply-adds are six calls into libm: ~10 ns an element for exp
and 15 for sigmoid, where a multiply-add costs 0.2 and `mx.power(2, y)`, one call of libm's
powf, 3. On two cores that was a third of a 135M model's forward pass (bench/README.md, "exp
on the x86 CPU").

Here exp(x) is 2^(x log2 e) wherever the maths is ours to write: `swiglu` (silu's sigmoid),
`attention` (mlx-lm's scaled_dot_product_attention as MLX's CPU path composes it, matmul, mask,
softmax, matmul, but with a key/value head's query heads folded into one matrix) and the loss's
`logsumexp` / `cross_entropy`. Same values within float32 rounding (exp's relative error against
float64 is 3.7e-6 either way on [-80, 80]). sigmoid, softmax and logsumexp keep MLX's backward
passes: their gradients come from their outputs (logsumexp's recomputes exp, as MLX's does), so
a training step keeps no more arrays.

Each function checks `applies(x)` when it is traced: float32 on MLX's CPU device on x86-64.
Anything else (Metal, CUDA, Arm CPUs, float16 or bfloat16) runs MLX's own. `install()` puts
`swiglu` and `attention` in place of mlx-lm's in its model modules (those imported already and,
through mlx-lm's `activations` and `base` modules, those imported later) for the rest of the
process: lorapipe calls it wherever it loads a model; training runs inside `installed()`.
`LORAPIPE_CPU_EXP=mlx` keeps MLX's exp everywhere (benchmarks, debugging).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

ENV_VAR = "LORAPIPE_CPU_EXP"
LOG2E = 1.4426950408889634


class _Switch:
    # Measured on x86-64 only, where MLX's wheel has no FMA instruction to call.
    on = platform.machine().lower() in ("x86_64", "amd64") and os.environ.get(ENV_VAR) != "mlx"


def applies(x: Any) -> bool:
    """Whether x's exp is computed here: float32 on MLX's CPU device of an x86-64 machine."""
    import mlx.core as mx

    return _Switch.on and x.dtype == mx.float32 and mx.default_device() == mx.cpu


def describe() -> str:
    """What `lorapipe doctor` prints for MLX's CPU backend."""
    if _Switch.on:
        return f"2^(x log2 e) in swiglu, attention and the loss ({ENV_VAR}=mlx: MLX's own)"
    if os.environ.get(ENV_VAR) == "mlx":
        return f"MLX's own ({ENV_VAR}=mlx)"
    return f"MLX's own (lorapipe's is for x86-64, this is {platform.machine()})"


@contextmanager
def mlx_exp() -> Iterator[None]:
    """Inside, every function here runs MLX's own exp (as LORAPIPE_CPU_EXP=mlx does): for
    benchmarks and tests, in steps traced inside."""
    previous, _Switch.on = _Switch.on, False
    try:
        yield
    finally:
        _Switch.on = previous


def exp(x: Any) -> Any:
    import mlx.core as mx

    return _exp2(x) if applies(x) else mx.exp(x)


def _exp2(x: Any) -> Any:
    """exp(x) as 2^(x log2 e): one libm powf call an element where MLX's exp makes six fmaf."""
    import mlx.core as mx

    return mx.power(2.0, x * LOG2E)


class _PowersOfTwo(NamedTuple):
    softmax: Any  # over the last axis
    logsumexp: Any  # over the last axis, kept
    swiglu: Any


@functools.cache
def _fast() -> _PowersOfTwo:
    """The power-of-two versions (mx.custom_function: only their outputs are kept)."""
    import mlx.core as mx

    @mx.custom_function
    def sigmoid(x: Any) -> Any:
        return 1 / (1 + _exp2(-x))

    @sigmoid.vjp
    def sigmoid_vjp(primals: Any, cotangent: Any, output: Any) -> Any:
        return (cotangent * output * (1 - output),)

    @mx.custom_function
    def softmax(x: Any) -> Any:  # over the last axis
        e = _exp2(x - mx.max(x, axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    @softmax.vjp
    def softmax_vjp(primals: Any, cotangent: Any, output: Any) -> Any:
        return (output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True)),)

    @mx.custom_function
    def logsumexp(x: Any) -> Any:  # over the last axis, kept
        top = mx.max(x, axis=-1, keepdims=True)
        return top + mx.log(_exp2(x - top).sum(axis=-1, keepdims=True))

    @logsumexp.vjp
    def logsumexp_vjp(primals: Any, cotangent: Any, output: Any) -> Any:
        return (_exp2(primals - output) * cotangent,)  # one input: primals is that array

    # Compiled (per shape: custom functions cannot be traced shapeless) so that swiglu is one
    # pass over its inputs where the caller is not compiled itself (generation).
    swiglu = mx.compile(lambda gate, x: gate * sigmoid(gate) * x)
    return _PowersOfTwo(softmax, logsumexp, swiglu)


def logsumexp(x: Any, keepdims: bool = False) -> Any:
    """mx.logsumexp over the last axis."""
    import mlx.core as mx

    if not applies(x):
        return mx.logsumexp(x, axis=-1, keepdims=keepdims)
    out = _fast().logsumexp(x)
    return out if keepdims else out[..., 0]


def cross_entropy(logits: Any, targets: Any) -> Any:
    """mlx.nn.losses.cross_entropy(logits, targets) for class indices over the last axis."""
    import mlx.core as mx
    import mlx.nn as nn

    if not applies(logits):
        return nn.losses.cross_entropy(logits, targets)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logsumexp(logits) - picked


def swiglu(gate: Any, x: Any) -> Any:
    """mlx-lm's swiglu, silu(gate) * x."""
    if applies(gate):
        return _fast().swiglu(gate, x)
    return _originals()[0](gate, x)


def attention(
    queries: Any,
    keys: Any,
    values: Any,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: Any = None,
) -> Any:
    """mlx-lm's scaled_dot_product_attention: queries [batch, heads, length, dim] over keys and
    values [batch, kv_heads, keys, dim], mask None, "causal", boolean or additive."""
    import mlx.core as mx

    if sinks is not None or hasattr(cache, "bits") or not applies(queries):
        return _originals()[1](queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    batch, heads, length, dim = queries.shape
    kv_heads, seen = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads  # query heads sharing one key/value head
    # A key/value head's query heads are one matrix (their rows one after another), not a
    # broadcast of the keys: MLX's CPU matmul copies a broadcast operand whole (3x the cache a
    # layer at SmolLM2's 9/3 heads) and calls the BLAS once per (row, query head); folded, once
    # per (row, key/value head) on the cache as it is. A decoding step's attention at 128 rows
    # takes 9 ms a layer where broadcasting took 13 and MLX's own CPU path 15 (bench/README.md).
    queries = (queries * scale).reshape(batch, kv_heads, groups * length, dim)
    scores = (queries @ keys.swapaxes(-1, -2)).reshape(batch, kv_heads, groups, length, seen)
    if isinstance(mask, str):  # "causal": the queries are the last `length` positions
        mask = mx.arange(seen - length, seen)[:, None] >= mx.arange(seen)[None]
    elif mask is not None and mask.ndim > 2:  # [.., heads or 1, length, keys] against 5-D
        if mask.shape[-3] == heads and groups > 1:
            mask = mask.reshape(*mask.shape[:-3], kv_heads, groups, *mask.shape[-2:])
        else:
            mask = mx.expand_dims(mask, -3)
    if mask is not None and mask.dtype == mx.bool_:
        # the finite minimum, as MLX's: a row with nothing to attend to stays a number
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    probabilities = _fast().softmax(scores).reshape(batch, kv_heads, groups * length, seen)
    return (probabilities @ values).reshape(batch, heads, length, -1)  # values may be wider


@functools.cache
def _originals() -> tuple[Any, Any]:
    """mlx-lm's swiglu and scaled_dot_product_attention, as they were before install()."""
    from mlx_lm.models import activations, base

    return activations.swiglu, base.scaled_dot_product_attention


def _swap() -> list[tuple[Any, str, Any]]:
    """Put `swiglu` and `attention` in place of mlx-lm's in every imported mlx-lm model module
    (and in its `activations` and `base` modules, which model modules imported later read);
    returns (module, name, mlx-lm's function) for each name changed."""
    if not _Switch.on:
        return []
    mine = {"swiglu": swiglu, "scaled_dot_product_attention": attention}
    originals = _originals()  # (imports activations and base first)
    changed = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("mlx_lm.models.") or module is None:
            continue
        for attribute, original in zip(mine, originals, strict=True):
            if getattr(module, attribute, None) is original:
                setattr(module, attribute, mine[attribute])
                changed.append((module, attribute, original))
    return changed


def install() -> int:
    """For the rest of the process (lorapipe calls it wherever it loads a model); returns how
    many names changed. Idempotent; a no-op where `applies` can never hold."""
    return len(_swap())


@contextmanager
def installed() -> Iterator[int]:
    """Inside, as install(); mlx-lm's own functions are back on exit where this put ours."""
    changed = _swap()
    try:
        yield len(changed)
    finally:
        for module, attribute, original in changed:
            setattr(module, attribute, original)
