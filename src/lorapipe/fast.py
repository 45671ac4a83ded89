"""Pieces of the training step that do the same maths in fewer FLOPs, bytes and GPU kernels.
Their measured gains are in bench/README.md (train.py, "Where the time goes"); the reasons
are here.

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
- `squared_norm`: one pass over the gradients gives both the NaN guard (the
  sum of squares is finite iff every entry is, short of a float32 overflow that no update
  should take either) and gradient clipping's norm, instead of one pass each.
- `swiglu_keeping_inputs`: mlx-lm's swiglu, silu(gate) * x, differentiated by hand so that the
  backward pass reads only gate and x and recomputes the sigmoid, after the cotangent exists
  (`mx.depends`, see `swiglu_mlps`): a compiled bfloat16 step's peak 23% lower on the CPU
  (bfloat16 only).
- `swiglu_mlps`: an MLP's down_proj LoRA layer keeps its input, silu(gate) * up, for its A
  matrix's gradient: one of the widest arrays a block saves ([tokens x hidden]). Its backward
  pass recomputes it from gate and up, which swiglu's own backward keeps anyway, after the
  cotangent exists (`mx.depends`): a compiled step merges identical computations, and would
  otherwise keep the forward pass's copy. Measured on the CPU (bench/README.md): a compiled
  bfloat16 step's peak 34% lower than with neither rewrite fixed, at the same speed (bfloat16 only).
- `fast_training`: these rewrites together, and `lorapipe.cpu_exp`'s exp for float32 models on
  an x86-64 CPU, what the training loop runs inside.
- `OneVector`: the optimizer over one float32 vector holding every trainable array (the model's
  arrays are views into it) instead of array by array: on a GPU, hundreds of small adapter
  arrays otherwise cost thousands of tiny kernels a step. `ArrayByArray` is mlx's own way: on
  the CPU (where a kernel costs no launch, so one vector does not pay), and for what one vector
  cannot do (Adafactor's factored moments, non-float32 arrays). `trainable_layout` picks one.
- `checkpoint_blocks`: gradient checkpointing of some or all blocks of one model; dropout in
  every block draws its masks from a key passed into the block, so a block that recomputes
  draws the masks it drew in the forward pass (mx.checkpoint alone would draw new ones, and
  the gradient would belong to another mask than the loss).

These replace mlx-lm internals by name (`MLX_LM_NAMES`), written for the mlx-lm range that
pyproject.toml pins; `check_mlx_lm` fails at start-up, naming the version, if one is gone.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from lorapipe.errors import LorapipeError

# The mlx-lm names this module replaces or subclasses (module, attribute).
MLX_LM_NAMES = (
    ("mlx_lm.tuner.lora", "LoRALinear"),
    ("mlx_lm.models.activations", "swiglu"),
    ("mlx_lm.tuner.utils", "linear_to_lora_layers"),
)


class IncompatibleMlxLm(LorapipeError):
    """The installed mlx-lm lacks a name lorapipe's training step replaces."""


def check_mlx_lm() -> None:
    """Fail before training, naming the mlx-lm version, if a name this module patches is gone
    (a newer mlx-lm than pyproject.toml's range) rather than deep inside the first step."""
    import importlib
    from importlib.metadata import version

    for module, name in MLX_LM_NAMES:
        try:
            found = hasattr(importlib.import_module(module), name)
        except ImportError:
            found = False
        if not found:
            raise IncompatibleMlxLm(
                f"mlx-lm {version('mlx-lm')} has no {module}.{name}, which lorapipe's training "
                "step replaces; install the mlx-lm version pinned in uv.lock (`uv sync --locked`)"
            )


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
        # After the cotangent exists, or a compiled step merges this sigmoid with the forward
        # pass's and keeps it (as `_down_of_swiglu` explains).
        gate, x = mx.depends([gate, x], [cotangent])
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


# The forward of mlx-lm's swiglu MLPs (llama, qwen2, qwen3, mistral and some fifty more), as
# their source spells it: `swiglu_mlps` recognizes the classes by it.
SWIGLU_MLP_FORWARD = "return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))"


