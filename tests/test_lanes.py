"""Lanes (lorapipe.lanes): a step's rows split over CPU streams train as one lane does."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import REPO
from tests.test_train_step import lora_model


def masked_rows(count: int, seed: int) -> list[Any]:
    """Rows of different lengths whose first half is an unlearned prompt (so the step gathers
    learned positions, as with train.mask_prompt)."""
    from lorapipe.batches import Example

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        length = int(rng.integers(12, 40))
        prompt = length // 2
        rows.append(
            Example(rng.integers(3, 400, length).tolist(), [0] * prompt + [1] * (length - prompt))
        )
    return rows


def test_split_cuts_every_batch_into_consecutive_rows_with_their_own_learned_positions() -> None:
    from lorapipe.batches import make_batches

    batches = make_batches(masked_rows(21, 0), 5)
    lanes = batches.split(3)
    assert [len(lane) for lane in lanes] == [len(batches)] * 3
    for index in range(len(batches)):
        rows = [lane.tokens[index] for lane in lanes]
        assert [len(r) for r in rows] == [2, 2, 1]  # near-equal, none empty
        np.testing.assert_array_equal(np.concatenate(rows), batches.tokens[index])
        for lane in lanes:
            assert lane.real[index] == batches.real[index]  # tokens/s counts the whole batch
            learned = lane.targets[index][:, 1:].reshape(-1)
            positions = lane.positions[index]
            assert positions is not None
            assert set(positions.tolist()) - set(np.flatnonzero(learned).tolist()) <= {
                int(np.flatnonzero(learned == 0)[0])  # padding points at one unlearned position
            }
            assert learned[positions].sum() == learned.sum()
    with pytest.raises(ValueError, match="fewer rows than the 6 parts"):
        batches.split(6)


@pytest.mark.parametrize("lanes", [2, 3, 8])
def test_dataset_loss_on_lanes_is_the_loss_of_one_lane(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, lanes: int
) -> None:
    """Validation's and quantize's loss with each batch's rows over lanes: one lane's loss to
    float rounding, over all batches and over a spread sample; more lanes than a batch has rows
    run as many lanes as it has."""
    from lorapipe import lanes as lanes_module
    from lorapipe.batches import make_batches
    from lorapipe.loss import dataset_loss

    asked: list[int] = []
    streams = lanes_module.streams

    def recording(count: int) -> Any:
        asked.append(count)
        return streams(count)

    monkeypatch.setattr(lanes_module, "streams", recording)
    model = lora_model(tiny_model_dir, "float32")
    batches = make_batches(masked_rows(23, 2), 5)  # 4 batches of 5 rows
    for max_batches in (-1, 2):
        on_lanes = dataset_loss(model, batches, max_batches, lanes=lanes)
        assert on_lanes == pytest.approx(dataset_loss(model, batches, max_batches), rel=1e-6)
    assert set(asked) == {1, min(lanes, 5)}


@pytest.mark.parametrize(("layout", "lanes"), [("ArrayByArray", 2), ("OneVector", 3)])
def test_lanes_take_the_steps_of_one_lane(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str, lanes: int
) -> None:
    """Losses (the token-weighted mean over uneven lanes), validation losses and the adapter of
    a run on lanes equal one lane's to float rounding, with gradient accumulation."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from lorapipe import fast
    from lorapipe.batches import make_batches
    from lorapipe.params import load_params
    from lorapipe.tracking import Recorder
    from lorapipe.trainer import TrainingRun, train_loop

    monkeypatch.setattr(fast, "trainable_layout", getattr(fast, layout))
    train = dataclasses.replace(
        load_params(REPO / "params.yaml").train,
        steps_per_report=1,
        steps_per_eval=4,
        grad_accumulation_steps=2,
    )
    batches = make_batches(masked_rows(20, 1), 4)
    results = []
    for count in (1, lanes):
        model, reports = lora_model(tiny_model_dir, "float32"), Recorder()
        checkpoints = tmp_path / str(count)
        checkpoints.mkdir()
        run = TrainingRun.fresh(model, train, 0, batches, 8, checkpoints, reports, lanes=count)
        train_loop(run)
        losses = [(r["step"], r.get("train_loss", r.get("val_loss"))) for r in run.state.history]
        results.append((losses, dict(tree_flatten(model.trainable_parameters()))))
    (one_losses, one_adapter), (lane_losses, lane_adapter) = results
    assert [step for step, _ in lane_losses] == [step for step, _ in one_losses]
    assert [loss for _, loss in lane_losses] == pytest.approx(
        [loss for _, loss in one_losses], rel=1e-5
    )
    for name, value in one_adapter.items():
        assert mx.allclose(lane_adapter[name], value, rtol=1e-4, atol=1e-6).item(), name


def test_the_lane_count_follows_the_blas_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lorapipe import lanes, runtime

    runtime.setup()
    threads = runtime.blas_info().threads or 1
    monkeypatch.delenv(lanes.ENV_VAR, raising=False)
    assert lanes.count(8) == min(threads, 8)
    assert lanes.describe() == f"{threads} (one per BLAS thread; LORAPIPE_CPU_LANES=1: one stream)"
    assert lanes.count(1) == 1  # never more lanes than rows
    monkeypatch.setenv(lanes.ENV_VAR, "3")
    assert lanes.count(8) == 3
    assert lanes.describe() == "3 (set by LORAPIPE_CPU_LANES)"
    monkeypatch.delenv(lanes.BFS_WIDTH_VAR, raising=False)
    lanes.prepare(1)  # one lane: MLX's own eval order
    assert lanes.BFS_WIDTH_VAR not in os.environ
    lanes.prepare(2)
    assert os.environ[lanes.BFS_WIDTH_VAR] == lanes.WIDE
    monkeypatch.setenv(lanes.ENV_VAR, "0")
    with pytest.raises(lanes.LanesError, match="LORAPIPE_CPU_LANES='0': expected a whole number"):
        lanes.count(8)


def test_one_blas_thread_while_lanes_run_and_the_count_restored_after() -> None:
    from lorapipe import lanes, runtime

    runtime.setup()
    import mlx.core as mx

    mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))  # loads the BLAS
    before = runtime.blas_info().threads
    if before is None:
        pytest.skip("this BLAS does not tell its thread count")
    with lanes.blas_threads(1):
        assert runtime.blas_info().threads == 1
        with lanes.blas_threads(before):  # nested: restored to the enclosing count
            assert runtime.blas_info().threads == before
        assert runtime.blas_info().threads == 1
        with lanes.blas_threads(None):
            assert runtime.blas_info().threads == 1
    assert runtime.blas_info().threads == before
