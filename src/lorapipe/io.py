"""Atomic outputs (temp path in the same folder, then rename) and JSONL with file:line errors."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lorapipe.errors import LorapipeError


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `final`; on success it replaces `final` in one rename.

    A crash or Ctrl-C leaves only a hidden `.NAME.tmp-PID` folder (removed when possible), never a
    half-written `final`. Same folder, so the rename never crosses file systems.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists() or final.is_symlink():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            _remove(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def jsonl_line(row: Any) -> str:
    """One JSONL line as lorapipe writes them all: sorted keys, UTF-8 as is, LF."""
    return json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"


def atomic_write_jsonl(path: Path, rows: Iterable[Any]) -> int:
    """Write one JSON object per line (UTF-8, LF, final newline) atomically; return the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(jsonl_line(row))
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


class JsonlFiles:
    """JSONL files in a folder (an `atomic_dir`'s temp folder), written a row at a time, so a
    stage never holds its rows in memory. Every name given exists on close, empty or not.

    A file may be written in numbered parts, joined in part order on close: rows that one pass
    decides in two steps (a first rule's rejections, then a second's, chunk after chunk) keep
    the order of two whole passes without either being held.
    """

    def __init__(self, folder: Path, names: Iterable[str]) -> None:
        self.folder = Path(folder)
        self._files: dict[tuple[str, int], IO[bytes]] = {}
        for name in names:
            self._file(name, 0)

    def __enter__(self) -> JsonlFiles:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        self.close(join=kind is None)

    def write(self, name: str, row: Any, part: int = 0) -> None:
        self.write_line(name, jsonl_line(row).encode("utf-8"), part)

    def write_line(self, name: str, line: bytes, part: int = 0) -> None:
        """A line already in JSONL form, ending in LF."""
        self._file(name, part).write(line)

    def _file(self, name: str, part: int) -> IO[bytes]:
        f = self._files.get((name, part))
        if f is None:
            path = self.folder / (name if part == 0 else f".{name}.part{part}")
            f = self._files[name, part] = open(path, "wb")  # noqa: SIM115 - closed in close()
        return f

    def close(self, join: bool = True) -> None:
        """Close every file; join each file's parts onto it and fsync it (unless failing)."""
        for f in self._files.values():
            f.close()
        if join:
            for (name, part), f in sorted(self._files.items()):
                if part:
                    with open(self.folder / name, "ab") as whole, open(f.name, "rb") as piece:
                        shutil.copyfileobj(piece, whole, 1 << 20)
                    os.unlink(f.name)
            for name, part in self._files:
                if not part:
                    with open(self.folder / name, "rb+") as whole:
                        os.fsync(whole.fileno())
        self._files = {}


@dataclass(frozen=True)
class Line:
    """One non-blank line of a JSONL file: its parsed object, or why it could not be parsed."""

    where: str  # "path:line", 1-based, for messages and quarantine files
    value: dict[str, Any] | None
    error: str | None
    raw: str  # the line as text; undecodable bytes shown as \\xNN so nothing is lost
    offset: int = 0  # where the line starts in the file, for `read_line_at`


_BOM = b"\xef\xbb\xbf"


class DuplicateKey(ValueError):
    """A JSON object names one key twice: which value was meant is unknowable."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)  # one C call; the loop below runs only for a broken object
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return value


# One decoder for every line: `json.loads` with a hook builds a new one per call (~6% of
# preprocess's time at 25k rows).
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def read_jsonl(path: Path) -> Iterator[Line]:
    """Yield every non-blank line of a JSONL file, tolerating a BOM, CRLF and no final newline.

    A line that is not UTF-8, not JSON, or not a JSON object comes back with `error` set instead
    of raising, so the caller decides between stopping (naming file and line) and quarantining.
    Lines are read one at a time: a 10 MB line costs 10 MB, not the file.
    """
    offset = 0
    with open(path, "rb") as f:
        for number, data in enumerate(f, start=1):
            start, offset = offset, offset + len(data)
            data = _line_bytes(data, start)
            if not data.strip():
                continue
            where = f"{path}:{number}"
            raw = data.decode("utf-8", errors="backslashreplace")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Line(where, None, f"invalid UTF-8 at byte {exc.start + 1}", raw, start)
                continue
            try:
                if text.startswith("\ufeff"):  # a BOM past line 1: json.loads's own message
                    raise json.JSONDecodeError(
                        "Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0
                    )
                value = _DECODER.decode(text)
            except json.JSONDecodeError as exc:
                yield Line(
                    where, None, f"invalid JSON: {exc.msg} at column {exc.colno}", raw, start
                )
                continue
            except DuplicateKey as exc:
                yield Line(where, None, f"duplicate key '{exc.key}' in one object", raw, start)
                continue
            if not isinstance(value, dict):
                kind = "a list" if isinstance(value, list) else f"a {type(value).__name__}"
                yield Line(where, None, f"expected a JSON object, got {kind}", raw, start)
                continue
            yield Line(where, value, None, raw, start)


def read_rows(path: Path, stage: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(offset, row) for each line of a file that the stage `stage` wrote. A line that is not a
    JSON object is an error naming it, never skipped: the file was edited or damaged."""
    for line in read_jsonl(path):
        if line.value is None:
            raise LorapipeError(
                f"{line.where}: {line.error}; `lorapipe {stage}` writes this file, so it was "
                f"edited or damaged: remake it with `dvc repro -f {stage}`"
            )
        yield line.offset, line.value


def read_line_at(f: IO[bytes], offset: int) -> bytes:
    """The line of an open JSONL file that starts at `offset` (a `Line.offset`), as `read_jsonl`
    parsed it: without a BOM or line ending."""
    f.seek(offset)
    return _line_bytes(f.readline(), offset)


def _line_bytes(data: bytes, offset: int) -> bytes:
    if offset == 0 and data.startswith(_BOM):
        data = data[len(_BOM) :]
    return data.rstrip(b"\r\n")
