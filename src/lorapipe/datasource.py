"""Read raw records from local files (JSONL, JSON, CSV, Parquet) or a Hugging Face dataset.

Every record carries where it came from (`file:line`, or `file: row N`), so a bad one can be
named in an error or kept in a quarantine file with its reason. Nothing is dropped here: a
record that cannot be parsed comes back with `error` set.
"""

from __future__ import annotations

import csv
import glob
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapipe.errors import LorapipeError
from lorapipe.io import read_jsonl
from lorapipe.params import DataParams

SUPPORTED = (".jsonl", ".json", ".csv", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Dataset files a Hub download may take: data only, never loading scripts or pickles.
HUB_ALLOW_PATTERNS = [
    "*.jsonl",
    "*.json",
    "*.csv",
    "*.parquet",
    "*.md",
    "**/*.jsonl",
    "**/*.json",
    "**/*.csv",
    "**/*.parquet",
]


class DataSourceError(LorapipeError):
    """`data.source` cannot be read."""


@dataclass(frozen=True)
class RawRecord:
    where: str  # "data/raw/x.jsonl:17" or "org/name[train]: row 17"
    file: str  # the file's name, matched against preprocess.ratio_limits globs
    value: dict[str, Any] | None
    error: str | None
    raw: str  # the record as text, kept in the quarantine file


def source_files(spec: str) -> list[Path]:
    """The local files `data.source` names (a file, a folder or a glob), in a stable order."""
    path = Path(spec)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUPPORTED)
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
    else:
        return []
    unsupported = [p for p in files if p.suffix not in SUPPORTED]
    if unsupported:
        raise DataSourceError(
            f"data.source: {unsupported[0]} is not a supported file type; use "
            f"{', '.join(SUPPORTED)} (or narrow the glob)"
        )
    if not files:
        raise DataSourceError(
            f"data.source: {spec} contains no {', '.join(SUPPORTED)} files; add data there or "
            "point data.source at your files"
        )
    return files


def check_tracked(spec: str, raw_dir: str) -> None:
    """Refuse local files outside `raw_dir`: that folder is the preprocess stage's DVC dependency,
    so a file elsewhere could change with `dvc status` clean and every output stale. (A Hub
    dataset is pinned by `data.revision`, a param DVC tracks.)"""
    root = Path(raw_dir).resolve()
    for path in source_files(spec):
        if not path.resolve().is_relative_to(root):
            raise DataSourceError(
                f"data.source: {path} is outside {raw_dir}/, the folder DVC tracks for the "
                f"preprocess stage, so editing it would leave every output stale without a word; "
                f"move it under {raw_dir}/ (and `dvc add {raw_dir}/{path.name}` if it is large), "
                f"then point data.source there"
            )


def read_source(data: DataParams) -> Iterator[RawRecord]:
    files = source_files(data.source)
    if files:
        for path in files:
            yield from read_file(path)
    elif _HUB_ID.match(data.source):
        yield from _read_hub(data)
    else:
        raise DataSourceError(
            f"data.source: {data.source} does not exist; give a file, a folder, a glob "
            "(data/raw/*.jsonl) or a Hugging Face dataset id (org/name)"
        )


def read_file(path: Path) -> Iterator[RawRecord]:
    if path.suffix == ".jsonl":
        for line in read_jsonl(path):
            yield RawRecord(line.where, path.name, line.value, line.error, line.raw)
    elif path.suffix == ".json":
        yield from _read_json(path)
    elif path.suffix == ".csv":
        yield from _read_csv(path)
    else:
        yield from _read_parquet(path)


def _read_json(path: Path) -> Iterator[RawRecord]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataSourceError(
            f"{path}: not a valid JSON file ({exc}); a .json source must be one list of "
            "objects (use .jsonl for one object per line)"
        ) from exc
    if not isinstance(data, list):
        raise DataSourceError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, value in enumerate(data, start=1):
        where = f"{path}: item {i}"
        raw = json.dumps(value, ensure_ascii=False)
        if isinstance(value, dict):
            yield RawRecord(where, path.name, value, None, raw)
        else:
            yield RawRecord(where, path.name, None, "expected a JSON object", raw)


class _NumberedLines:
    """A file's lines for the csv module, remembering the number of the first non-blank line
    each record starts on (a quoted field can span lines: errors name where the record begins)."""

    def __init__(self, f: Any) -> None:
        self.f, self.number, self.start = f, 0, 0

    def __iter__(self) -> _NumberedLines:
        return self

    def __next__(self) -> str:
        line = next(self.f)
        self.number += 1
        if not self.start and line.strip():
            self.start = self.number
        return line


def _read_csv(path: Path) -> Iterator[RawRecord]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = _NumberedLines(f)
        reader = csv.DictReader(lines)
        if reader.fieldnames is None:  # reads the header line: records start after it
            return
        while True:
            lines.start = 0
            try:
                row = next(reader)
            except StopIteration:
                return
            where = f"{path}:{lines.start}"
            raw = json.dumps(row, ensure_ascii=False)
            if None in row or None in row.values():
                yield RawRecord(where, path.name, None, "wrong number of columns", raw)
            else:
                yield RawRecord(where, path.name, dict(row), None, raw)


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    # Batch by batch, not the whole table: a million rows are read in constant memory.
    rows = (v for b in pq.ParquetFile(path).iter_batches(batch_size=4096) for v in b.to_pylist())
    for i, value in enumerate(rows, start=1):
        yield RawRecord(f"{path}: row {i}", path.name, value, None, json.dumps(value, default=str))


def _read_hub(data: DataParams) -> Iterator[RawRecord]:
    """Download the dataset's data files at a pinned revision, then read them with `datasets`."""
    from datasets import load_dataset
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    if data.revision is None:
        raise DataSourceError(
            f"data.revision: is null but data.source is the Hub dataset {data.source}; pin a "
            "commit sha (or a tag/branch) so the data is reproducible"
        )
    try:
        folder = snapshot_download(
            data.source,
            repo_type="dataset",
            revision=data.revision,
            allow_patterns=HUB_ALLOW_PATTERNS,
        )
    except LocalEntryNotFoundError as exc:
        raise DataSourceError(
            f"data.source: {data.source}@{data.revision} is not in the local Hugging Face cache "
            f"and the Hub is unreachable; run `hf download {data.source} --repo-type dataset "
            f"--revision {data.revision}` where it is reachable, or use local files"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise DataSourceError(
            f"data.source: {data.source} is not a Hub dataset you can access; check the id, or "
            "log in with `hf auth login`"
        ) from exc
    try:
        dataset = load_dataset(folder, name=data.hf_config, split=data.hf_split)
    except ValueError as exc:
        raise DataSourceError(
            f"data.source: {data.source}: {' '.join(str(exc).split())} (check data.hf_config "
            "and data.hf_split)"
        ) from exc
    label = f"{data.source}[{data.hf_split}]"
    for i, value in enumerate(dataset, start=1):
        yield RawRecord(f"{label}: row {i}", data.source, dict(value), None, json.dumps(value))
