"""Pieces of the training step that do the same maths in fewer bytes and fewer GPU kernels.

- `lora_in_compute_dtype`: mlx-lm's LoRA layers keep their A and B matrices in float32, so on a
  bfloat16 model every adapted layer casts its input to float32, multiplies in float32 and
  writes a float32 [tokens x out] product; the float32 copies of the inputs are also kept for
  the backward pass. Inside this context the low-rank branch runs in bfloat16 instead (A and B
  are cast, the master copies the optimizer updates stay float32), as the frozen layer beside
  it already does, and its product is added to the frozen layer's output inside the matrix
  product (`mx.addmm`) instead of through a [tokens x out] temporary. The branch's output was
  rounded to bfloat16 before the add anyway (and MLX's CUDA float32 products run in TF32), so
  only rounding changes: losses agree to bfloat16 precision (tests/test_train_step.py). float32
  models (the CPU default) are untouched, and so is float16, whose narrow range could lose
  small adapter gradients.
- `squared_norm` / `clip_by_norm`: one pass over the gradients gives both the NaN guard (the
  sum of squares is finite iff every entry is, short of a float32 overflow that no update
  should take either) and gradient clipping's norm, instead of one pass each.
- `swiglu_keeping_inputs`: mlx-lm's swiglu, silu(gate) * x, differentiated by hand so that the
  backward pass reads only gate and x and recomputes the sigmoid (bfloat16 only). Measured on
  an H200: steps 2-3% faster, peak memory unchanged.
- `fast_training`: the LoRA and swiglu rewrites together, what train_loop runs inside.
- `memory_limit`: MLX's allocator limit for a block. The host queues work ahead of the device,
  and every buffer a queued kernel reads stays allocated until that kernel has run; above the
  limit MLX waits for queued work to finish before it allocates more.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _compute_dtype_lora_class() -> type:
    import mlx.core as mx
    from mlx_lm.tuner.lora import LoRALinear

    class LoRAInComputeDtype(LoRALinear):
        """mlx-lm's LoRALinear, its low-rank branch in the input's dtype (bfloat16 only)."""

        def __call__(self, x: Any) -> Any:
            if x.dtype != mx.bfloat16:
                return super().__call__(x)
            # [batch, length, in] as [tokens, in]: A's and B's gradients are then one product
            # each over every token, not one per row of the batch plus a sum over the batch.
            rows = x.reshape(-1, x.shape[-1])
            u = self.dropout(rows) @ self.lora_a.astype(x.dtype)
            # y + scale * (u @ B) as one matrix product with an accumulate epilogue: no
            # [tokens x out] temporary for the low-rank term, one rounding instead of two.
            out = mx.addmm(self.linear(rows), u, self.lora_b.astype(x.dtype), alpha=self.scale)
            return out.reshape(*x.shape[:-1], out.shape[-1])

    return LoRAInComputeDtype


_CLASS: type | None = None


@contextmanager
def lora_in_compute_dtype(model: Any) -> Iterator[int]:
    """Run the model's LoRA layers' low-rank branch in bfloat16 while inside; yields how many
    layers changed. Parameters, their names and dtypes stay as they are (the saved adapter is
    a plain mlx-lm adapter); only the layers' class changes, and it is restored on exit."""
    global _CLASS
    from mlx_lm.tuner.lora import LoRALinear

    if _CLASS is None:
        _CLASS = _compute_dtype_lora_class()
    # Exactly LoRALinear: a subclass (DoRA, or someone else's) keeps its own forward.
    layers = [m for _, m in model.named_modules() if type(m) is LoRALinear]
    for layer in layers:
        layer.__class__ = _CLASS
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.__class__ = LoRALinear


def swiglu_by_hand() -> Any:
    """silu(gate) * x whose backward pass keeps only gate and x."""
    import mlx.core as mx

    @mx.custom_function
    def swiglu(gate: Any, x: Any) -> Any:
        return gate * mx.sigmoid(gate) * x  # nn.silu(gate) * x, in the same order

    @swiglu.vjp
    def swiglu_vjp(primals: Any, cotangent: Any, output: Any) -> Any:
        gate, x = primals
        s = mx.sigmoid(gate)
        # d silu(g) / dg = s + g s (1 - s)
        return cotangent * x * (s * (1 + gate * (1 - s))), cotangent * (gate * s)

    return swiglu


@contextmanager
def swiglu_keeping_inputs() -> Iterator[int]:
    """Inside, the mlx-lm model modules already imported use `swiglu_by_hand` for bfloat16
    `swiglu` (a model's calls are traced inside, so its compiled step keeps it); yields how
    many modules changed, and puts mlx-lm's own back on exit."""
    import sys

    import mlx.core as mx
    from mlx_lm.models import activations

    original = activations.swiglu
    by_hand = swiglu_by_hand()

    def ours(gate: Any, x: Any) -> Any:
        return by_hand(gate, x) if gate.dtype == mx.bfloat16 else original(gate, x)

    modules = [
        m
        for name, m in list(sys.modules.items())
        if name.startswith("mlx_lm.models.")
        and m is not activations
        and getattr(m, "swiglu", None) is original
    ]
    for module in modules:
        module.swiglu = ours  # type: ignore[attr-defined]
    try:
        yield len(modules)
    finally:
        for module in modules:
            module.swiglu = original  # type: ignore[attr-defined]


@contextmanager
def fast_training(model: Any) -> Iterator[None]:
    """The training step's rewrites that keep its maths: LoRA branch in bfloat16 through one
    accumulate product, swiglu keeping only its inputs. Both leave float32 models alone."""
    with lora_in_compute_dtype(model), swiglu_keeping_inputs():
        yield


def squared_norm(grads: Any) -> Any:
    """Sum of the squares of every gradient entry, in float32 (as clip_grad_norm sums)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    total = mx.array(0.0, mx.float32)
    for _, g in tree_flatten(grads):
        total = total + g.astype(mx.float32).square().sum()
    return total


def clip_by_norm(grads: Any, norm: Any, max_norm: float) -> Any:
    """mlx.optimizers.clip_grad_norm's scaling, given the norm already computed."""
    import mlx.core as mx
    from mlx.utils import tree_map

    normalizer = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: (g * normalizer).astype(g.dtype), grads)


@contextmanager
def memory_limit(gigabytes: float | None) -> Iterator[None]:
    """mx.set_memory_limit(gigabytes) while inside (None: leave MLX's default), then restored."""
    import mlx.core as mx

    if gigabytes is None:
        yield
        return
    previous = mx.set_memory_limit(int(gigabytes * 1e9))
    try:
        yield
    finally:
        mx.set_memory_limit(previous)
