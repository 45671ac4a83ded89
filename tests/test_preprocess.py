from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lorapipe.datasource import DataSourceError, read_source
from lorapipe.params import Params, RatioLimit, load_params
from lorapipe.stages.preprocess import (
    CHUNK,
    QUARANTINE,
    REJECTED,
    ROWS,
    Outcome,
    PreprocessError,
    preprocess,
)
from tests.helpers import REPO, collect, set_params


@pytest.fixture(scope="module")
def shipped() -> Params:
    return load_params(REPO / "params.yaml")


def chars(texts: list[str]) -> list[int]:
    """Token counter stand-in where a test is about the rules, not the tokenizer."""
    return [len(t) for t in texts]


@dataclass
class Ran:
    """What preprocess wrote (each file's rows) and counted."""

    outcome: Outcome
    files: dict[str, list[Any]]

    @property
    def kept(self) -> list[Any]:
        return self.files.get(ROWS, [])

    @property
    def rejected(self) -> list[Any]:
        return self.files.get(REJECTED, [])

    @property
    def quarantined(self) -> list[Any]:
        return self.files.get(QUARANTINE, [])


def run(
    source: Path | str,
    shipped: Params,
    count: Callable[[list[str]], list[int]] = chars,
    data: dict[str, Any] | None = None,
    pre: dict[str, Any] | None = None,
    chunk: int = CHUNK,
) -> Ran:
    data_params = dataclasses.replace(shipped.data, source=str(source), **(data or {}))
    pre_params = dataclasses.replace(shipped.preprocess, **(pre or {}))
    outcome = Outcome()
    events = preprocess(read_source(data_params), data_params, pre_params, count, outcome, chunk)
    return Ran(outcome, collect(events))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_completions_become_chat_rows_with_their_source(tmp_path: Path, shipped: Params) -> None:
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"id": "a", "kind": "nl", "input": "a long input text here", "output": "short"}],
    )
    ran = run(path, shipped, data={"prompt_template": "Compress:\n{prompt}"})
    assert ran.kept == [
        {
            "messages": [
                {"role": "system", "content": shipped.data.system_prompt},
                {"role": "user", "content": "Compress:\na long input text here"},
                {"role": "assistant", "content": "short"},
            ],
            "meta": {"source": f"{path}:1", "id": "a", "kind": "nl"},
        }
    ]


def test_artifacts_are_stripped_and_an_empty_answer_is_rejected(
    tmp_path: Path, shipped: Params
) -> None:
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"input": "x" * 50, "output": "<think>\nhmm\n</think>\n\nthe answer"},
            {"input": "x" * 50, "output": '<tool_call>\n{"name": "f"}\n</tool_call>\nanswer 2'},
            {"input": "x" * 50, "output": "<think>only thinking</think>"},
        ],
    )
    ran = run(path, shipped)
    assert [r["messages"][-1]["content"] for r in ran.kept] == ["the answer", "answer 2"]
    assert [(r["source"], r["reason"]) for r in ran.rejected] == [
        (f"{path}:3", "empty_after_strip")
    ]
    assert sum(ran.outcome.stripped.values()) == 3


def test_ratio_limits_per_file_in_chars_and_tokens(tmp_path: Path, shipped: Params) -> None:
    row = {"input": "0123456789", "output": "012345678"}  # 0.9 chars
    nl = write_jsonl(tmp_path / "nl_pairs.jsonl", [row])
    code = write_jsonl(tmp_path / "code_pairs.jsonl", [row])
    limits = (
        RatioLimit("nl_*", max_char_ratio=0.85, max_token_ratio=None),
        RatioLimit("*", max_char_ratio=1.0, max_token_ratio=0.5),
    )
    ran = run(tmp_path / "*.jsonl", shipped, pre={"ratio_limits": limits})
    assert sorted((r["source"], r["reason"]) for r in ran.rejected) == [
        (f"{code}:1", "token_ratio"),
        (f"{nl}:1", "char_ratio"),
    ]
    assert run(tmp_path / "*.jsonl", shipped, pre={"ratio_limits": ()}).kept[1]["meta"] == {
        "source": f"{nl}:1"
    }


def test_token_ratio_uses_the_tokenizer(tiny_model_dir: Path, tmp_path: Path, shipped: Params):
    from lorapipe.tokens import BaseTokenizer

    tokenizer = BaseTokenizer(tiny_model_dir)
    # Same characters, very different token counts: digits the tiny BPE learned vs. rare bytes.
    path = write_jsonl(tmp_path / "p.jsonl", [{"input": "0123456789" * 3, "output": "ŧ€ʬ" * 3}])
    limits = (RatioLimit("*", max_char_ratio=None, max_token_ratio=1.0),)
    ran = run(path, shipped, tokenizer.count, pre={"ratio_limits": limits})
    assert [r["reason"] for r in ran.rejected] == ["token_ratio"]


