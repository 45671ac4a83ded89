"""`train` stage: LoRA / DoRA / full fine-tuning on mlx-lm's model pieces, resumable.

A recipe in three steps: set up (model, adapters, data, optimizer, or all of these from the last
checkpoint), train (a compiled step, the same as mlx-lm's trainer, inside a loop that keeps what
mlx-lm's does not: optimizer state, step, LR-schedule position, RNG and data order), save (the
best or last adapter as a plain mlx-lm adapter folder).

Checkpoints (`paths.checkpoints`, `persist: true` in dvc.yaml) hold everything needed to go on,
plus a fingerprint of the params, data and base model that shaped them: `dvc repro` after a kill
or Ctrl-C continues from the last one; after a change that invalidates them it starts afresh and
says why.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lorapipe.errors import LorapipeError
from lorapipe.io import atomic_dir, atomic_write_json, read_jsonl
from lorapipe.params import LoraParams, Params, TrainParams

WINDOW = ("loss", "tokens", "steps", "seconds")
PAD_TO = 32  # pad batch lengths to a multiple of this, as mlx-lm does: fewer compiled shapes
CHECKPOINT_GLOB = "step-*"
LATEST = "latest.json"
BEST_ADAPTER = "best.safetensors"


class TrainError(LorapipeError):
    """Training cannot start or cannot go on."""


class Interrupted(LorapipeError):
    """Ctrl-C or SIGTERM: a checkpoint was saved; re-running the stage resumes."""


# --- data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    tokens: list[int]
    targets: list[int]  # 1 where tokens[i] is learned (predicted from tokens[:i]), else 0


def encode(row: dict[str, Any], tokenizer: Any, mask_prompt: bool) -> Example:
    """Tokenize a row as training sees it. With `mask_prompt`, every assistant turn is learned
    (its content and end-of-turn token) and nothing else: not the system prompt, not the user."""
    if "text" in row:
        tokens = list(tokenizer.encode(row["text"]))
        if tokenizer.eos_token_id is not None and tokens[-1:] != [tokenizer.eos_token_id]:
            tokens.append(tokenizer.eos_token_id)
        return Example(tokens, [0] + [1] * (len(tokens) - 1))
    messages = row["messages"]

    def render(upto: int, generation_prompt: bool = False) -> list[int]:
        return list(
            tokenizer.apply_chat_template(
                messages[:upto],
                tokenize=True,
                add_generation_prompt=generation_prompt,
                return_dict=False,
            )
        )

    tokens = render(len(messages))
    if not mask_prompt:
        return Example(tokens, [0] + [1] * (len(tokens) - 1))
    targets = [0] * len(tokens)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(render(i, generation_prompt=True)), len(render(i + 1))
        if render(i + 1) != tokens[:end]:
            raise TrainError(
                "train.mask_prompt: the chat template does not render a conversation's turns "
                "as prefixes of the whole; set train.mask_prompt: false for this model"
            )
        targets[start:end] = [1] * (end - start)
    return Example(tokens, targets)


@dataclass
class Batches:
    """Fixed, length-sorted batches (little padding) whose order is reshuffled every epoch."""

    tokens: list[np.ndarray]  # [batch, length] int32, 0-padded
    targets: list[np.ndarray]  # [batch, length] float32
    real: list[int]  # tokens in each batch that are not padding (what tokens/s counts)
    # Where logits are needed: the flat indices of tokens[:, :-1] whose next token is learned,
    # padded with an unlearned index to the same count for every batch of one width (so no more
    # compiled shapes than widths); None where every position is learned.
    positions: list[np.ndarray | None] = field(default_factory=list)

    @property
    def real_tokens(self) -> int:
        return sum(self.real)

    @property
    def padded_tokens(self) -> int:
        return sum(t.size for t in self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real_tokens / max(self.padded_tokens, 1)

    def arrays(self, index: int) -> tuple[Any, Any, Any]:
        """Batch `index` as the MLX arrays masked_loss takes after the model."""
        import mlx.core as mx

        positions = self.positions[index] if self.positions else None
        return (
            mx.array(self.tokens[index]),
            mx.array(self.targets[index]),
            None if positions is None else mx.array(positions),
        )


def make_batches(
    examples: list[Example], batch_size: int, pad_to: int = PAD_TO, every_row: bool = False
) -> Batches:
    """Length-sorted batches of `batch_size` rows. Training leaves out the last partial batch
    (every step the same size); `every_row` keeps it, for losses that must cover a whole split."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].tokens), i))
    last = len(order) if every_row else len(order) - batch_size + 1
    groups = [order[i : i + batch_size] for i in range(0, last, batch_size)]
    batches = Batches([], [], [])
    for group in groups:
        longest = max(len(examples[i].tokens) for i in group)
        # inputs are tokens[:, :-1]: make that a multiple of pad_to
        width = 1 + pad_to * math.ceil((longest - 1) / pad_to)
        tokens = np.zeros((len(group), width), np.int32)
        targets = np.zeros((len(group), width), np.float32)
        for row, i in enumerate(group):
            n = len(examples[i].tokens)
            tokens[row, :n] = examples[i].tokens
            targets[row, :n] = examples[i].targets
        batches.real.append(sum(len(examples[i].tokens) for i in group))
        batches.tokens.append(tokens)
        batches.targets.append(targets)
    batches.positions = learned_positions(batches.targets)
    return batches


