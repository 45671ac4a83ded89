"""The fast training step (lorapipe.fast and train_loop's pipelined loop) against the plain one."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO


def lora_model(tiny_model_dir: Path, dtype: str) -> Any:
    """The tiny model in `dtype` with rank-8 LoRA on every linear layer, B made non-zero so the
    low-rank branch changes the output (fresh adapters start at B = 0)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from lorapipe.params import load_params
    from lorapipe.trainer import attach_adapters

    model, _ = load(str(tiny_model_dir))
    model.set_dtype(getattr(mx, dtype))
    mx.random.seed(3)  # A's initial values, and B's below
    attach_adapters(model, load_params(REPO / "params.yaml").lora)
    for name, b in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            module = model
            for part in name.split(".")[:-1]:
                module = module[int(part)] if part.isdigit() else getattr(module, part)
            module.lora_b = 0.1 * mx.random.normal(b.shape)
    mx.eval(model.parameters())
    return model


def loss_and_grads(model: Any, fast: bool) -> tuple[float, dict[str, Any]]:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from lorapipe.fast import fast_training
    from lorapipe.loss import masked_loss

    mx.random.seed(5)
    tokens = mx.random.randint(3, model.args.vocab_size, (2, 33))
    targets = mx.ones((2, 33))

    def run() -> tuple[Any, Any]:
        (loss, _), grad = nn.value_and_grad(model, masked_loss)(model, tokens, targets)
        return loss, grad

    if fast:
        with fast_training(model):
            loss, grad = run()
    else:
        loss, grad = run()
    mx.eval(loss, grad)
    return float(loss.item()), dict(tree_flatten(grad))


def relative_error(a: Any, b: Any) -> float:
    import mlx.core as mx

    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return float((mx.linalg.norm(a - b) / mx.maximum(mx.linalg.norm(b), 1e-12)).item())


def test_bfloat16_branch_is_as_close_to_float32_as_the_plain_bfloat16_step(
    tiny_model_dir: Path,
) -> None:
    """ "The same loss to bf16 tolerance", measured: the float32 model is the reference, and the
    fast step may not stray from it noticeably more than the plain bfloat16 step does."""
    import mlx.core as mx

    reference_loss, reference = loss_and_grads(lora_model(tiny_model_dir, "float32"), fast=False)
    model = lora_model(tiny_model_dir, "bfloat16")
    plain_loss, plain = loss_and_grads(model, fast=False)
    fast_loss, fast = loss_and_grads(model, fast=True)

    assert abs(fast_loss - reference_loss) <= 2 * abs(plain_loss - reference_loss) + 1e-3
    assert fast.keys() == plain.keys() and len(fast) == 2 * 7 * 2  # A and B, 7 layers, 2 blocks
    for name, g in fast.items():
        assert g.dtype == mx.float32, name  # the optimizer still updates float32 masters
        plain_error = relative_error(plain[name], reference[name])
        assert relative_error(g, reference[name]) <= 2 * plain_error + 1e-3, name

    def overall(grads: dict[str, Any]) -> float:
        flat = [mx.concatenate([g.reshape(-1) for g in d.values()]) for d in (grads, reference)]
        return relative_error(*flat)

    assert 0.005 < overall(plain) < 0.05  # bfloat16's own error: the scale of "tolerance"
    assert overall(fast) <= 1.25 * overall(plain)
    # The branch did run in bfloat16: not the same numbers bit for bit.
    assert any(not mx.array_equal(g, plain[n]).item() for n, g in fast.items())


def test_float32_models_are_left_exactly_as_they_were(tiny_model_dir: Path) -> None:
    """But for the x86-64 CPU's exp (tests/test_cpu_exp.py), switched off here."""
    import mlx.core as mx

    from lorapipe.cpu_exp import mlx_exp

    model = lora_model(tiny_model_dir, "float32")
    with mlx_exp():
        plain_loss, plain = loss_and_grads(model, fast=False)
        fast_loss, fast = loss_and_grads(model, fast=True)
    assert fast_loss == plain_loss
    assert all(mx.array_equal(g, plain[n]).item() for n, g in fast.items())


