"""The training schedule is stated once (trainer.Schedule): the loop waits for the device
exactly after the steps that report, evaluate or save, and does that work there and only there."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lorapipe.trainer import Schedule
from tests.helpers import REPO


def test_a_step_syncs_exactly_when_work_follows_it() -> None:
    schedule = Schedule(total_steps=30, report_every=5, eval_every=7, save_every=4, accumulate=2)
    for step in range(1, 31):
        work = schedule.reports(step) or schedule.evaluates(step) or schedule.saves(step)
        assert schedule.syncs(step, stopping=False) == work, step
        assert schedule.syncs(step, stopping=True)
    assert [s for s in range(1, 31) if schedule.saves(s)] == [4, 8, 12, 16, 20, 24, 28]
    assert [s for s in range(1, 31) if schedule.evaluates(s)] == [7, 14, 21, 28, 30]
    assert schedule.reports(30) and not schedule.saves(30)  # the end: the loop saves anyway


def test_the_loop_reports_evaluates_and_saves_where_the_schedule_says(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load

    from lorapipe.batches import Example, make_batches
    from lorapipe.params import load_params
    from lorapipe.tracking import Recorder
    from lorapipe.trainer import TrainingRun, attach_adapters, train_loop

    params = load_params(REPO / "params.yaml")
    train = dataclasses.replace(
        params.train,
        iters=13,
        batch_size=2,
        grad_accumulation_steps=2,
        steps_per_report=5,
        steps_per_eval=4,
        save_every=3,  # only at update boundaries: 6 and 12
        val_batches=1,
        warmup_steps=0,
    )
    mx.random.seed(0)
    model = load(str(tiny_model_dir))[0]
    attach_adapters(model, params.lora)
    rng = np.random.default_rng(0)
    vocab = model.args.vocab_size
    examples = [Example(rng.integers(3, vocab, 17).tolist(), [0] + [1] * 16) for _ in range(6)]
    batches = make_batches(examples, 2)
    recorder = Recorder()
    run = TrainingRun.fresh(model, train, params.seed, batches, 13, tmp_path, recorder)
    saved: list[int] = []
    save = run.save
    run.save = lambda: (saved.append(run.state.step), save())[1]  # type: ignore[method-assign]
    state = train_loop(run)

    assert state.step == 13
    assert [r["step"] for r in recorder.records if "train_loss" in r] == [5, 10, 13]
    assert [r["step"] for r in recorder.records if "val_loss" in r] == [0, 4, 8, 12, 13]
    # Checkpoints at 6 and 12 (save_every 3, on update boundaries only), and at the end; the
    # newest two are kept.
    assert saved == [6, 12, 13]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000012", "step-0000013"]
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 13
    assert state.history == recorder.records
