"""The training recipe: adapters on a model, the optimizer and its schedule, and the loop.

`TrainingRun` holds one run's state (model, optimizer, the layout of the trainable arrays, the
batches, the schedule, checkpoints, fingerprint and tracker) and `train_loop` reads as the
recipe: set up, then step; after a step that the `Schedule` marks, wait for the device and
report, evaluate, save. Every other step is queued on the device before the previous one is
read, so the host prepares step i+1 while the device runs step i (no round trip per step).
"""

from __future__ import annotations

import hashlib
import math
import signal
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from functools import partial, reduce
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from lorapipe.batches import Batches, batch_order
from lorapipe.checkpoints import WINDOW, LoopState, save_best, save_checkpoint
from lorapipe.errors import LorapipeError
from lorapipe.lanes import blas_threads, streams
from lorapipe.loss import dataset_loss, masked_loss
from lorapipe.memory import memory_limit
from lorapipe.params import LoraParams, TrainParams

# average_gradients' group size: larger than any gradient, so one collective a step.
ONE_COLLECTIVE = 1 << 60


class TrainError(LorapipeError):
    """Training cannot start or cannot go on."""


class Interrupted(LorapipeError):
    """Ctrl-C or SIGTERM: a checkpoint was saved; re-running the stage resumes."""


class Reporter(Protocol):
    """Where the loop's progress goes: DVCLive and the log (tracking.Tracker), or a Recorder."""

    def report(self, record: dict[str, Any]) -> None: ...

    def say(self, line: str) -> None: ...


# --- the model and the optimizer -----------------------------------------------------------------


def adapter_config(lora: LoraParams, num_layers: int) -> dict[str, Any]:
    """mlx-lm's adapter_config.json: what `mlx_lm.load(..., adapter_path=...)` needs."""
    return {
        "fine_tune_type": lora.fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": lora.rank,
            "scale": lora.scale,
            "dropout": lora.dropout,
            **({"keys": list(lora.keys)} if lora.keys else {}),
        },
    }


def attach_adapters(model: Any, lora: LoraParams) -> int:
    """Freeze the base and add trainable adapters (or unfreeze blocks); return the block count."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    blocks = len(model.layers)
    num_layers = blocks if lora.num_layers == -1 else lora.num_layers
    if num_layers > blocks:
        raise TrainError(f"lora.num_layers: {num_layers} but the model has {blocks} blocks")
    model.freeze()
    if lora.fine_tune_type == "full":
        for layer in model.layers[-num_layers:]:
            layer.unfreeze()
    else:
        config = adapter_config(lora, num_layers)["lora_parameters"]
        linear_to_lora_layers(model, num_layers, config, use_dora=lora.fine_tune_type == "dora")
    return num_layers


def make_optimizer(train: TrainParams, total_steps: int) -> Any:
    """The optimizer with its learning-rate schedule (warm-up, then constant, cosine or linear)."""
    import mlx.optimizers as optim

    updates = max(total_steps // train.grad_accumulation_steps, 1)
    peak, floor = train.learning_rate, train.learning_rate * train.min_lr_ratio
    decay_steps = max(updates - train.warmup_steps, 1)
    schedule: Any
    if train.lr_schedule == "cosine":
        schedule = optim.cosine_decay(peak, decay_steps, floor)
    elif train.lr_schedule == "linear":
        schedule = optim.linear_schedule(peak, floor, decay_steps)
    else:
        schedule = peak
    if train.warmup_steps:
        warmup = optim.linear_schedule(0.0, peak, train.warmup_steps)
        rest = schedule if callable(schedule) else (lambda _: peak)
        schedule = optim.join_schedules([warmup, rest], [train.warmup_steps])
    if train.optimizer == "adamw":
        return optim.AdamW(learning_rate=schedule, weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return optim.Adam(learning_rate=schedule)
    if train.optimizer == "sgd":
        return optim.SGD(learning_rate=schedule, weight_decay=train.weight_decay)
    return optim.Adafactor(learning_rate=schedule)


def step_seed(seed: int, step: int) -> int:
    """The random seed of step `step` (dropout): a resumed run draws what the first would have."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little")