def test_mlps_recomputing_swiglu_give_autodiff_s_gradients_and_are_put_back(
    tiny_model_dir: Path,
) -> None:
    """down_proj(swiglu(gate, up)) with a LoRA down_proj, its backward pass written by hand:
    in float32 the formula is autodiff's to rounding; on the bfloat16 model the forward pass is
    the same and the gradients as close to float32's as the plain bfloat16 step's."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from lorapipe.fast import (
        _down_of_swiglu,
        lora_in_compute_dtype,
        swiglu_keeping_inputs,
        swiglu_mlps,
    )
    from lorapipe.loss import masked_loss

    mx.random.seed(4)
    gate, up = (2 * mx.random.normal((2, 8, 48)) for _ in range(2))
    weight, a, b = mx.random.normal((16, 48)), mx.random.normal((48, 4)), mx.random.normal((4, 16))
    mix = mx.random.normal((2, 8, 16))

    def plain(g: Any, u: Any, w: Any, a_: Any, b_: Any) -> Any:
        h = nn.silu(g) * u
        return ((h @ w.T + 2.0 * (h @ a_) @ b_) * mix).sum()

    def ours(g: Any, u: Any, w: Any, a_: Any, b_: Any) -> Any:
        return (_down_of_swiglu(2.0)(g, u, w, a_, b_) * mix).sum()

    arguments = (gate, up, weight, a, b)
    expected = mx.grad(plain, argnums=(0, 1, 3, 4))(*arguments)
    got = mx.grad(ours, argnums=(0, 1, 3, 4))(*arguments)
    assert all(relative_error(x, y) < 1e-5 for x, y in zip(got, expected, strict=True))

    _, reference = loss_and_grads(lora_model(tiny_model_dir, "float32"), fast=False)
    model = lora_model(tiny_model_dir, "bfloat16")
    mx.random.seed(5)
    tokens = mx.random.randint(3, model.args.vocab_size, (2, 33))

    def step(recompute: bool) -> tuple[float, dict[str, Any]]:
        loss_and_grad = nn.value_and_grad(model, masked_loss)
        with lora_in_compute_dtype(model), swiglu_keeping_inputs():
            if not recompute:
                (loss, _), grad = loss_and_grad(model, tokens, mx.ones((2, 33)))
            else:
                plain_classes = {type(m) for _, m in model.named_modules()}
                with swiglu_mlps(model) as changed:
                    assert changed == 2  # the tiny llama's two blocks
                    (loss, _), grad = loss_and_grad(model, tokens, mx.ones((2, 33)))
                assert {type(m) for _, m in model.named_modules()} == plain_classes
        mx.eval(loss, grad)
        return float(loss.item()), dict(tree_flatten(grad))

    plain_loss, plain_grads = step(recompute=False)
    fast_loss, fast_grads = step(recompute=True)
    assert fast_loss == plain_loss
    for name, g in fast_grads.items():
        plain_error = relative_error(plain_grads[name], reference[name])
        assert relative_error(g, reference[name]) <= 2 * plain_error + 1e-3, name
    # the rewrite did run: down_proj's A gradients are not the plain step's bit for bit
    downs = [n for n in fast_grads if "down_proj.lora_a" in n]
    assert any(not mx.array_equal(fast_grads[n], plain_grads[n]).item() for n in downs)


def wide_llama_peak(rewrites: str) -> tuple[int, int]:
    """A compiled bfloat16 step's peak bytes on a llama whose MLPs are wide, with `rewrites`
    ("none": mlx-lm's swiglu; "swiglu": swiglu_keeping_inputs; "mlp": that and swiglu_mlps),
    and the bytes of one [tokens x hidden] array per block."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.llama import Model, ModelArgs

    from lorapipe.fast import lora_in_compute_dtype, swiglu_keeping_inputs, swiglu_mlps
    from lorapipe.loss import masked_loss
    from lorapipe.params import load_params
    from lorapipe.trainer import attach_adapters

    blocks, hidden, tokens = 4, 2048, (2, 129)
    mx.random.seed(0)
    model = Model(
        ModelArgs(
            model_type="llama",
            hidden_size=128,
            num_hidden_layers=blocks,
            intermediate_size=hidden,
            num_attention_heads=4,
            num_key_value_heads=4,
            rms_norm_eps=1e-5,
            vocab_size=512,
        )
    )
    model.set_dtype(mx.bfloat16)
    attach_adapters(model, load_params(REPO / "params.yaml").lora)
    mx.eval(model.parameters())
    batch = mx.random.randint(1, 512, tokens)
    with (
        lora_in_compute_dtype(model),
        swiglu_keeping_inputs() if rewrites != "none" else contextlib.nullcontext(),
        swiglu_mlps(model) if rewrites == "mlp" else contextlib.nullcontext(),
    ):
        loss_and_grad = nn.value_and_grad(model, masked_loss)
        step = mx.compile(lambda x, y: loss_and_grad(model, x, y))
        mx.eval(step(batch, mx.ones(tokens)))  # compiles
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(step(batch, mx.ones(tokens)))
        peak = mx.get_peak_memory()
    return peak, blocks * tokens[0] * (tokens[1] - 1) * hidden * 2


def test_compiled_steps_keep_no_array_the_rewrites_recompute() -> None:
    """What the swiglu rewrites are for: a compiled bfloat16 step keeps about one
    [tokens x hidden] array a block less with each (the sigmoid, then the swiglu output).
    Without `mx.depends` in their backward passes, compilation merged each recomputation with
    the forward pass's identical one and kept the array after all."""
    autodiff, per_block = wide_llama_peak("none")
    by_hand, _ = wide_llama_peak("swiglu")
    recomputing, _ = wide_llama_peak("mlp")
    assert autodiff - by_hand >= 0.75 * per_block
    assert by_hand - recomputing >= 0.75 * per_block


def test_the_layers_are_restored_and_the_adapter_stays_plain_mlx_lm(tiny_model_dir: Path) -> None:
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear

    from lorapipe.fast import lora_in_compute_dtype

    model = lora_model(tiny_model_dir, "bfloat16")
    names = [n for n, _ in tree_flatten(model.trainable_parameters())]
    with lora_in_compute_dtype(model) as changed:
        assert changed == 14
        inside = [type(m) for _, m in model.named_modules() if isinstance(m, LoRALinear)]
        assert len(inside) == 14 and all(t is not LoRALinear for t in inside)
        assert [n for n, _ in tree_flatten(model.trainable_parameters())] == names
    assert all(type(m) is LoRALinear for _, m in model.named_modules() if isinstance(m, LoRALinear))
    with pytest.raises(RuntimeError), lora_in_compute_dtype(model):
        raise RuntimeError("a failing step")
    assert all(type(m) is LoRALinear for _, m in model.named_modules() if isinstance(m, LoRALinear))


def test_swiglu_by_hand_gives_autodiff_s_gradients_and_is_put_back() -> None:
    import mlx.core as mx
    from mlx_lm.models import activations, llama

    from lorapipe.fast import swiglu_by_hand, swiglu_keeping_inputs

    mx.random.seed(2)
    gate, x = (4 * mx.random.normal((64, 96)) for _ in range(2))
    weights = mx.random.normal((64, 96))

    def grads(dtype: Any) -> tuple[Any, Any, Any]:
        def f(g: Any, u: Any) -> Any:
            return (llama.swiglu(g, u).astype(mx.float32) * weights).sum()

        value, (dg, du) = mx.value_and_grad(f, argnums=(0, 1))(gate.astype(dtype), x.astype(dtype))
        return value, dg.astype(mx.float32), du.astype(mx.float32)

    reference = grads(mx.float32)
    plain = grads(mx.bfloat16)
    # The formula itself, in float32: autodiff's gradients up to float32 rounding.
    by_hand = swiglu_by_hand()
    _, exact = mx.value_and_grad(lambda g, u: (by_hand(g, u) * weights).sum(), argnums=(0, 1))(
        gate, x
    )
    assert all(relative_error(a, b) < 1e-6 for a, b in zip(exact, reference[1:], strict=True))
    with swiglu_keeping_inputs() as changed:
        assert changed >= 1 and llama.swiglu is not activations.swiglu
        assert all(mx.array_equal(a, b).item() for a, b in zip(grads(mx.float32), reference))
        ours = grads(mx.bfloat16)
    assert llama.swiglu is activations.swiglu
    assert ours[0].item() == plain[0].item()  # the forward pass is the same sequence of ops
    for i in (1, 2):
        assert relative_error(ours[i], reference[i]) <= 2 * relative_error(plain[i], reference[i])


def test_one_norm_pass_clips_like_mlx_and_catches_any_non_finite_entry() -> None:
    import mlx.core as mx
    import mlx.optimizers as optim

    from lorapipe.fast import ArrayByArray, squared_norm

    mx.random.seed(1)
    grads = {"a": [mx.random.normal((4, 8)) * 3, mx.random.normal((8,))], "b": mx.ones((5, 2))}
    norm_sq = squared_norm(grads)
    expected, expected_norm = optim.clip_grad_norm(grads, 1.0)
    assert abs(mx.sqrt(norm_sq).item() - expected_norm.item()) < 1e-5 * expected_norm.item()
    factor = mx.minimum(1.0 / (mx.sqrt(norm_sq) + 1e-6), 1.0)  # train_loop's clip
    clipped = ArrayByArray(None, None).scale(grads, factor)
    assert mx.allclose(clipped["a"][0], expected["a"][0], rtol=1e-5).item()
    assert mx.allclose(clipped["b"], expected["b"], rtol=1e-5).item()
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = {**grads, "b": grads["b"].at[2, 1].add(bad)}
        assert not mx.isfinite(squared_norm(poisoned)).item(), bad


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
def test_one_vector_updates_like_mlx_array_by_array_and_saves_state_by_name(
    tiny_model_dir: Path, optimizer_name: str
) -> None:
    """fast.OneVector: the same updates as mlx's optimizer array by array, the model's arrays
    views of the vector, and the optimizer's state under the names ArrayByArray gives it (so
    checkpoints are the same and either layout resumes the other's)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from lorapipe.fast import ArrayByArray, OneVector
    from lorapipe.params import load_params
    from lorapipe.trainer import make_optimizer

    train = dataclasses.replace(load_params(REPO / "params.yaml").train, optimizer=optimizer_name)
    models = [lora_model(tiny_model_dir, "float32") for _ in range(2)]
    optimizers = [make_optimizer(train, 10) for _ in range(2)]
    assert OneVector.fits(models[0], optimizers[0])
    vector = OneVector(models[0], optimizers[0])
    arrays = ArrayByArray(models[1], optimizers[1])
    mx.random.seed(2)
    for _ in range(3):
        grads = tree_map(lambda a: mx.random.normal(a.shape), models[1].trainable_parameters())
        vector.update(vector.gradient(grads))
        arrays.update(grads)
    ours, theirs = (dict(tree_flatten(m.trainable_parameters())) for m in models)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert mx.allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7).item(), name
    state, expected = vector.optimizer_state(), arrays.optimizer_state()
    assert state.keys() == expected.keys()
    for name in expected:
        assert mx.allclose(state[name], expected[name], rtol=1e-6, atol=1e-7).item(), name

    # A run restored by name (as checkpoints.restore does) continues on one vector where it was.
    resumed = lora_model(tiny_model_dir, "float32")
    resumed.update(models[1].trainable_parameters())
    optimizer = make_optimizer(train, 10)
    optimizer.init(resumed.trainable_parameters())
    optimizer.state = dict(optimizers[1].state)
    layout = OneVector(resumed, optimizer)
    grads = tree_map(lambda a: mx.random.normal(a.shape), resumed.trainable_parameters())
    layout.update(layout.gradient(grads))
    arrays.update(grads)
    after = dict(tree_flatten(resumed.trainable_parameters()))
    for name, value in tree_flatten(models[1].trainable_parameters()):
        assert mx.allclose(after[name], value, rtol=1e-6, atol=1e-7).item(), name


def test_bfloat16_views_of_one_vector_take_the_steps_of_per_array_casts(
    tiny_model_dir: Path,
) -> None:
    """On a bfloat16 model the LoRA branch runs in bfloat16 either way: OneVector hands the
    layers bfloat16 views of one cast of the vector, ArrayByArray lets each layer cast its A
    and B. The steps must be the same, and the model must hold float32 arrays afterwards."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from lorapipe.fast import ArrayByArray, OneVector, bfloat16_branches, fast_training
    from lorapipe.loss import masked_loss
    from lorapipe.params import load_params
    from lorapipe.trainer import make_optimizer

    train = load_params(REPO / "params.yaml").train
    models = [lora_model(tiny_model_dir, "bfloat16") for _ in range(2)]
    assert bfloat16_branches(models[0])
    assert not bfloat16_branches(lora_model(tiny_model_dir, "float32"))
    vector = OneVector(models[0], make_optimizer(train, 10), mx.bfloat16)
    arrays = ArrayByArray(models[1], make_optimizer(train, 10))
    assert {a.dtype for _, a in tree_flatten(models[0].trainable_parameters())} == {mx.bfloat16}
    mx.random.seed(5)
    tokens = mx.random.randint(3, models[0].args.vocab_size, (2, 33))
    for _ in range(3):
        for model, layout in ((models[0], vector), (models[1], arrays)):
            with fast_training(model):
                (_, _), grad = nn.value_and_grad(model, masked_loss)(
                    model, tokens, mx.ones((2, 33))
                )
                layout.update(layout.gradient(grad))
            mx.eval(model.parameters(), layout.state)
    theirs = arrays.parameters()
    vector.close()
    ours = dict(tree_flatten(models[0].trainable_parameters()))
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].dtype == mx.float32
        assert mx.allclose(ours[name], value, rtol=1e-6, atol=1e-8).item(), name


