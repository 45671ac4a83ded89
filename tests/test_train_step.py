"""The fast training step (lorapipe.fast and train_loop's pipelined loop) against the plain one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO


def lora_model(tiny_model_dir: Path, dtype: str) -> Any:
    """The tiny model in `dtype` with rank-8 LoRA on every linear layer, B made non-zero so the
    low-rank branch changes the output (fresh adapters start at B = 0)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from lorapipe.params import load_params
    from lorapipe.stages.train import attach_adapters

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
    from lorapipe.stages.train import masked_loss

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
    import mlx.core as mx

    model = lora_model(tiny_model_dir, "float32")
    plain_loss, plain = loss_and_grads(model, fast=False)
    fast_loss, fast = loss_and_grads(model, fast=True)
    assert fast_loss == plain_loss
    assert all(mx.array_equal(g, plain[n]).item() for n, g in fast.items())


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

    from lorapipe.fast import clip_by_norm, squared_norm

    mx.random.seed(1)
    grads = {"a": [mx.random.normal((4, 8)) * 3, mx.random.normal((8,))], "b": mx.ones((5, 2))}
    norm_sq = squared_norm(grads)
    expected, expected_norm = optim.clip_grad_norm(grads, 1.0)
    assert abs(mx.sqrt(norm_sq).item() - expected_norm.item()) < 1e-5 * expected_norm.item()
    clipped = clip_by_norm(grads, mx.sqrt(norm_sq), 1.0)
    assert mx.allclose(clipped["a"][0], expected["a"][0], rtol=1e-5).item()
    assert mx.allclose(clipped["b"], expected["b"], rtol=1e-5).item()
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = {**grads, "b": grads["b"].at[2, 1].add(bad)}
        assert not mx.isfinite(squared_norm(poisoned)).item(), bad


class Reports:
    """The tracker interface train_loop reports to, keeping the records."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def report(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def say(self, line: str) -> None:
        pass


def test_the_pipelined_loop_takes_the_same_steps_as_a_plain_loop(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """train_loop queues step i+1 before reading step i; the losses and the adapters must be
    those of a loop that waits for every step (mlx-lm's trainer's shape, written out)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten

    from lorapipe.params import load_params
    from lorapipe.stages.train import (
        Example,
        LoopState,
        batch_order,
        make_batches,
        make_optimizer,
        masked_loss,
        train_loop,
    )

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
    model = lora_model(tiny_model_dir, "float32")
    rng = np.random.default_rng(0)
    vocab = model.args.vocab_size
    examples = [Example(rng.integers(3, vocab, 33).tolist(), [0] + [1] * 32) for _ in range(8)]
    batches = make_batches(examples, 2)
    reports = Reports()
    optimizer = make_optimizer(params.train, steps)
    train_loop(
        model, optimizer, batches, batches, params, steps, LoopState(), tmp_path, "fp", reports
    )
    losses = [r["train_loss"] for r in reports.records if "train_loss" in r]

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