def learned_positions(targets: list[np.ndarray]) -> list[np.ndarray | None]:
    """Each batch's learned input positions (Batches.positions)."""
    learned = [np.flatnonzero(t[:, 1:]).astype(np.int32) for t in targets]
    count: dict[tuple[int, ...], int] = {}
    for t, where in zip(targets, learned, strict=True):
        count[t.shape] = max(count.get(t.shape, 0), where.size)
    positions: list[np.ndarray | None] = []
    for t, where in zip(targets, learned, strict=True):
        size = t[:, 1:].size
        if count[t.shape] == size:
            positions.append(None)  # all learned: the full logits, no gather
            continue
        # Padding entries point at an unlearned position (one exists: fewer learned than
        # size), whose zero weight keeps them out of the loss and its gradient.
        unlearned = int(np.flatnonzero(t[:, 1:].reshape(-1) == 0)[0])
        pad = np.full(count[t.shape] - where.size, unlearned, np.int32)
        positions.append(np.concatenate([where, pad]))
    return positions


def step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little")


def batch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The order of the batches in one epoch: a pure function of (seed, epoch), so a resumed
    run continues the same sequence without saving any generator state."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def load_split(path: Path, tokenizer: Any, mask_prompt: bool) -> list[Example]:
    if not path.is_file():
        raise TrainError(f"{path}: not found; run `dvc repro sanitize` (it makes this file)")
    return [
        encode(line.value, tokenizer, mask_prompt)
        for line in read_jsonl(path)
        if line.value is not None
    ]


# --- model and optimizer ------------------------------------------------------------------------


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


def masked_loss(model: Any, tokens: Any, targets: Any, positions: Any = None) -> tuple[Any, Any]:
    """Mean cross-entropy over target tokens; a batch with none gives 0, never 0/0.

    With `positions` (Batches.positions) the output layer runs on the learned positions only:
    the same loss without the logits nothing reads. SmolLM2's vocabulary is 85 times its width
    and 24% of the demo batches' positions are learned: the default CPU step runs 1.22x faster.
    """
    import mlx.core as mx
    import mlx.nn as nn

    from lorapipe.fast import logits_at

    inputs, labels, mask = tokens[:, :-1], tokens[:, 1:], targets[:, 1:]
    if positions is None:
        logits = model(inputs)
    else:
        with logits_at(model, positions):
            logits = model(inputs)
        if logits.ndim == 2:  # gathered (else a model logits_at does not know: all of them)
            labels, mask = labels.reshape(-1)[positions], mask.reshape(-1)[positions]
    ce = nn.losses.cross_entropy(logits, labels) * mask
    count = mask.sum()
    return ce.astype(mx.float32).sum() / mx.maximum(count, 1), count


def dataset_loss(model: Any, batches: Batches, max_batches: int = -1) -> float:
    """Mean loss per target token over `batches` (the first `max_batches`; -1: all)."""
    import mlx.core as mx

    total, count = mx.array(0.0), mx.array(0.0)
    limit = len(batches) if max_batches == -1 else min(max_batches, len(batches))
    for i in range(limit):
        loss, n = masked_loss(model, *batches.arrays(i))
        total, count = total + loss * n, count + n
        mx.eval(total, count)
    return float((total / mx.maximum(count, 1)).item())


# --- checkpoints ---------------------------------------------------------------------------------