BAD_LINES = [
    (b'{"input": "x", "output": 3}', "wrong_type"),
    (b'{"input": "x"}', "missing_field"),
    (b'{"input": "  ", "output": "y"}', "empty_field"),
    (b'{"input": "x", "output": ', "invalid_json"),
    (b'["input", "output"]', "not_object"),
    (b'{"input": "\xff", "output": "y"}', "invalid_utf8"),
    (b'{"input": "x", "output": "y", "input": "z"}', "duplicate_key"),
    (b'{"input": "a NUL \\u0000 here", "output": "y"}', "control_character"),
    (b'{"input": "an escape \\u001b[31m", "output": "y"}', "control_character"),
]


def test_malformed_lines_are_quarantined_with_reason_and_nothing_is_lost(
    tmp_path: Path, shipped: Params
) -> None:
    good = b'{"input": "a long enough input", "output": "short"}'
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\n".join([good, *(line for line, _ in BAD_LINES), b"", good]))
    ran = run(path, shipped)
    assert len(ran.kept) == 2
    assert [(q["source"], q["reason"]) for q in ran.quarantined] == [
        (f"{path}:{i}", reason) for i, (_, reason) in enumerate(BAD_LINES, start=2)
    ]
    metrics = ran.outcome.metrics()
    total = 2 + len(BAD_LINES)
    assert (
        metrics["rows_in"]
        == total
        == metrics["kept"] + metrics["rejected"] + metrics["quarantined"]
    )


def test_on_error_raise_names_file_line_and_fix(tmp_path: Path, shipped: Params) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"input": "a long enough input", "output": "short"}\n{"input": "x"}\n')
    with pytest.raises(PreprocessError) as info:
        run(path, shipped, pre={"on_error": "raise"})
    assert str(info.value) == (
        f"{path}:2: field 'output' (data.fields.completion) is missing; the row has: input; fix "
        "the record, or set preprocess.on_error: quarantine to set it aside"
    )


def test_chat_format_with_a_field_map(tmp_path: Path, shipped: Params) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"conv": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"conv": [{"role": "robot", "content": "hi"}]},
            {"conv": "not a list"},
        ],
    )
    fields = dataclasses.replace(shipped.data.fields, messages="conv")
    ran = run(
        path,
        shipped,
        data={"format": "chat", "fields": fields, "system_prompt": None},
        pre={"ratio_limits": ()},
    )
    assert ran.kept[0]["messages"][0] == {"role": "user", "content": "hi"}
    assert [q["reason"] for q in ran.quarantined] == ["bad_role", "wrong_type"]


def test_text_format_and_csv_json_parquet_sources(tmp_path: Path, shipped: Params) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": "first text"}, {"body": "second text"}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    with open(tmp_path / "c.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["body"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    fields = dataclasses.replace(shipped.data.fields, text="body")
    ran = run(tmp_path, shipped, data={"format": "text", "fields": fields})
    assert [r["text"] for r in ran.kept] == ["first text", "second text"] * 4
    assert [r["meta"]["source"] for r in ran.kept[4:6]] == [
        f"{tmp_path / 'c.csv'}:2",
        f"{tmp_path / 'c.csv'}:3",
    ]


def test_missing_or_empty_sources_are_one_line_errors(tmp_path: Path, shipped: Params) -> None:
    with pytest.raises(DataSourceError, match="does not exist"):
        run(tmp_path / "nope.jsonl", shipped)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="contains no .jsonl"):
        run(tmp_path / "empty", shipped)


def test_demo_data_counts_match_its_manifest(shipped: Params) -> None:
    """The shipped demo data has each defect at a known count; preprocess finds exactly those."""
    manifest = json.loads((REPO / "data" / "raw" / "manifest.json").read_text())["files"]
    limits = tuple(
        dataclasses.replace(r, max_token_ratio=None) for r in shipped.preprocess.ratio_limits
    )
    outcome = run(REPO / "data/raw/*.jsonl", shipped, pre={"ratio_limits": limits}).outcome
    m = outcome.metrics()
    total = lambda key: sum(f[key] for f in manifest.values())  # noqa: E731
    defect = lambda key: sum(f["defects"][key]["count"] for f in manifest.values())  # noqa: E731
    malformed = sum(f["malformed"]["count"] for f in manifest.values())
    assert m["rows_in"] == total("rows") + malformed
    assert m["rows_in"] == m["kept"] + m["rejected"] + m["quarantined"]
    assert m["quarantined"] == malformed + defect("empty")
    assert m["rejected_by_reason"] == {"char_ratio": defect("ratio")}
    assert sum(outcome.stripped.values()) == defect("think") + defect("tool_call")


def test_rows_decided_chunk_by_chunk_land_as_in_one_pass(tmp_path: Path, shipped: Params) -> None:
    """Rows are decided a chunk at a time (one tokenizer call each, streamed to the files):
    whatever the chunk size, each file holds the same rows in the same order, rejected.jsonl
    the strip rule's rejections first, then the ratio limits'."""
    outputs = ("ok", "<think>all</think>", "y" * 30) * 3
    rows = [{"input": "x" * 20, "output": output} for output in outputs]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    chunked = run(path, shipped, chunk=2)
    assert [(r["source"], r["reason"]) for r in chunked.rejected] == [
        *((f"{path}:{i}", "empty_after_strip") for i in (2, 5, 8)),
        *((f"{path}:{i}", "char_ratio") for i in (3, 6, 9)),
    ]
    for source in (path, REPO / "data/raw/*.jsonl"):
        whole, chunked = run(source, shipped, chunk=10**9), run(source, shipped, chunk=3)
        assert chunked.files == whole.files
        assert chunked.outcome.metrics() == whole.outcome.metrics()


