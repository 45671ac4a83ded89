from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorapipe.io import JsonlFiles, atomic_dir, atomic_write_jsonl, read_jsonl


def lines(path: Path) -> list[tuple[str, object, str | None]]:
    return [(line.where.rsplit(":", 1)[1], line.value, line.error) for line in read_jsonl(path)]


def test_bom_crlf_blank_lines_and_no_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n   \n{"a": 2}\r\n{"a": 3}')
    assert lines(path) == [("1", {"a": 1}, None), ("4", {"a": 2}, None), ("5", {"a": 3}, None)]


def test_bad_lines_come_back_with_their_line_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": \n[1, 2]\n"text"\n{"a": "caf\xe9"}\n{"a": 6}\n')
    got = list(read_jsonl(path))
    assert [(line.where, line.error) for line in got] == [
        (f"{path}:1", None),
        (f"{path}:2", "invalid JSON: Expecting value at column 7"),
        (f"{path}:3", "expected a JSON object, got a list"),
        (f"{path}:4", "expected a JSON object, got a str"),
        (f"{path}:5", "invalid UTF-8 at byte 11"),
        (f"{path}:6", None),
    ]
    # Nothing is lost: the undecodable line is kept, its bad byte escaped.
    assert got[4].raw == '{"a": "caf\\xe9"}'


def test_a_10_mb_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    big = "x" * 10_000_000
    path.write_text(json.dumps({"text": big}) + "\n" + json.dumps({"text": "small"}) + "\n")
    got = list(read_jsonl(path))
    assert len(got) == 2 and got[0].value == {"text": big} and got[1].value == {"text": "small"}


def test_atomic_jsonl_round_trips_unicode(tmp_path: Path) -> None:
    rows = [{"t": "東京 😀 \u2028 line"}, {"t": "b"}]
    assert atomic_write_jsonl(tmp_path / "o.jsonl", rows) == 2
    assert [line.value for line in read_jsonl(tmp_path / "o.jsonl")] == rows
    assert [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]


def test_atomic_dir_leaves_the_old_output_when_interrupted(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise KeyboardInterrupt
    assert (final / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_bom_past_the_first_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\xef\xbb\xbf{"a": 2}\n')
    assert lines(path)[1] == (
        "2",
        None,
        "invalid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) at column 1",
    )


def test_jsonl_files_join_parts_in_order_and_write_what_atomic_write_jsonl_writes(
    tmp_path: Path,
) -> None:
    rows = [{"t": "東京", "b": 1}, {"t": "b"}, {"t": "c"}]
    atomic_write_jsonl(tmp_path / "whole.jsonl", rows)
    with JsonlFiles(tmp_path, ["x.jsonl", "empty.jsonl"]) as files:
        files.write("x.jsonl", rows[2], part=1)  # a later part, written first
        files.write("x.jsonl", rows[0])
        files.write("x.jsonl", rows[1])
    assert (tmp_path / "x.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "whole.jsonl", "x.jsonl"]
    assert (tmp_path / "empty.jsonl").read_bytes() == b""