@dataclass
class LoopState:
    """Everything besides arrays that a resumed run needs (saved as JSON in each checkpoint)."""

    step: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    trained_tokens: int = 0  # target tokens learned (the assistant turns under mask_prompt)
    seen_tokens: int = 0  # every non-padding token through the model
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    # The steps since the last report (a checkpoint can fall between two reports).
    window: dict[str, float] = field(default_factory=lambda: dict.fromkeys(WINDOW, 0.0))


def fingerprint(params: Params, files: list[Path]) -> str:
    """What shaped a checkpoint: a resume with a different value would not continue that run.
    Reporting and saving intervals and the memory limit are left out: changing them may resume."""
    ignored = ("steps_per_report", "save_every", "memory_limit_gb")
    train = {k: v for k, v in asdict(params.train).items() if k not in ignored}
    digest = hashlib.sha256(
        json.dumps(
            {"lora": asdict(params.lora), "train": train, "seed": params.seed}, sort_keys=True
        ).encode()
    )
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    directory: Path,
    adapters: dict[str, Any],
    optimizer_state: dict[str, Any],
    state: LoopState,
    fingerprint_: str,
) -> Path:
    """Write checkpoint step-N atomically (trainable arrays and optimizer state by name)."""
    import mlx.core as mx

    final = directory / f"step-{state.step:07d}"
    with atomic_dir(final) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), adapters)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), optimizer_state)
        atomic_write_json(tmp / "state.json", {"fingerprint": fingerprint_, **asdict(state)})
    atomic_write_json(directory / LATEST, {"checkpoint": final.name, "step": state.step})
    for old in sorted(directory.glob(CHECKPOINT_GLOB))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(directory: Path, fingerprint_: str) -> tuple[Path | None, str]:
    """The checkpoint to resume from (or None) and a sentence saying what was decided."""
    latest = directory / LATEST
    if not latest.is_file():
        return None, "no checkpoint: training from step 0"
    path = directory / json.loads(latest.read_text())["checkpoint"]
    state_file = path / "state.json"
    if not state_file.is_file():
        return None, f"{path} is incomplete: training from step 0"
    saved = json.loads(state_file.read_text())
    if saved["fingerprint"] != fingerprint_:
        return None, (
            f"{path} was made with other params, data or base model: training from step 0 "
            "(the old checkpoints are removed)"
        )
    return path, f"resuming from {path} (step {saved['step']})"


def clear_checkpoints(directory: Path) -> None:
    for old in directory.glob(CHECKPOINT_GLOB):
        shutil.rmtree(old)
    (directory / LATEST).unlink(missing_ok=True)
    (directory / BEST_ADAPTER).unlink(missing_ok=True)


def restore(path: Path, model: Any, optimizer: Any) -> LoopState:
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    model.load_weights(str(path / "adapters.safetensors"), strict=False)
    arrays = mx.load(str(path / "optimizer.safetensors"))
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(arrays.items()))
    saved = json.loads((path / "state.json").read_text())
    saved.pop("fingerprint")
    return LoopState(**saved)


# --- the loop -----------------------------------------------------------------------------------