def hub_project(project: Path, tiny_model_dir: Path, cache: Path, revision: str | None) -> None:
    """A project whose data.source is a Hub dataset id, served from a local Hub cache."""
    import shutil

    sha = "89abcdef" * 5
    snapshot = cache / "datasets--someorg--pairs" / "snapshots" / sha
    (snapshot / "data").mkdir(parents=True)
    rows = [{"input": f"a fairly long request number {i}", "output": f"req {i}"} for i in range(6)]
    write_jsonl(snapshot / "data" / "train.jsonl", rows)
    (snapshot / "loader.py").write_text("raise SystemExit('dataset code must never run')\n")
    (cache / "datasets--someorg--pairs" / "refs").mkdir()
    (cache / "datasets--someorg--pairs" / "refs" / "main").write_text(sha)
    shutil.copytree(tiny_model_dir, project / "models" / "base")
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    set_params(project, **{"data.source": "someorg/pairs", "data.revision": revision})


@pytest.mark.parametrize("revision", ["main", None])
def test_a_hub_dataset_at_a_pinned_revision_offline(
    tmp_path: Path, tiny_model_dir: Path, revision: str | None
) -> None:
    import os
    import subprocess
    import sys

    cache = tmp_path / "hf-cache"
    hub_project(tmp_path, tiny_model_dir, cache, revision)
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "ds-cache"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "lorapipe.cli", "preprocess"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if revision is None:
        assert result.returncode == 1
        assert "data.revision: is null" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    kept = (tmp_path / "data" / "preprocessed" / "rows.jsonl").read_text().splitlines()
    assert len(kept) == 6
    assert json.loads(kept[0])["meta"]["source"] == "someorg/pairs[train]: row 1"

    # An id that is in no cache, offline: one line that says what to do.
    set_params(tmp_path, **{"data.source": "nobody/nothing"})
    missing = subprocess.run(
        [sys.executable, "-m", "lorapipe.cli", "preprocess"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1
    assert "nobody/nothing@main is not in the local Hugging Face cache" in missing.stderr


def test_a_split_left_empty_is_an_error_naming_it(tmp_path: Path, monkeypatch) -> None:
    import shutil

    from lorapipe.stages import split
    from lorapipe.stages.split import SplitError

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q {i}"},
                {"role": "assistant", "content": "a"},
            ],
            "meta": {"source": f"f:{i}", "kind": "nl"},
        }
        for i in range(3)
    ]
    (tmp_path / "data" / "preprocessed").mkdir(parents=True)
    write_jsonl(tmp_path / "data" / "preprocessed" / "rows.jsonl", rows)
    with pytest.raises(SplitError, match=r"split: '(valid|test)' would be empty \(3 rows"):
        split.main(load_params("params.yaml"))
    assert not (tmp_path / "data" / "split").exists()


def test_errors_name_the_key_the_columns_and_the_character(tmp_path: Path, shipped: Params) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        b'{"document": "d", "summary": "s"}\n'
        b'{"input": "x", "output": "y", "output": "z"}\n'
        b'{"input": "tab\\tand\\nnewline are text", "output": "a \\u0000 b"}\n'
    )
    details = {q["source"]: q["detail"] for q in run(path, shipped).quarantined}
    assert details == {
        f"{path}:1": "field 'input' (data.fields.prompt) is missing; the row has: document, "
        "summary",
        f"{path}:2": "duplicate key 'output' in one object",
        f"{path}:3": "field 'output' has the control character U+0000 at character 3",
    }


def test_a_csv_record_spanning_lines_is_named_by_its_first_line(
    tmp_path: Path, shipped: Params
) -> None:
    path = tmp_path / "p.csv"
    path.write_text('input,output\n"a long\nmulti-line\ninput",short\n\n"x",y,extra\n')
    ran = run(path, shipped, pre={"ratio_limits": ()})
    assert [r["meta"]["source"] for r in ran.kept] == [f"{path}:2"]
    assert [(q["source"], q["reason"]) for q in ran.quarantined] == [(f"{path}:6", "bad_csv_row")]


def test_on_error_raise_stops_at_a_conversation_out_of_order(
    tmp_path: Path, shipped: Params
) -> None:
    """Role order is checked where the line is read, so `raise` stops there too."""
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "hello"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    chat = {"format": "chat", "system_prompt": None}
    assert [q["reason"] for q in run(path, shipped, data=chat).quarantined] == ["role_order"]
    with pytest.raises(PreprocessError, match=r"chat.jsonl:1: turn 2 is 'user', expected"):
        run(path, shipped, data=chat, pre={"on_error": "raise"})