def test_adafactor_and_bfloat16_arrays_stay_array_by_array(tiny_model_dir: Path) -> None:
    from lorapipe.fast import OneVector
    from lorapipe.params import load_params
    from lorapipe.trainer import make_optimizer

    train = load_params(REPO / "params.yaml").train
    adafactor = make_optimizer(dataclasses.replace(train, optimizer="adafactor"), 10)
    assert not OneVector.fits(lora_model(tiny_model_dir, "float32"), adafactor)
    full = lora_model(tiny_model_dir, "bfloat16")
    full.unfreeze()  # bfloat16 arrays train too: a float32 vector would change their updates
    assert not OneVector.fits(full, make_optimizer(train, 10))


@pytest.mark.parametrize("layout", ["ArrayByArray", "OneVector"])
def test_the_pipelined_loop_takes_the_same_steps_as_a_plain_loop(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """train_loop queues step i+1 before reading step i; the losses and the adapters must be
    those of a loop that waits for every step (mlx-lm's trainer's shape, written out), with
    either layout of the trainable arrays (the CPU runs ArrayByArray, a GPU OneVector)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten

    from lorapipe.batches import Example, batch_order, make_batches
    from lorapipe.loss import masked_loss
    from lorapipe.params import load_params
    from lorapipe.tracking import Recorder
    from lorapipe.trainer import TrainingRun, make_optimizer, train_loop

    steps = 12
    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(
        params,
        train=dataclasses.replace(
            params.train,
            iters=steps,
            batch_size=2,
            steps_per_report=1,  # every step's loss is reported
            steps_per_eval=steps,
            save_every=steps,
            val_batches=1,
            warmup_steps=2,
        ),
    )
    from lorapipe import fast

    monkeypatch.setattr(fast, "trainable_layout", getattr(fast, layout))
    model = lora_model(tiny_model_dir, "float32")
    rng = np.random.default_rng(0)
    vocab = model.args.vocab_size
    examples = [Example(rng.integers(3, vocab, 33).tolist(), [0] + [1] * 32) for _ in range(8)]
    batches = make_batches(examples, 2)
    reports = Recorder()
    train_loop(
        TrainingRun.fresh(model, params.train, params.seed, batches, steps, tmp_path, reports)
    )
    losses = [r["train_loss"] for r in reports.train_records()]

    reference = lora_model(tiny_model_dir, "float32")  # the same weights and adapters
    ref_optimizer = make_optimizer(params.train, steps)
    loss_and_grad = nn.value_and_grad(reference, masked_loss)
    expected = []
    for step in range(steps):
        epoch, position = divmod(step, len(batches))
        i = int(batch_order(params.seed, epoch, len(batches))[position])
        (loss, _), grad = loss_and_grad(
            reference, mx.array(batches.tokens[i]), mx.array(batches.targets[i])
        )
        grad, _ = optim.clip_grad_norm(grad, params.train.max_grad_norm)
        ref_optimizer.update(reference, grad)
        mx.eval(reference.parameters(), ref_optimizer.state, loss)
        expected.append(loss.item())

    assert losses == pytest.approx(expected, rel=1e-4)
    trained = dict(tree_flatten(model.trainable_parameters()))
    for name, value in tree_flatten(reference.trainable_parameters()):
        assert mx.allclose(trained[name], value, rtol=1e-3, atol=1e-5).item(), name


def test_checkpointed_blocks_give_the_same_loss_and_gradients(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.grad_checkpoint: N blocks recompute their activations (their forward pass runs
    again in the backward pass); the maths is the same, dropout's masks included (the second
    pass must draw the ones the first drew), and another model of the same class is left alone
    (mlx-lm's grad_checkpoint patches the class)."""
    import mlx.core as mx
    import mlx.nn as nn

    from lorapipe.fast import checkpoint_blocks

    def with_dropout(model: Any) -> Any:
        for _, module in model.named_modules():
            if hasattr(module, "dropout"):
                module.dropout = nn.Dropout(0.5)
        return model

    plain = lora_model(tiny_model_dir, "float32")
    block = type(plain.layers[0])
    model = with_dropout(lora_model(tiny_model_dir, "float32"))
    keeping = with_dropout(lora_model(tiny_model_dir, "float32"))
    assert checkpoint_blocks(keeping, 0) == 0
    keeping_loss, keeping_grads = loss_and_grads(keeping, fast=False)
    assert checkpoint_blocks(model, 1) == 1
    assert type(model.layers[0]) is not type(model.layers[1]) is type(keeping.layers[1])
    assert type(plain.layers[0]) is block  # the class itself is untouched

    calls: list[Any] = []
    forward = block.__call__

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(block, "__call__", counted)
    loss, grads = loss_and_grads(model, fast=False)
    runs = [sum(c is layer for c in calls) for layer in model.layers]
    assert runs == [2] + [1] * (len(model.layers) - 1)  # block 0 ran again in the backward
    assert loss == pytest.approx(keeping_loss, rel=1e-6)
    for name, value in keeping_grads.items():
        assert mx.allclose(grads[name], value, rtol=1e-5, atol=1e-7).item(), name
    # Dropout did drop: without it the loss is another.
    plain_loss, _ = loss_and_grads(plain, fast=False)
    assert abs(plain_loss - loss) > 1e-3
    assert checkpoint_blocks(model, -1) == len(model.layers)
    assert checkpoint_blocks(model, 0) == 0
    assert len({type(layer) for layer in model.layers}) == 1


def deep_lora_model() -> Any:
    """A llama of 8 narrow blocks with LoRA, random weights: its activations, not its weights,
    fill a step's memory, as in a real model at a long sequence length."""
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs

    from lorapipe.params import load_params
    from lorapipe.trainer import attach_adapters

    mx.random.seed(0)
    shape = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 8}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
    model = Model(ModelArgs(model_type="llama", rms_norm_eps=1e-5, **shape, **heads))
    attach_adapters(model, load_params(REPO / "params.yaml").lora)
    return model