class _StopRequest:
    """Turns Ctrl-C / SIGTERM into a flag the loop checks between steps (a second Ctrl-C quits
    at once), so a checkpoint is never written from the middle of an update."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = signal.Signals(signum).name
        signal.signal(signum, self._previous[signum])


def train_loop(
    model: Any,
    optimizer: Any,
    train_batches: Batches,
    valid_batches: Batches,
    params: Params,
    total_steps: int,
    state: LoopState,
    checkpoints: Path,
    fingerprint_: str,
    tracker: Any,
) -> LoopState:
    import mlx.core as mx
    import mlx.nn as nn

    from lorapipe.fast import fast_training, memory_limit, trainable_layout

    train = params.train
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    accumulate = train.grad_accumulation_steps
    layout = trainable_layout(model, optimizer)
    compiled_state = [model.state, optimizer.state, mx.random.state, layout.state]

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def step(tokens: Any, targets: Any, positions: Any, previous: Any, update: bool) -> Any:
        (loss, count), grad = loss_and_grad(model, tokens, targets, positions)
        grad = layout.gradient(grad)
        if previous is not None:
            grad = layout.add(grad, previous)
        # One pass over the gradients feeds both the NaN guard and clipping (bench/README.md).
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

    def save(state: LoopState) -> None:
        parameters, optimizer_state = layout.parameters(), layout.optimizer_state()
        save_checkpoint(checkpoints, parameters, optimizer_state, state, fingerprint_)

    def validate() -> float:
        model.eval()
        loss = dataset_loss(model, valid_batches, train.val_batches)
        model.train()
        return loss

    def evaluate_and_track() -> None:
        val_loss = validate()
        record = {"step": state.step, "val_loss": val_loss}
        state.history.append(record)
        tracker.report(record)
        if not math.isfinite(val_loss):
            raise TrainError(
                f"train: validation loss is {val_loss} at step {state.step}; lower "
                "train.learning_rate (the last good checkpoint is kept)"
            )
        if (
            state.best_val_loss is None
            or val_loss < state.best_val_loss - train.early_stopping_min_delta
        ):
            state.best_val_loss, state.best_step = val_loss, state.step
            state.evals_without_improvement = 0
            mx.save_safetensors(str(checkpoints / BEST_ADAPTER), layout.parameters())
        else:
            state.evals_without_improvement += 1

    def launch(number: int, previous: Any) -> tuple[int, tuple[Any, ...]]:
        """Queue step `number` (0-based) on the device and return at once."""
        epoch, position = divmod(number, len(train_batches))
        index = int(batch_order(params.seed, epoch, len(train_batches))[position])
        # Random draws (dropout) depend on (seed, step) only: a resumed run draws the same.
        mx.random.seed(step_seed(params.seed, number))
        outputs = step(
            *train_batches.arrays(index),
            previous,
            (number + 1) % accumulate == 0,
        )
        mx.async_eval(compiled_state, *(o for o in outputs if o is not None))
        return index, outputs

    def needs_sync(number: int, stop: _StopRequest) -> bool:
        """Whether step `number` (1-based) is followed by work that reads the model as that
        step leaves it (report, evaluation, checkpoint, the end, a stop): then the next step
        must not be queued before it is done."""
        return (
            number % train.steps_per_report == 0
            or number % train.steps_per_eval == 0
            or (number % accumulate == 0 and number % train.save_every == 0)
            or number == total_steps
            or stop.requested is not None
        )

    model.train()
    window = state.window
    # train.memory_limit_gb also bounds how far MLX's queue runs ahead (bench/README.md).
    limit = memory_limit(train.memory_limit_gb)
    # closing: the model is left holding its float32 arrays, whatever ends the loop.
    with limit, fast_training(model), closing(layout), _StopRequest() as stop:
        if state.step == 0:
            evaluate_and_track()
        clock = time.perf_counter()
        pending = launch(state.step, None) if state.step < total_steps else None
        while pending is not None:
            index, (loss, count, finite, accumulated) = pending
            # Queue the next step before waiting for this one, so that the host prepares it
            # while the device still works on this one (no per-step round trip).
            pending = None
            if not needs_sync(state.step + 1, stop):
                pending = launch(state.step + 1, accumulated)
            loss_value = float(loss.item())  # waits for this step only
            if not (math.isfinite(loss_value) and bool(finite.item())):
                raise TrainError(
                    f"train: non-finite loss or gradient at step {state.step + 1} (loss "
                    f"{loss_value}); the last good checkpoint is kept in {checkpoints}; lower "
                    "train.learning_rate or check the data"
                )
            now = time.perf_counter()
            seconds, clock = now - clock, now
            state.step += 1
            state.trained_tokens += int(count.item())
            state.seen_tokens += train_batches.real[index]
            state.train_seconds += seconds
            window["loss"] += loss_value
            window["tokens"] += train_batches.real[index]
            window["steps"] += 1
            window["seconds"] += seconds
            if pending is not None:
                continue

            if state.step % train.steps_per_report == 0 or state.step == total_steps:
                record = {
                    "step": state.step,
                    "train_loss": window["loss"] / window["steps"],
                    "learning_rate": float(optimizer.learning_rate.item()),
                    "tokens_per_second": window["tokens"] / max(window["seconds"], 1e-9),
                    "trained_tokens": state.trained_tokens,
                    "peak_memory_gb": mx.get_peak_memory() / 1e9,
                }
                state.history.append(record)
                tracker.report(record)
                window.update(dict.fromkeys(WINDOW, 0.0))
            if state.step % train.steps_per_eval == 0 or state.step == total_steps:
                evaluate_and_track()
                patience = train.early_stopping_patience
                if patience is not None and state.evals_without_improvement >= patience:
                    state.stopped_early = True
                    tracker.say(
                        f"early stop at step {state.step}: no improvement in {patience} evaluations"
                    )
                    break
            at_boundary = state.step % accumulate == 0
            if at_boundary and (state.step % train.save_every == 0 or stop.requested):
                save(state)
            if stop.requested and at_boundary:
                raise Interrupted(
                    f"train: {stop.requested} at step {state.step}; checkpoint saved in "
                    f"{checkpoints}; run `dvc repro train` to resume"
                )
            clock = time.perf_counter()  # reports, evaluations and saves are not step time
            if state.step < total_steps:
                pending = launch(state.step, accumulated)
    save(state)
    return state


# --- memory --------------------------------------------------------------------------------------

# Messages of the allocators that run out: Metal, CUDA, and the CPU's C++ runtime.
_OUT_OF_MEMORY = ("out of memory", "insufficient memory", "bad_alloc", "cudamalloc", "outofmemory")


def memory_available() -> tuple[int, str]:
    """Bytes one training step may use, and where that figure comes from."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        info = mx.device_info()
        for key in ("free_memory", "max_recommended_working_set_size", "memory_size"):
            if isinstance(info.get(key), int) and info[key] > 0:
                return int(info[key]), f"the GPU's {key.replace('_', ' ')}"
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        kib = int(next(ln.split()[1] for ln in lines if ln.startswith("MemAvailable")))
        return kib * 1024, "free RAM"
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM"


