"""exp and what uses it on MLX's CPU backend: ns an element, MLX's own vs lorapipe.cpu_exp's.

    uv run python bench/exp.py            # ~20 s on 2 cores; bench/results/exp-cpu.json

Each function runs compiled (as in a training step) on 15.7M float32 numbers (10 x 512 x 1,536:
a 135M model's MLP activations for 512 tokens, ten times over), 2 warm-up runs, then the median
of 7. A multiply-add is the floor: what an elementwise pass costs when it is vectorized.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from lorapipe import runtime

ROOT = Path(__file__).resolve().parents[1]


def ns_per_element(fn: Any, *inputs: Any) -> float:
    import mlx.core as mx

    compiled = mx.compile(fn)
    for _ in range(2):
        mx.eval(compiled(*inputs))
    times = []
    for _ in range(7):
        tic = time.perf_counter()
        mx.eval(compiled(*inputs))
        times.append(time.perf_counter() - tic)
    return statistics.median(times) / inputs[0].size * 1e9


def main() -> None:
    blas = runtime.setup()
    import mlx.core as mx

    from lorapipe import cpu_exp

    mx.random.seed(0)
    x = 4 * mx.random.normal((10 * 512, 1536))
    other = mx.random.normal(x.shape)
    mlx_swiglu = cpu_exp._originals()[0]
    pairs = {  # name: (MLX's own, lorapipe.cpu_exp's)
        "exp": (mx.exp, cpu_exp.exp),
        "swiglu (silu(gate) * x)": (mlx_swiglu, cpu_exp.swiglu),
        "softmax over 1,536": (
            lambda v: mx.softmax(v, axis=-1, precise=True),
            cpu_exp._fast().softmax,
        ),
        "logsumexp over 1,536": (
            lambda v: mx.logsumexp(v, axis=-1),
            cpu_exp.logsumexp,
        ),
    }
    floor = ns_per_element(lambda v: v * 2 + 1, x)
    print(f"MLX {version('mlx')} on {mx.default_device()}, {platform.machine()}; BLAS {blas}")
    print(f"multiply-add (the floor): {floor:.2f} ns an element")
    print(f"{'function':<26}{'MLX ns/el':>10}{'ours ns/el':>12}{'speed-up':>10}")
    rows = {}
    for name, (theirs, ours) in pairs.items():
        inputs = (x, other) if name.startswith("swiglu") else (x,)
        with cpu_exp.mlx_exp():
            mlx_ns = ns_per_element(theirs, *inputs)
        our_ns = ns_per_element(ours, *inputs)
        rows[name] = {"mlx_ns": mlx_ns, "lorapipe_ns": our_ns, "speedup": mlx_ns / our_ns}
        print(f"{name:<26}{mlx_ns:>10.2f}{our_ns:>12.2f}{mlx_ns / our_ns:>9.2f}x")
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "device": str(mx.default_device()),
        "cpu_exp_applies": cpu_exp.applies(x),
        "versions": {p: version(p) for p in ("mlx", "mlx-lm")},
        "elements": x.size,
        "multiply_add_ns": floor,
        "functions": rows,
    }
    out = ROOT / "bench" / "results" / "exp-cpu.json"
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