def test_auto_checkpointing_recomputes_the_fewest_blocks_that_fit_the_limit(
    tmp_path: Path,
) -> None:
    """train.grad_checkpoint: auto with train.memory_limit_gb: the fewest recomputing blocks
    whose training step fits; a limit nothing fits in fails before training with what to
    change."""
    import numpy as np

    from lorapipe.batches import Example, make_batches
    from lorapipe.fast import checkpoint_blocks
    from lorapipe.memory import OutOfMemory, fit_memory, trial_peak
    from lorapipe.params import load_params
    from lorapipe.tracking import Recorder
    from lorapipe.trainer import TrainingRun

    model = deep_lora_model()
    rng = np.random.default_rng(0)
    rows = [Example(rng.integers(1, 512, 257).tolist(), [0] + [1] * 256) for _ in range(8)]
    batches = make_batches(rows, 4)
    train = load_params(REPO / "params.yaml").train
    assert train.grad_checkpoint == "auto"
    run = TrainingRun.fresh(model, train, 0, batches, 10, tmp_path, Recorder())
    needs = []
    for blocks in range(len(model.layers)):
        checkpoint_blocks(model, blocks)
        run.recompile()
        needs.append(trial_peak(run, 0, None))
    assert needs[0] > 2 * needs[-1], needs  # recomputing is what makes a step smaller here

    fit = fit_memory(run)  # no limit: free RAM
    assert fit.blocks == 0 and fit.source == "free RAM"
    limit_gb = (needs[3] + needs[4]) / 2 / 1e9  # 4 blocks fit, 3 do not
    run.train = dataclasses.replace(train, memory_limit_gb=limit_gb)
    fit = fit_memory(run)
    assert fit.blocks == 4 and fit.need <= limit_gb * 1e9
    assert fit.source == "train.memory_limit_gb"
    recomputing = [type(layer) is not type(model.layers[-1]) for layer in model.layers]
    assert recomputing == [True] * 4 + [False] * 4

    # A number of blocks is taken as it is, and checked.
    run.train = dataclasses.replace(train, memory_limit_gb=limit_gb, grad_checkpoint=2)
    with pytest.raises(
        OutOfMemory,
        match="with 2 of 8 blocks recomputing needs about .* GB, more than the .* GB of "
        "train.memory_limit_gb; set train.grad_checkpoint: auto",
    ):
        fit_memory(run)
    run.train = dataclasses.replace(train, memory_limit_gb=needs[-1] / 4 / 1e9)
    with pytest.raises(
        OutOfMemory,
        match=r"\(4x257 tokens\) with 8 of 8 blocks recomputing .*"
        "lower train.batch_size .*, or raise it if the machine has more",
    ):
        fit_memory(run)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_memory_trials_leave_training_as_it_would_have_been(
    tmp_path: Path, accumulate: int
) -> None:
    """The trials run training's own steps, update included, and undo them: a run fitted
    first trains exactly as one that was not (losses, adapter, optimizer state)."""
    import mlx.core as mx
    import numpy as np

    from lorapipe.batches import Example, make_batches
    from lorapipe.memory import fit_memory
    from lorapipe.params import load_params
    from lorapipe.tracking import Recorder
    from lorapipe.trainer import TrainingRun, train_loop

    rng = np.random.default_rng(1)
    rows = [Example(rng.integers(1, 512, 33).tolist(), [0] + [1] * 32) for _ in range(8)]
    batches = make_batches(rows, 2)
    train = load_params(REPO / "params.yaml").train
    train = dataclasses.replace(train, grad_accumulation_steps=accumulate, steps_per_eval=4)
    runs = []
    for fitted in (True, False):
        model, checkpoints = deep_lora_model(), tmp_path / str(fitted)
        checkpoints.mkdir()
        run = TrainingRun.fresh(model, train, 0, batches, 4, checkpoints, Recorder())
        if fitted:
            fit_memory(run)
        train_loop(run)
        runs.append(run)
    (fitted_run, plain_run) = runs
    timing = {"tokens_per_second", "peak_memory_gb"}
    fitted, plain = (
        [{k: v for k, v in record.items() if k not in timing} for record in r.state.history]
        for r in runs
    )
    assert fitted == plain and len(plain) >= 3
    for name, array in plain_run.layout.parameters().items():
        assert mx.array_equal(fitted_run.layout.parameters()[name], array).item(), name
    fitted_state, plain_state = (r.layout.optimizer_state() for r in runs)
    assert fitted_state.keys() == plain_state.keys()
    assert all(mx.array_equal(fitted_state[k], plain_state[k]).item() for k in plain_state)