# --- the schedule --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Which steps (1-based, counted over the whole run) are followed by work that reads the
    model as the step left it. The loop asks it both whether it may queue the next step and
    what to do at a sync point, so the two can never disagree."""

    total_steps: int
    report_every: int
    eval_every: int
    save_every: int
    accumulate: int  # batches per optimizer update

    @classmethod
    def of(cls, train: TrainParams, total_steps: int) -> Schedule:
        return cls(
            total_steps,
            train.steps_per_report,
            train.steps_per_eval,
            train.save_every,
            train.grad_accumulation_steps,
        )

    def last(self, step: int) -> bool:
        return step == self.total_steps

    def reports(self, step: int) -> bool:
        return step % self.report_every == 0 or self.last(step)

    def evaluates(self, step: int) -> bool:
        return step % self.eval_every == 0 or self.last(step)

    def updates(self, step: int) -> bool:
        """Whether the optimizer updates the model at the end of `step` (a checkpoint can only
        be taken then: no half-accumulated gradient is saved)."""
        return step % self.accumulate == 0

    def saves(self, step: int) -> bool:
        return self.updates(step) and step % self.save_every == 0

    def syncs(self, step: int, stopping: bool) -> bool:
        """Whether the next step must wait until `step` is done and the work after it ran."""
        return self.reports(step) or self.evaluates(step) or self.saves(step) or stopping


class StopRequest:
    """Turns Ctrl-C / SIGTERM into a flag the loop checks between steps (a second Ctrl-C quits
    at once), so a checkpoint is never written from the middle of an update.

    With several processes only Ctrl-C is caught: mlx.launch sends SIGTERM to the others when
    one process dies, and they, waiting in a collective for the dead one, could never reach a
    step's end; they end at once instead (the last checkpoint is kept)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.requested: str | None = None
        self.signals = signals
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = signal.Signals(signum).name
        signal.signal(signum, self._previous[signum])


# --- the run -------------------------------------------------------------------------------------


class Queued(NamedTuple):
    """A step queued on the device: its batch and the arrays it will produce."""

    batch: int
    loss: Any
    count: Any  # learned tokens in the batch
    finite: Any  # whether every gradient entry was finite
    accumulated: Any  # the gradient carried to the next batch, or None after an update