def check_memory(model: Any, batches: Batches, train: TrainParams, trainable: int) -> float:
    """Fail before step 1, with what to change, if the longest batch does not fit.

    Runs one uncompiled forward and backward pass on the batch with the most tokens (compiling
    only ever needs less) and adds the optimizer's state; returns the estimate in bytes.
    """
    import mlx.core as mx
    import mlx.nn as nn

    largest = max(range(len(batches)), key=lambda i: batches.tokens[i].size)
    shape = "x".join(map(str, batches.tokens[largest].shape))
    advice = (
        "lower train.batch_size or train.max_seq_length (with sanitize.max_tokens), or set "
        "train.grad_checkpoint: -1 (or a number of blocks)"
    )
    if train.memory_limit_gb is not None:
        limit, source = int(train.memory_limit_gb * 1e9), "train.memory_limit_gb"
    else:
        limit, source = memory_available()
    mx.reset_peak_memory()
    try:
        _, grad = nn.value_and_grad(model, masked_loss)(model, *batches.arrays(largest))
        mx.eval(grad)
    except (RuntimeError, MemoryError) as exc:
        if not any(word in str(exc).lower() for word in _OUT_OF_MEMORY):
            raise
        raise TrainError(
            f"train: out of memory in a trial step on the longest batch ({shape} tokens): "
            f"{exc}; {advice}"
        ) from exc
    del grad
    optimizer_state = 2 * 4 * trainable  # Adam's two fp32 moments per trainable parameter
    need = mx.get_peak_memory() + optimizer_state
    mx.reset_peak_memory()
    mx.clear_cache()
    if need > limit:
        raise TrainError(
            f"train: a step on the longest batch ({shape} tokens) needs about {need / 1e9:.2f} GB, "
            f"more than the {limit / 1e9:.2f} GB of {source}; {advice}"
        )
    return need


# --- the stage ----------------------------------------------------------------------------------


