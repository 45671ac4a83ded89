"""Training progress: DVCLive step metrics for `dvc plots`, a `tail -f`-able log, a progress line.

DVCLive runs inside a DVC stage here (`dvcyaml=False`): the plots are declared by hand at the
top of dvc.yaml. Values are plain Python floats, never MLX arrays.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

# DVCLive metric names -> the keys the training loop reports.
TRAIN_METRICS = {
    "train/loss": "train_loss",
    "train/learning_rate": "learning_rate",
    "train/tokens_per_second": "tokens_per_second",
    "train/trained_tokens": "trained_tokens",
    "train/peak_memory_gb": "peak_memory_gb",
}
VAL_METRICS = {"val/loss": "val_loss"}


class Tracker:
    """Receives the loop's reports; the checkpoint keeps the same records for replay on resume."""

    def __init__(self, live_dir: Path, log_path: Path, total_steps: int) -> None:
        from dvclive import Live

        self.live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log: TextIO = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self.total = total_steps
        self.started = time.monotonic()

    def replay(self, history: list[dict[str, Any]]) -> None:
        """Re-log a resumed run's history, so the plots show the whole run."""
        for record in history:
            self._log_live(record)

    def report(self, record: dict[str, Any]) -> None:
        self._log_live(record)
        step = record["step"]
        if "val_loss" in record:
            line = f"step {step}/{self.total}  val_loss {record['val_loss']:.4f}"
        else:
            line = (
                f"step {step}/{self.total}  loss {record['train_loss']:.4f}  "
                f"lr {record['learning_rate']:.2e}  {record['tokens_per_second']:.0f} tok/s  "
                f"peak {record['peak_memory_gb']:.2f} GB"
            )
        self.say(line)

    def say(self, line: str) -> None:
        elapsed = time.monotonic() - self.started
        self.log.write(f"[{elapsed:8.1f}s] {line}\n")
        print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        self.live.end()
        self.log.close()

    def _log_live(self, record: dict[str, Any]) -> None:
        self.live.step = record["step"]
        names = VAL_METRICS if "val_loss" in record else TRAIN_METRICS
        for name, key in names.items():
            self.live.log_metric(name, float(record[key]))


class Recorder:
    """A tracker that keeps what the loop reports, with the time each report arrived, and
    prints nothing: for tests and benches that run the training loop themselves."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.times: list[float] = []  # time.perf_counter() at each record
        self.said: list[str] = []

    def report(self, record: dict[str, Any]) -> None:
        self.times.append(time.perf_counter())
        self.records.append(dict(record))

    def say(self, line: str) -> None:
        self.said.append(line)

    def replay(self, history: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass

    def train_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "train_loss" in r]