class TrainingRun:
    """One training run's state, from set-up to the last checkpoint."""

    def __init__(
        self,
        model: Any,
        optimizer: Any,
        train_batches: Batches,
        valid_batches: Batches,
        train: TrainParams,
        seed: int,
        total_steps: int,
        state: LoopState,
        checkpoints: Path,
        fingerprint: str,
        tracker: Reporter,
        world: Any = None,
        lanes: int = 1,
    ) -> None:
        import mlx.core as mx

        from lorapipe import fast

        # The processes training together (data parallel; mx.distributed.init() is a group of
        # one unless started through mlx.launch). Each holds a share of every batch.
        self.world = world if world is not None else mx.distributed.init()
        self.writes = self.world.rank() == 0  # only rank 0 writes checkpoints
        self.model, self.optimizer, self.train, self.seed = model, optimizer, train, seed
        self.train_batches, self.valid_batches = train_batches, valid_batches
        self.schedule = Schedule.of(train, total_steps)
        self.state, self.checkpoints, self.fingerprint = state, checkpoints, fingerprint
        self.tracker = tracker
        self.layout = fast.trainable_layout(model, optimizer)
        # Lanes (lorapipe.lanes): each takes a share of every batch's rows, on its own stream.
        self.lanes = lanes
        self.lane_batches = train_batches.split(lanes) if lanes > 1 else [train_batches]
        self.lane_streams = streams(lanes)
        self.step = self._compile_step()
        self.clock = time.perf_counter()

    @classmethod
    def fresh(
        cls,
        model: Any,
        train: TrainParams,
        seed: int,
        batches: Batches,
        total_steps: int,
        checkpoints: Path,
        tracker: Reporter,
        world: Any = None,
        lanes: int = 1,
    ) -> TrainingRun:
        """A run from step 0 that also validates on its training batches (benches, tests)."""
        optimizer, state = make_optimizer(train, total_steps), LoopState()
        args = (batches, batches, train, seed, total_steps, state, checkpoints, "fresh", tracker)
        return cls(model, optimizer, *args, world, lanes)

    def _compile_step(self) -> Any:
        """One batch's forward and backward pass and, at the end of an accumulation, the
        update: traced once per batch shape, with the model, optimizer and RNG as state."""
        import mlx.core as mx
        import mlx.nn as nn
        from mlx.nn.utils import average_gradients

        model, layout, train, world = self.model, self.layout, self.train, self.world
        accumulate, ranks = train.grad_accumulation_steps, world.size()
        loss_and_grad = nn.value_and_grad(model, masked_loss)
        self.compiled_state = [model.state, self.optimizer.state, mx.random.state, layout.state]

        def batch_loss_and_grad(lanes: tuple[Any, ...]) -> tuple[Any, Any, Any]:
            """The batch's mean loss, its learned tokens and the mean gradient. With lanes, each
            lane's on its stream, weighed by its tokens: one lane's figures, up to rounding."""
            if len(lanes) == 1:
                (loss, count), grad = loss_and_grad(model, *lanes[0])
                return loss, count, layout.gradient(grad)
            losses, counts, grads = [], [], []
            for stream, arrays in zip(self.lane_streams, lanes, strict=True):
                with mx.stream(stream):
                    (loss, count), grad = loss_and_grad(model, *arrays)
                    losses.append(loss * count)
                    counts.append(count)
                    grads.append(layout.scale(layout.gradient(grad), count))
            count = sum(counts)
            per_token = 1 / mx.maximum(count, 1)
            grad = layout.scale(reduce(layout.add, grads), per_token)
            return sum(losses) * per_token, count, grad

        @partial(mx.compile, inputs=self.compiled_state, outputs=self.compiled_state)
        def step(lanes: tuple[Any, ...], previous: Any, update: bool) -> Any:
            loss, count, grad = batch_loss_and_grad(lanes)
            if ranks > 1:
                # This process's gradient and loss weighed by its learned tokens, and their
                # count, averaged over the processes in one collective (MLX's
                # average_gradients, one group): divided by the mean count, they are the whole
                # batch's mean gradient and loss, the ones a single process computes.
                weighed = {"grad": layout.scale(grad, count), "count": count, "loss": loss * count}
                mean = average_gradients(weighed, group=world, all_reduce_size=ONE_COLLECTIVE)
                per_token = 1 / mx.maximum(mean["count"], 1e-6)
                grad = layout.scale(mean["grad"], per_token)
                loss, count = mean["loss"] * per_token, mean["count"] * ranks
            if previous is not None:
                grad = layout.add(grad, previous)
            # One pass over the gradients feeds both the NaN guard and clipping.
            norm_sq = layout.squared_norm(grad)
            finite = mx.isfinite(norm_sq)
            if update:
                factor = mx.array(1 / accumulate, mx.float32)
                if train.max_grad_norm is not None:
                    # clip_grad_norm's scaling, of the mean gradient over the accumulated batches
                    norm = mx.sqrt(norm_sq) / accumulate
                    factor = factor * mx.minimum(train.max_grad_norm / (norm + 1e-6), 1.0)
                layout.update(layout.scale(grad, factor))
                grad = None
            return loss, count, finite, grad

        return step

    def recompile(self) -> Any:
        """The step compiled afresh (after the model's blocks changed), as `self.step`."""
        self.step = self._compile_step()
        return self.step

    @contextmanager
    def rewound(self) -> Iterator[None]:
        """Steps taken inside are undone on leaving: the trainable arrays, the optimizer's
        state and the layout's arrays are put back as they were (memory trials run training's
        own steps, update included). Arrays are immutable, so keeping the old ones costs no
        copy; the step is compiled afresh, for the optimizer's state as it is again."""
        from mlx.utils import tree_map

        def same(tree: Any) -> Any:
            return tree_map(lambda leaf: leaf, tree)

        trainable, optimizer = same(self.model.trainable_parameters()), same(self.optimizer.state)
        layout = dict(self.layout.state)
        try:
            yield
        finally:
            self.model.update(trainable)
            self.optimizer.state = optimizer  # (a fresh optimizer initializes itself again)
            self.layout.state.clear()
            self.layout.state.update(layout)
            self.recompile()

    def on_lanes(self) -> Any:
        """A context in which steps and validation run: on lanes, the BLAS runs each call on
        one thread (lorapipe.lanes)."""
        return blas_threads(1 if self.lanes > 1 else None)

    def launch(self, number: int, previous: Any, batch: int | None = None) -> Queued:
        """Queue step `number` (0-based) on the device and return at once (on `batch` rather
        than the step's own batch: memory trials)."""
        import mlx.core as mx

        if batch is None:
            epoch, position = divmod(number, len(self.train_batches))
            batch = int(batch_order(self.seed, epoch, len(self.train_batches))[position])
        # Random draws (dropout) depend on (seed, step) only: a resumed run draws the same.
        mx.random.seed(step_seed(self.seed, number))
        update = (number + 1) % self.schedule.accumulate == 0
        lanes = tuple(lane.arrays(batch) for lane in self.lane_batches)
        outputs = self.step(lanes, previous, update)
        mx.async_eval(self.compiled_state, *(o for o in outputs if o is not None))
        return Queued(batch, *outputs)

    def finish(self, queued: Queued) -> None:
        """Wait for a queued step, stop on a non-finite loss or gradient, count it."""
        state, window = self.state, self.state.window
        loss = float(queued.loss.item())  # waits for this step only
        if not (math.isfinite(loss) and bool(queued.finite.item())):
            raise TrainError(
                f"train: non-finite loss or gradient at step {state.step + 1} (loss {loss}); the "
                f"last good checkpoint is kept in {self.checkpoints}; lower "
                "train.learning_rate or check the data"
            )
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        real = self.train_batches.real[queued.batch]
        state.step += 1
        state.trained_tokens += int(queued.count.item())
        state.seen_tokens += real
        state.train_seconds += seconds
        for key, value in zip(WINDOW, (loss, real, 1, seconds), strict=True):
            window[key] += value

    def at_sync_point(self, stop: StopRequest) -> bool:
        """The work the schedule puts after this step; True when training stops early."""
        step, schedule = self.state.step, self.schedule
        if schedule.reports(step):
            self.report()
        if schedule.evaluates(step) and self.evaluate():
            return True
        if schedule.updates(step) and (schedule.saves(step) or stop.requested):
            self.save()
        if stop.requested and schedule.updates(step):
            raise Interrupted(
                f"train: {stop.requested} at step {step}; checkpoint saved in "
                f"{self.checkpoints}; run `dvc repro train` to resume"
            )
        self.clock = time.perf_counter()  # reports, evaluations and saves are not step time
        return False

    def report(self) -> None:
        import mlx.core as mx

        window = self.state.window
        record = {
            "step": self.state.step,
            "train_loss": window["loss"] / window["steps"],
            "learning_rate": float(self.optimizer.learning_rate.item()),
            "tokens_per_second": window["tokens"] / max(window["seconds"], 1e-9),
            "trained_tokens": self.state.trained_tokens,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
        self.state.history.append(record)
        self.tracker.report(record)
        window.update(dict.fromkeys(WINDOW, 0.0))

    def evaluate(self) -> bool:
        """Validation loss, the best adapter so far; True when early stopping's patience is out."""
        state, train = self.state, self.train
        self.model.eval()
        # On the run's lanes, as its steps (fewer where a batch has fewer rows: dataset_loss).
        val_loss = dataset_loss(
            self.model, self.valid_batches, train.val_batches, self.world, self.lanes
        )
        self.model.train()
        record = {"step": state.step, "val_loss": val_loss}
        state.history.append(record)
        self.tracker.report(record)
        if not math.isfinite(val_loss):
            raise TrainError(
                f"train: validation loss is {val_loss} at step {state.step}; lower "
                "train.learning_rate (the last good checkpoint is kept)"
            )
        if state.best_val_loss is None or val_loss < (
            state.best_val_loss - train.early_stopping_min_delta
        ):
            state.best_val_loss, state.best_step = val_loss, state.step
            state.evals_without_improvement = 0
            if self.writes:
                save_best(self.checkpoints, self.layout.parameters())
        else:
            state.evals_without_improvement += 1
        patience = train.early_stopping_patience
        if patience is None or state.evals_without_improvement < patience:
            return False
        state.stopped_early = True
        self.tracker.say(
            f"early stop at step {state.step}: no improvement in {patience} evaluations"
        )
        return True

    def save(self) -> None:
        if not self.writes:
            return
        parameters, optimizer_state = self.layout.parameters(), self.layout.optimizer_state()
        save_checkpoint(self.checkpoints, parameters, optimizer_state, self.state, self.fingerprint)


def train_loop(run: TrainingRun) -> LoopState:
    """Train from `run.state.step` to the schedule's end (or an early stop); save at the end."""
    from lorapipe.fast import fast_training

    state, schedule = run.state, run.schedule
    run.model.train()
    # closing: the model is left holding its float32 arrays, whatever ends the loop.
    with (
        memory_limit(run.train.memory_limit_gb),
        fast_training(run.model),
        closing(run.layout),
        StopRequest((signal.SIGINT,)) if run.world.size() > 1 else StopRequest() as stop,
        run.on_lanes(),
    ):
        if state.step == 0:
            run.evaluate()  # the loss before training: the curve's first point
        run.clock = time.perf_counter()
        queued = run.launch(state.step, None) if state.step < schedule.total_steps else None
        while queued is not None:
            # Queue the next step before waiting for this one, unless work after this one
            # must read the model first.
            syncs = schedule.syncs(state.step + 1, stop.requested is not None)
            following = None if syncs else run.launch(state.step + 1, queued.accumulated)
            run.finish(queued)
            if syncs:
                if run.at_sync_point(stop):
                    break
                if state.step < schedule.total_steps:
                    following = run.launch(state.step, queued.accumulated)
            queued = following
    run.save()
    return state
