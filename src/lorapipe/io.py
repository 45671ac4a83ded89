"""Atomic outputs (temp path in the same folder, then rename) and JSONL with file:line errors."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


def atomic_write_jsonl(path: Path, rows: Iterable[Any]) -> int:
    """Write one JSON object per line (UTF-8, LF, final newline) atomically; return the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


@dataclass(frozen=True)
class Line:
    """One non-blank line of a JSONL file: its parsed object, or why it could not be parsed."""

    where: str  # "path:line", 1-based, for messages and quarantine files
    value: dict[str, Any] | None
    error: str | None
    raw: str  # the line as text; undecodable bytes shown as \\xNN so nothing is lost


_BOM = b"\xef\xbb\xbf"


class DuplicateKey(ValueError):
    """A JSON object names one key twice: which value was meant is unknowable."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise DuplicateKey(key)
        value[key] = item
    return value


def read_jsonl(path: Path) -> Iterator[Line]:
    """Yield every non-blank line of a JSONL file, tolerating a BOM, CRLF and no final newline.

    A line that is not UTF-8, not JSON, or not a JSON object comes back with `error` set instead
    of raising, so the caller decides between stopping (naming file and line) and quarantining.
    Lines are read one at a time: a 10 MB line costs 10 MB, not the file.
    """
    with open(path, "rb") as f:
        for number, data in enumerate(f, start=1):
            if number == 1 and data.startswith(_BOM):
                data = data[len(_BOM) :]
            data = data.rstrip(b"\r\n")
            if not data.strip():
                continue
            where = f"{path}:{number}"
            raw = data.decode("utf-8", errors="backslashreplace")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Line(where, None, f"invalid UTF-8 at byte {exc.start + 1}", raw)
                continue
            try:
                value = json.loads(text, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as exc:
                yield Line(where, None, f"invalid JSON: {exc.msg} at column {exc.colno}", raw)
                continue
            except DuplicateKey as exc:
                yield Line(where, None, f"duplicate key '{exc.key}' in one object", raw)
                continue
            if not isinstance(value, dict):
                kind = "a list" if isinstance(value, list) else f"a {type(value).__name__}"
                yield Line(where, None, f"expected a JSON object, got {kind}", raw)
                continue
            yield Line(where, value, None, raw)