@functools.cache
def _down_of_swiglu(scale: float) -> Any:
    """down_proj(silu(gate) * up) for a bfloat16 LoRA down_proj over a frozen nn.Linear, whose
    backward pass recomputes silu(gate) * up from gate and up (kept anyway, for swiglu's own
    gradient) instead of keeping it for the LoRA A matrix's gradient: one [tokens x hidden]
    array less per block, the widest the MLP saves, for a few elementwise operations."""
    import mlx.core as mx

    @mx.custom_function
    def down(gate: Any, up: Any, weight: Any, a: Any, b: Any) -> Any:
        h = (gate * mx.sigmoid(gate) * up).reshape(-1, gate.shape[-1])  # as swiglu_by_hand
        out = mx.addmm(h @ weight.T, h @ a, b, alpha=scale)  # as LoRAInComputeDtype
        return out.reshape(*gate.shape[:-1], out.shape[-1])

    @down.vjp
    def down_vjp(primals: Any, cotangent: Any, output: Any) -> Any:
        gate, up, weight, a, b = primals
        # Recompute after the cotangent exists: a compiled step would otherwise merge this
        # recomputation with the forward pass's identical one, and keep h after all.
        gate, up = mx.depends([gate, up], [cotangent])
        s = mx.sigmoid(gate)
        h = (gate * s * up).reshape(-1, gate.shape[-1])
        dy = cotangent.reshape(-1, cotangent.shape[-1])
        du = scale * (dy @ b.T)  # [tokens x rank]
        dh = mx.addmm(dy @ weight, du, a.T).reshape(gate.shape)
        # weight is frozen: its zero gradient is never evaluated (nothing reads it)
        return (
            dh * up * (s * (1 + gate * (1 - s))),
            dh * (gate * s),
            mx.zeros_like(weight),
            h.T @ du,
            scale * ((h @ a).T @ dy),
        )

    return down


def _recomputing_mlp_class(plain: type) -> type:
    import mlx.core as mx
    import mlx.nn as nn

    def __call__(self: Any, x: Any) -> Any:
        down = self.down_proj
        bfloat16_branch = type(down) is _CLASS  # lora_in_compute_dtype's LoRA layer
        if not (
            x.dtype == mx.bfloat16
            and bfloat16_branch
            and type(down.linear) is nn.Linear  # a frozen dense layer (not QLoRA's)
            and "bias" not in down.linear
            and getattr(down.dropout, "_p_1", 1.0) == 1.0  # no LoRA dropout
        ):
            return plain.__call__(self, x)
        dtype = x.dtype
        return _down_of_swiglu(down.scale)(
            self.gate_proj(x),
            self.up_proj(x),
            down.linear.weight,
            down.lora_a.astype(dtype),
            down.lora_b.astype(dtype),
        )

    return type(plain.__name__, (plain,), {"__call__": __call__, "_lorapipe_plain": plain})


_SWIGLU_MLP: dict[type, bool] = {}


def _is_swiglu_mlp(cls: type) -> bool:
    import inspect

    if cls not in _SWIGLU_MLP:
        try:
            _SWIGLU_MLP[cls] = SWIGLU_MLP_FORWARD in inspect.getsource(cls.__call__)
        except (OSError, TypeError):
            _SWIGLU_MLP[cls] = False
    return _SWIGLU_MLP[cls]


@contextmanager
def swiglu_mlps(model: Any) -> Iterator[int]:
    """Inside, the model's swiglu MLPs whose down_proj is a bfloat16 LoRA layer recompute
    their swiglu output in the backward pass (`_down_of_swiglu`); yields how many MLPs changed,
    and puts their class back on exit. Needs lora_in_compute_dtype around it."""
    mlps = [m for _, m in model.named_modules() if _is_swiglu_mlp(type(m))]
    classes = {cls: _recomputing_mlp_class(cls) for cls in {type(m) for m in mlps}}
    for mlp in mlps:
        mlp.__class__ = classes[type(mlp)]
    try:
        yield len(mlps)
    finally:
        for mlp in mlps:
            mlp.__class__ = mlp._lorapipe_plain


@contextmanager
def fast_training(model: Any) -> Iterator[None]:
    """The training step's rewrites that keep its maths: LoRA branch in bfloat16 through one
    accumulate product, swiglu keeping only its inputs, MLPs recomputing swiglu's output. They
    leave float32 models alone; on an x86-64 CPU, float32 models compute exp as a power of two
    (`cpu_exp`; first, so that the bfloat16 swiglu falls back to it)."""
    from lorapipe import cpu_exp

    with (
        cpu_exp.installed(),
        lora_in_compute_dtype(model),
        swiglu_keeping_inputs(),
        swiglu_mlps(model),
    ):
        yield