def main(params: Params) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    from lorapipe.fast import checkpoint_blocks, fast_training
    from lorapipe.provenance import run_record
    from lorapipe.tracking import Tracker

    paths, train = params.paths, params.train
    base = Path(paths.base)
    if not (base / "config.json").is_file():
        raise TrainError(f"{base}: not found; run `dvc repro base` (it makes {base})")
    mx.random.seed(params.seed)
    model, tokenizer = load(str(base))[:2]
    num_layers = attach_adapters(model, params.lora)

    split_dir = Path(paths.sanitized)
    train_set = load_split(split_dir / "train.jsonl", tokenizer, train.mask_prompt)
    valid_set = load_split(split_dir / "valid.jsonl", tokenizer, train.mask_prompt)
    for name, examples in (("train", train_set), ("valid", valid_set)):
        if len(examples) < train.batch_size:
            raise TrainError(
                f"train: the {name} split has {len(examples)} rows, fewer than "
                f"train.batch_size {train.batch_size}; lower the batch size or add data"
            )
        longest = max(len(e.tokens) for e in examples)
        if longest > train.max_seq_length:
            raise TrainError(
                f"train.max_seq_length: {train.max_seq_length} is shorter than the longest {name} "
                f"row ({longest} tokens); raise it to {longest}, or lower sanitize.max_tokens"
            )
    train_batches = make_batches(train_set, train.batch_size)
    valid_batches = make_batches(valid_set, train.batch_size)
    total_steps = train.iters or math.ceil((train.epochs or 1) * len(train_batches))

    checkpoints = Path(paths.checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    weights = [*sorted(base.glob("*.safetensors")), base / "config.json"]
    fp = fingerprint(params, [split_dir / "train.jsonl", split_dir / "valid.jsonl", *weights])
    optimizer = make_optimizer(train, total_steps)
    resume_from, decision = load_checkpoint(checkpoints, fp)
    if resume_from is None:
        clear_checkpoints(checkpoints)
        state = LoopState()
    else:
        state = restore(resume_from, model, optimizer)

    flat: list[tuple[str, Any]] = tree_flatten(model.trainable_parameters())
    trainable = sum(int(v.size) for _, v in flat)
    tracker = Tracker(Path(paths.train_log), checkpoints / "train.log", total_steps)
    tracker.say(decision)
    tracker.say(
        f"{params.lora.fine_tune_type}: {trainable / 1e6:.2f}M trainable parameters in "
        f"{num_layers} blocks; {len(train_set)} train / {len(valid_set)} valid rows; "
        f"{total_steps} steps of {train.batch_size}; padding {train_batches.padding_fraction:.1%}"
    )
    tracker.replay(state.history)
    if train.grad_checkpoint > len(model.layers):
        raise TrainError(
            f"train.grad_checkpoint: {train.grad_checkpoint} but the model has "
            f"{len(model.layers)} blocks"
        )
    checkpoint_blocks(model, train.grad_checkpoint)
    with fast_training(model):  # measure the step training will run
        need = check_memory(model, train_batches, train, trainable)
    tracker.say(f"memory: a step on the longest batch needs about {need / 1e9:.2f} GB")
    try:
        state = train_loop(
            model,
            optimizer,
            train_batches,
            valid_batches,
            params,
            total_steps,
            state,
            checkpoints,
            fp,
            tracker,
        )
    except (RuntimeError, MemoryError) as exc:
        if not any(word in str(exc).lower() for word in _OUT_OF_MEMORY):
            raise
        raise TrainError(
            f"train: out of memory after step {state.step}: {exc}; lower train.batch_size or "
            "train.max_seq_length, or set train.grad_checkpoint: -1; run `dvc repro train` to "
            f"resume from the last checkpoint in {checkpoints}"
        ) from exc
    finally:
        tracker.close()

    final = checkpoints / BEST_ADAPTER if train.keep == "best" else None
    with atomic_dir(Path(paths.adapters)) as out:
        if final is not None and final.is_file():
            shutil.copy(final, out / "adapters.safetensors")
        else:
            mx.save_safetensors(
                str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
            )
        atomic_write_json(out / "adapter_config.json", adapter_config(params.lora, num_layers))
    val_losses = [r["val_loss"] for r in state.history if "val_loss" in r]
    summary = {
        "steps": state.step,
        "final_val_loss": val_losses[-1],
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "kept": train.keep,
        "stopped_early": state.stopped_early,
        "trained_tokens": state.trained_tokens,
        "train_seconds": round(state.train_seconds, 1),
        "seen_tokens": state.seen_tokens,
        "tokens_per_second": round(state.seen_tokens / max(state.train_seconds, 1e-9), 1),
        # The highest peak any report saw, across resumed runs (this process may have resumed
        # at the end and trained nothing).
        "peak_memory_gb": round(
            max(
                [r["peak_memory_gb"] for r in state.history if "peak_memory_gb" in r]
                + [mx.get_peak_memory() / 1e9]
            ),
            3,
        ),
        "padding_fraction": round(train_batches.padding_fraction, 4),
    }
    atomic_write_json(Path(paths.metrics) / "train.json", summary)
    atomic_write_json(Path(paths.reports) / "run.json", run_record())
    print(
        f"train: {state.step} steps, best val loss {state.best_val_loss:.4f} at step "
        f"{state.best_step} -> {paths.adapters}/ ({train.keep})"
    )
