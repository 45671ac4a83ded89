"""lorapipe.cpu_lanes: decoding on several threads, each with its own MLX stream and a share of
the rows, gives what one thread gives; the BLAS runs one thread a lane and gets its count
back; a lane's error reaches the caller; a process that ran lanes exits cleanly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import pytest

from lorapipe import cpu_lanes
from lorapipe.decode import generate_batch


def test_lanes_decode_and_score_as_one_lane(tiny_model_dir: Path) -> None:
    """Eval's path (references scored, some confirmed, the rest decoded, some to EOS) on 1, 2
    and 3 lanes: the same texts, token counts, confirmations and losses."""
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.utils import load

    model, tokenizer = load(str(tiny_model_dir))[:2]
    text = "the quick brown fox jumps over the lazy dog " * 4
    prompts = [tokenizer.encode(text)[: 2 + 3 * i] for i in range(13)]
    budgets = [1 + (5 * i) % 9 for i in range(13)]
    probe = batch_generate(model, tokenizer, prompts, max_tokens=budgets, return_token_ids=True)
    greedy = probe.token_ids
    assert greedy is not None
    # An EOS that some rows reach; references: the greedy answer for even rows (confirmed by
    # the teacher-forced pass), a wrong one for odd rows (decoded).
    eos = Counter(t for ids in greedy for t in ids[1:]).most_common(1)[0][0]
    tokenizer.eos_token_ids = {eos}
    right = [g[: g.index(eos) + 1] if eos in g else g for g in greedy]
    references = [[r] if i % 2 == 0 else [[(t + 1) % 50 for t in r]] for i, r in enumerate(right)]

    one = generate_batch(model, tokenizer, prompts, budgets, 6, references, lanes=1)
    for lanes in (2, 3):
        got = generate_batch(model, tokenizer, prompts, budgets, 6, references, lanes=lanes)
        assert got.texts == one.texts
        assert (got.tokens, got.verified) == (one.tokens, one.verified)
        for mine, theirs in zip(got.losses, one.losses, strict=True):
            assert [n for _, n in mine] == [n for _, n in theirs]
            assert [x for x, _ in mine] == pytest.approx([x for x, _ in theirs], rel=1e-5)
    assert 0 < one.verified < len(prompts)
    assert any(len(r) < b for r, b in zip(right, budgets, strict=True))  # some stop at EOS
    mx.clear_cache()


def test_count_follows_the_setting_and_the_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx.core as mx

    from lorapipe import runtime

    monkeypatch.setenv(cpu_lanes.ENV_VAR, "3")
    assert cpu_lanes.count() == 3
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv(cpu_lanes.ENV_VAR, bad)
        with pytest.raises(cpu_lanes.LanesConfigError, match=f"LORAPIPE_CPU_LANES={bad}"):
            cpu_lanes.count()
    monkeypatch.delenv(cpu_lanes.ENV_VAR)
    if sys.platform == "linux" and mx.default_device() == mx.cpu:
        assert cpu_lanes.count() == (runtime.blas_info().threads or 1)
    else:
        assert cpu_lanes.count() == 1


def test_blas_runs_one_thread_a_lane_and_gets_its_count_back() -> None:
    from lorapipe import runtime

    before = runtime.blas_info().threads
    if before is None:
        pytest.skip("this BLAS does not say how many threads it runs")
    seen: list[int | None] = []

    def lane(_: int) -> None:
        seen.append(runtime.blas_info().threads)

    cpu_lanes.run(lane, [0, 1])
    assert seen == [1, 1]
    assert runtime.blas_info().threads == before


def test_an_error_in_one_lane_is_raised_after_every_lane_stopped() -> None:
    finished = threading.Event()

    def lane(index: int) -> int:
        if index == 0:
            raise ValueError("lane 0 failed")
        finished.wait(0.2)  # still running when lane 0 fails
        finished.set()
        return index

    with pytest.raises(ValueError, match="lane 0 failed"):
        cpu_lanes.run(lane, [0, 1])
    assert finished.is_set()
    assert cpu_lanes.run(lambda i: i * 10, [1, 2]) == [10, 20]  # the lanes still serve


def test_a_process_that_ran_lanes_exits_cleanly() -> None:
    """MLX keeps a compile cache per thread; a thread that ends holding one aborts the process
    at exit (MLX 0.32.4), which would fail a DVC stage after its outputs were written."""
    script = textwrap.dedent(
        """
        from lorapipe import runtime
        runtime.setup()
        import mlx.core as mx
        from lorapipe import cpu_lanes

        twice = mx.compile(lambda x: mx.exp(x) * 2)
        print(cpu_lanes.run(lambda n: twice(mx.ones((n, n))).sum().item(), [2, 3]))
        """
    )
    env = {**os.environ, cpu_lanes.ENV_VAR: "2"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == pytest.approx([2 * math.e * 4, 2 * math.e * 9], rel=1e-5)
