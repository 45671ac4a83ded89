"""Resumable training checkpoints: what a run needs to go on exactly where it stopped.

A checkpoint folder `step-NNNNNNN` holds the trainable arrays and the optimizer's state by
parameter name (safetensors) and the loop's state with the run's fingerprint (JSON). Each is
written atomically, `latest.json` names the newest, and the last two are kept. The batch order
and random draws are pure functions of (seed, step), so no generator state is saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorapipe.io import atomic_dir, atomic_write_json
from lorapipe.params import LoraParams, TrainParams

CHECKPOINT_GLOB = "step-*"
LATEST = "latest.json"
BEST_ADAPTER = "best.safetensors"  # the adapter at the lowest validation loss so far
WINDOW = ("loss", "tokens", "steps", "seconds")
# train params that may change between a run and its resume: they shape no update.
# Settings that change how a run goes, not what it computes: a checkpoint resumes across them.
RESUMABLE_CHANGES = ("steps_per_report", "save_every", "memory_limit_gb", "grad_checkpoint")


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


def fingerprint(seed: int, lora: LoraParams, train: TrainParams, files: list[Path]) -> str:
    """What shaped a checkpoint: a resume with a different value would not continue that run."""
    kept = {k: v for k, v in asdict(train).items() if k not in RESUMABLE_CHANGES}
    digest = hashlib.sha256(
        json.dumps({"lora": asdict(lora), "train": kept, "seed": seed}, sort_keys=True).encode()
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


def save_best(directory: Path, adapters: dict[str, Any]) -> None:
    """Keep `adapters` as the best so far, atomically (a resume may copy it into the output)."""
    import mlx.core as mx

    tmp = directory / f".best.tmp-{os.getpid()}.safetensors"
    mx.save_safetensors(str(tmp), adapters)
    os.replace(tmp, directory / BEST_ADAPTER)


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
    """Load checkpoint `path` into the model and optimizer; return its loop state."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    model.load_weights(str(path / "adapters.safetensors"), strict=False)
    arrays = mx.load(str(path / "optimizer.safetensors"))
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(arrays.items()))
    saved = json.loads((path / "state.json").read_text())
    saved.pop("fingerprint")
    return LoopState(**saved)
