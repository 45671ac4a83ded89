"""lorapipe.cpu_exp: exp as a power of two on the x86-64 CPU, against MLX's own functions."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import pytest

from tests.test_train_step import lora_model, loss_and_grads, relative_error

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="lorapipe.cpu_exp changes nothing off x86-64",
)

TOLERANCE = 2e-6  # float32 rounding: relative error of a whole array against MLX's


def close(ours: Any, theirs: Any) -> bool:
    return relative_error(ours, theirs) < TOLERANCE


def test_the_functions_give_mlx_s_values_and_gradients() -> None:
    import mlx.core as mx
    import mlx.nn as nn

    from lorapipe import cpu_exp

    mlx_swiglu = cpu_exp._originals()[0]
    mx.random.seed(0)
    x = 8 * mx.random.normal((6, 300))  # logits far apart: exp's whole range matters
    gate, up = mx.random.normal((6, 300)), mx.random.normal((6, 300))
    targets = mx.random.randint(0, 300, (6,))
    assert cpu_exp.applies(x)
    assert close(cpu_exp.exp(x), mx.exp(x))
    assert close(cpu_exp.logsumexp(x), mx.logsumexp(x, axis=-1))
    assert close(cpu_exp.logsumexp(x, keepdims=True), mx.logsumexp(x, axis=-1, keepdims=True))
    assert close(cpu_exp.swiglu(gate, up), mlx_swiglu(gate, up))

    def loss(ce: Any) -> Any:
        return lambda logits: ce(logits, targets).sum()

    ours = mx.grad(loss(cpu_exp.cross_entropy))(x)
    assert close(ours, mx.grad(loss(nn.losses.cross_entropy))(x))
    weights = mx.random.normal(gate.shape)
    for i in (0, 1):
        ours = mx.grad(lambda g, u: (cpu_exp.swiglu(g, u) * weights).sum(), argnums=i)(gate, up)
        theirs = mx.grad(lambda g, u: (mlx_swiglu(g, u) * weights).sum(), argnums=i)(gate, up)
        assert close(ours, theirs)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "length", "keys", "mask"),
    [
        (4, 4, 9, 9, "causal"),
        (6, 2, 9, 9, "causal"),  # grouped-query attention
        (6, 2, 1, 12, None),  # one decoding step over a 12-token cache
        (6, 2, 5, 12, "causal"),  # a prompt's tail after 7 cached tokens
        (6, 2, 5, 12, "bool"),  # padded rows: every key masked in row 0
        (6, 2, 5, 12, "additive"),
        (6, 2, 5, 12, "per-head"),  # a boolean mask of its own for each query head
    ],
)
def test_attention_is_mlx_s_with_each_kind_of_mask(
    heads: int, kv_heads: int, length: int, keys: int, mask: str | None
) -> None:
    import mlx.core as mx

    from lorapipe import cpu_exp

    mx.random.seed(1)
    q = mx.random.normal((2, heads, length, 16))
    k, v = mx.random.normal((2, kv_heads, keys, 16)), mx.random.normal((2, kv_heads, keys, 16))
    given: Any = mask
    if mask == "bool":
        given = mx.random.uniform(shape=(2, 1, length, keys)) > 0.3
        given[0] = False
    elif mask == "additive":
        given = mx.random.normal((2, 1, length, keys))
    elif mask == "per-head":
        given = mx.random.uniform(shape=(2, heads, length, keys)) > 0.3
    weights = mx.random.normal((2, heads, length, 16))

    def run(attention: Any) -> tuple[Any, Any]:
        def total(q: Any, k: Any, v: Any) -> Any:
            return (attention(q, k, v, None, scale=0.25, mask=given) * weights).sum()

        out = attention(q, k, v, None, scale=0.25, mask=given)
        return out, mx.grad(total, argnums=(0, 1, 2))(q, k, v)

    ours, our_grads = run(cpu_exp.attention)
    theirs, their_grads = run(cpu_exp._originals()[1])  # mlx-lm's: MLX's fused attention
    assert not mx.isnan(ours).any().item()
    assert close(ours, theirs)
    for g, h in zip(our_grads, their_grads, strict=True):
        assert close(g, h)


def test_only_float32_on_the_cpu_and_not_when_switched_off() -> None:
    import mlx.core as mx

    from lorapipe import cpu_exp

    x = mx.random.normal((4, 8))
    assert cpu_exp.applies(x)
    assert not cpu_exp.applies(x.astype(mx.bfloat16))
    with cpu_exp.mlx_exp():
        assert not cpu_exp.applies(x)
        assert mx.array_equal(cpu_exp.exp(x), mx.exp(x)).item()  # MLX's own, bit for bit
    assert cpu_exp.applies(x)
    half = x.astype(mx.float16)
    assert mx.array_equal(cpu_exp.logsumexp(half), mx.logsumexp(half, axis=-1)).item()


def test_mlx_lm_models_use_them_inside_and_get_their_own_back(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loaded models read swiglu and the attention from their module: inside installed() the
    tiny llama runs ours, with mlx-lm's logits and greedy choices; on exit mlx-lm's are back."""
    import sys

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models import llama

    from lorapipe import cpu_exp

    theirs = cpu_exp._originals()
    # mlx-lm's own in every module, whatever an earlier test's model loading installed
    for name, module in list(sys.modules.items()):
        for attribute, mine, original in zip(
            ("swiglu", "scaled_dot_product_attention"),
            (cpu_exp.swiglu, cpu_exp.attention),
            theirs,
            strict=True,
        ):
            if name.startswith("mlx_lm.models.") and getattr(module, attribute, None) is mine:
                monkeypatch.setattr(module, attribute, original)
    model, _ = load(str(tiny_model_dir))
    tokens = mx.random.randint(3, model.args.vocab_size, (3, 40))
    plain = model(tokens)
    with cpu_exp.installed() as changed:
        assert changed >= 4  # llama's two names and their source modules'
        assert (llama.swiglu, llama.scaled_dot_product_attention) == (
            cpu_exp.swiglu,
            cpu_exp.attention,
        )
        ours = model(tokens)
    assert (llama.swiglu, llama.scaled_dot_product_attention) == theirs
    assert close(ours, plain)
    assert mx.array_equal(ours.argmax(-1), plain.argmax(-1)).item()
    assert not mx.array_equal(ours, plain).item()  # ours did run: not the same bits