def squared_norm(grads: Any) -> Any:
    """Sum of the squares of every gradient entry, in float32 (as clip_grad_norm sums)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    total = mx.array(0.0, mx.float32)
    for _, g in tree_flatten(grads):
        total = total + g.astype(mx.float32).square().sum()
    return total


class ArrayByArray:
    """The trainable arrays as the model holds them, updated by mlx's optimizer array by array
    (as mlx-lm's trainer does). train_loop's step reads gradients through these methods."""

    def __init__(self, model: Any, optimizer: Any) -> None:
        self.model, self.optimizer = model, optimizer
        self.state: dict[str, Any] = {}  # arrays the compiled step changes, besides the model's

    def gradient(self, grads: Any) -> Any:
        return grads

    def add(self, a: Any, b: Any) -> Any:
        from mlx.utils import tree_map

        return tree_map(lambda x, y: x + y, a, b)

    def squared_norm(self, grad: Any) -> Any:
        return squared_norm(grad)

    def scale(self, grad: Any, factor: Any) -> Any:
        from mlx.utils import tree_map

        return tree_map(lambda g: (g * factor).astype(g.dtype), grad)

    def update(self, grad: Any) -> None:
        self.optimizer.update(self.model, grad)

    def parameters(self) -> dict[str, Any]:
        """The trainable arrays by name, as trained (what adapters and checkpoints hold)."""
        from mlx.utils import tree_flatten

        return dict(tree_flatten(self.model.trainable_parameters()))

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state by parameter name (what checkpoints hold)."""
        from mlx.utils import tree_flatten

        return dict(tree_flatten(self.optimizer.state))

    def close(self) -> None:
        """Leave the model holding its trainable arrays as trained."""


class OneVector(ArrayByArray):
    """Every trainable array as a slice of one float32 vector. A step concatenates the
    gradients once (one copy per array), then the clipping norm, the clip and the optimizer's
    update each run once over the whole vector instead of once per array: the same elementwise
    maths (Adam, AdamW, SGD) in a few kernels instead of ~5 per array. The model reads views
    into the vector (no copies) or, with `compute_dtype` (bfloat16 LoRA branches, see
    `bfloat16_branches`), views into one bfloat16 copy of it, made by one cast instead of two
    casts per array (forward, and the gradient back). Checkpoints see the optimizer's state
    under the names ArrayByArray gives it, so either layout resumes the other's."""

    def __init__(self, model: Any, optimizer: Any, compute_dtype: Any = None) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        super().__init__(model, optimizer)
        self.compute_dtype = compute_dtype
        named = tree_flatten(model.trainable_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [a.shape for _, a in named]
        ends = np.cumsum([a.size for _, a in named]).tolist()
        self.bounds = list(zip([0, *ends[:-1]], ends, strict=True))
        self.state = {"vector": mx.concatenate([a.reshape(-1) for _, a in named])}
        # The optimizer's state moves onto the vector too (a restored run's, by name).
        by_name = dict(tree_flatten(optimizer.state))
        kept = {k: v for k, v in optimizer.state.items() if isinstance(v, mx.array)}
        optimizer.state = kept  # step, learning rate
        optimizer.init({"vector": self.state["vector"]})
        for key in optimizer.state["vector"]:
            if all(f"{name}.{key}" in by_name for name in self.names):
                optimizer.state["vector"][key] = mx.concatenate(
                    [by_name[f"{name}.{key}"].reshape(-1) for name in self.names]
                )
        self._install(compute_dtype)

    @staticmethod
    def fits(model: Any, optimizer: Any) -> bool:
        """Whether one vector keeps the maths: an elementwise optimizer and float32 arrays."""
        import mlx.core as mx
        import mlx.optimizers as optim
        from mlx.utils import tree_flatten

        elementwise = isinstance(optimizer, (optim.Adam, optim.SGD))  # AdamW is an Adam
        arrays = tree_flatten(model.trainable_parameters())
        return elementwise and bool(arrays) and all(a.dtype == mx.float32 for _, a in arrays)

    def _split(self, vector: Any) -> list[tuple[str, Any]]:
        return [
            (name, vector[start:stop].reshape(shape))
            for name, shape, (start, stop) in zip(self.names, self.shapes, self.bounds, strict=True)
        ]

    def _install(self, dtype: Any) -> None:
        from mlx.utils import tree_unflatten

        vector = self.state["vector"]
        if dtype is not None:
            vector = vector.astype(dtype)
        self.model.update(tree_unflatten(self._split(vector)))

    def gradient(self, grads: Any) -> Any:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        by_name = dict(tree_flatten(grads))
        vector = mx.concatenate([by_name[name].reshape(-1) for name in self.names])
        return vector.astype(mx.float32)

    def add(self, a: Any, b: Any) -> Any:
        return a + b

    def squared_norm(self, grad: Any) -> Any:
        return grad.square().sum()

    def scale(self, grad: Any, factor: Any) -> Any:
        return grad * factor

    def update(self, grad: Any) -> None:
        vector = {"vector": self.state["vector"]}
        self.state["vector"] = self.optimizer.apply_gradients({"vector": grad}, vector)["vector"]
        self._install(self.compute_dtype)

    def parameters(self) -> dict[str, Any]:
        return dict(self._split(self.state["vector"]))

    def optimizer_state(self) -> dict[str, Any]:
        state = dict(self.optimizer.state)
        by_name = {k: v for k, v in state.items() if k != "vector"}
        for key, vector in state["vector"].items():
            for name, part in self._split(vector):
                by_name[f"{name}.{key}"] = part
        return by_name

    def close(self) -> None:
        self._install(None)


def bfloat16_branches(model: Any) -> bool:
    """Whether every trainable array is the A or B of a plain LoRA layer over a bfloat16 layer:
    the layers lora_in_compute_dtype runs in bfloat16, casting A and B on every call."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear

    branches = set()
    for name, module in model.named_modules():
        frozen = getattr(module, "linear", None)
        weight = getattr(frozen, "scales", getattr(frozen, "weight", None))
        if type(module) is LoRALinear and weight is not None and weight.dtype == mx.bfloat16:
            branches |= {f"{name}.lora_a", f"{name}.lora_b"}
    names = [name for name, _ in tree_flatten(model.trainable_parameters())]
    return bool(names) and set(names) <= branches


def trainable_layout(model: Any, optimizer: Any) -> ArrayByArray:
    """OneVector on a GPU where it keeps the maths, else ArrayByArray. On the CPU, where a
    kernel costs no launch, one vector is not faster."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu and OneVector.fits(model, optimizer):
        return OneVector(model, optimizer, mx.bfloat16 if bfloat16_branches(model) else None)
    return ArrayByArray(model, optimizer)


class _Key:
    """Holds a dropout layer's key: an object, not an array, so not one of its parameters."""

    value: Any = None


_KEYED_DROPOUT: list[type] = []


def _keyed_dropout() -> type:
    import mlx.core as mx
    import mlx.nn as nn

    if _KEYED_DROPOUT:
        return _KEYED_DROPOUT[0]

    class KeyedDropout(nn.Dropout):
        """nn.Dropout that draws its mask from the key its block hands it, not from MLX's
        global random state, so that a block that runs its forward pass again in the backward
        pass draws the same mask both times."""

        key: _Key

        def __call__(self, x: Any) -> Any:
            if self._p_1 == 1 or not self.training:
                return x
            mask = mx.random.bernoulli(self._p_1, x.shape, key=self.key.value)
            return (mask * x) * (1 / self._p_1)

    _KEYED_DROPOUT.append(KeyedDropout)
    return KeyedDropout


_BLOCKS: dict[tuple[type, bool], type] = {}


def _block(plain: type, recompute: bool) -> type:
    """`plain` as a block whose dropout layers draw from one key per call, taken from MLX's
    random state, and which, if `recompute`, keeps no activations for the backward pass
    (mlx-lm's grad_checkpoint, as a subclass)."""
    import mlx.core as mx

    if (plain, recompute) in _BLOCKS:
        return _BLOCKS[(plain, recompute)]
    keyed: Any = _keyed_dropout()

    class Block(plain):
        _lorapipe_plain = plain

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            dropouts = [
                m
                for _, m in self.named_modules()
                if isinstance(m, keyed) and m.training and m._p_1 < 1
            ]
            if not (recompute or dropouts):
                return plain.__call__(self, *args, **kwargs)

            def forward(params: Any, key: Any, *args: Any, **kwargs: Any) -> Any:
                if recompute:
                    self.update(params)
                if dropouts:
                    # stop_gradient: the backward pass asks for a gradient of every input
                    keys = mx.random.split(mx.stop_gradient(key), len(dropouts))
                    for layer, layer_key in zip(dropouts, keys, strict=True):
                        layer.key.value = layer_key
                return plain.__call__(self, *args, **kwargs)

            # A key (two 32-bit words) drawn from MLX's random state, as a draw would take one.
            key = (
                mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)
                if dropouts
                else mx.zeros((2,), mx.uint32)
            )
            run = mx.checkpoint(forward) if recompute else forward
            return run(self.trainable_parameters(), key, *args, **kwargs)

    _BLOCKS[(plain, recompute)] = Block
    return Block


def checkpoint_blocks(model: Any, count: int) -> int:
    """Make the first `count` blocks (-1: all) recompute their activations in the backward pass
    instead of keeping them from the forward pass, and the others keep theirs: the same maths
    in less memory, for one more forward pass of those blocks. mlx-lm's grad_checkpoint patches
    the block class, i.e. every block of every model of that class; this swaps the class of
    this model's blocks only. Dropout (lora.dropout) then draws each block's masks from a key
    passed into the block, in every block, so a recomputing block draws the same masks again
    and the run is the same whichever blocks recompute (a checkpoint resumes across a change).
    Returns how many blocks recompute."""
    import mlx.nn as nn

    keyed = _keyed_dropout()
    count = len(model.layers) if count == -1 else min(count, len(model.layers))
    for index, layer in enumerate(model.layers):
        for _, module in layer.named_modules():
            if type(module) is nn.Dropout:
                module.__class__, module.key = keyed, _Key()
        plain = getattr(type(layer), "_lorapipe_plain", type(layer))
        layer.__class__ = _block(plain, recompute=index < count)
    return count