def test_a_float32_training_step_keeps_mlx_s_loss_and_gradients(tiny_model_dir: Path) -> None:
    from lorapipe import cpu_exp

    model = lora_model(tiny_model_dir, "float32")
    with cpu_exp.mlx_exp():
        plain_loss, plain = loss_and_grads(model, fast=False)
    fast_loss, fast = loss_and_grads(model, fast=True)
    assert abs(fast_loss - plain_loss) < 1e-5 * plain_loss
    assert fast.keys() == plain.keys()
    for name, g in fast.items():
        assert relative_error(g, plain[name]) < 1e-5, name


def test_doctor_says_which_exp_the_cpu_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorapipe import cpu_exp, runtime

    assert runtime.describe()["exp"].startswith("2^(x log2 e) in swiglu, attention and the loss")
    monkeypatch.setenv(cpu_exp.ENV_VAR, "mlx")
    with cpu_exp.mlx_exp():
        assert runtime.describe()["exp"] == "MLX's own (LORAPIPE_CPU_EXP=mlx)"


def test_the_environment_variable_keeps_mlx_s_exp_for_the_whole_process() -> None:
    import os
    import subprocess
    import sys

    check = "import mlx.core as m; from lorapipe import cpu_exp; print(cpu_exp.applies(m.ones(2)))"
    for setting, expected in (("mlx", "False"), ("", "True")):
        env = {**os.environ, "LORAPIPE_CPU_EXP": setting}
        out = subprocess.run(
            [sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected
