"""The sanitize stage: role order, lengths after the chat template, the over-length policy, PII
scrubbing, and the stage end to end (outputs, counts that add up, one-line errors)."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from lorapipe.params import Params, load_params
from lorapipe.pii import PII_KINDS, Scrubber
from lorapipe.stages import sanitize
from lorapipe.stages.sanitize import (
    QUARANTINE,
    ChatLengths,
    SanitizeError,
    SplitReport,
    contract,
    sanitize_split,
)
from tests.helpers import REPO, collect

# Planted PII. The key is assembled at run time so that secret scanners do not flag this file.
EMAIL = "jane.doe@example.com"
PHONE = "(741) 555-4821"
API_KEY = "sk-" + "Xq7" * 16
IP = "203.0.113.7"
PII_VALUES = (EMAIL, PHONE, API_KEY, IP)
# Characters the tiny tokenizer never saw: several byte-level tokens each, so that a cut by tokens
# can fall inside a character.
WIDE = "🙂🚀 漢字テスト "
SCRUBBER = Scrubber(PII_KINDS)

Row = dict[str, Any]


@pytest.fixture(scope="module")
def shipped() -> Params:
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="module")
def lengths(tiny_model_dir: Path) -> ChatLengths:
    return ChatLengths(str(tiny_model_dir))


@pytest.fixture(scope="module")
def count(tiny_model_dir: Path) -> Callable[[Row], int]:
    """Tokens in a row as training sees it, rendered by hand (the tiny model's ChatML template)
    and counted with the `tokenizers` library: independent of lorapipe's template code."""
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))

    def tokens(row: Row) -> int:
        text = row.get("text") or "".join(
            f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in row["messages"]
        )
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return tokens


def chat(source: str, *turns: str, system: str | None = "You are helpful.") -> Row:
    """A chat row: an optional system message, then user and assistant turns alternating."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    roles = ("user", "assistant")
    messages += [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    return {"messages": messages, "meta": {"source": source}}


@dataclass
class Ran:
    """What sanitize wrote for a train split (its rows, its quarantined rows) and counted."""

    report: SplitReport
    kept: list[Row]
    quarantined: list[Row]


def run(
    rows: list[Row], shipped: Params, lengths: ChatLengths, chunk: int = 4096, **changes: Any
) -> Ran:
    params = dataclasses.replace(shipped.sanitize, **changes)
    report = SplitReport()
    files = collect(sanitize_split("train", rows, params, SCRUBBER, lengths, report, chunk))
    return Ran(report, files.get("train.jsonl", []), files.get(QUARANTINE, []))


def sources(rows: list[Row]) -> list[str]:
    return [r["meta"]["source"] for r in rows]


# --- role order -------------------------------------------------------------------------------


def roles(source: str, *messages: Any) -> Row:
    """A chat row with exactly these messages: (role, content) pairs, or anything else as is."""
    as_dicts = [{"role": m[0], "content": m[1]} if isinstance(m, tuple) else m for m in messages]
    return {"messages": as_dicts, "meta": {"source": source}}


BAD_ROWS = {
    "no messages": (roles("r:1"), "no messages"),
    "assistant first": (
        roles("r:2", ("assistant", "a"), ("user", "q")),
        "turn 1 is 'assistant', expected 'user' (user and assistant alternate)",
    ),
    "two user turns": (
        roles("r:3", ("user", "q"), ("user", "q2"), ("assistant", "a")),
        "turn 2 is 'user', expected 'assistant' (user and assistant alternate)",
    ),
    "system after the start": (
        roles("r:4", ("user", "q"), ("system", "s"), ("assistant", "a")),
        "turn 2 is 'system', expected 'assistant' (user and assistant alternate)",
    ),
    "ends with the user": (
        roles("r:5", ("user", "q"), ("assistant", "a"), ("user", "q2")),
        "the last message is not the assistant's answer",
    ),
    "only a system message": (roles("r:6", ("system", "s")), "only a system message"),
    "blank answer": (
        roles("r:7", ("user", "q"), ("assistant", " \n")),
        "a message has empty content",
    ),
    "empty system": (
        roles("r:8", ("system", ""), ("user", "q"), ("assistant", "a")),
        "a message has empty content",
    ),
    "content not a string": (
        roles("r:9", ("user", "q"), ("assistant", None)),
        "a message has empty content",
    ),
    "message not an object": (
        roles("r:10", ("user", "q"), "the answer"),
        "a message is not an object",
    ),
    "no role": (
        roles("r:11", {"content": "q"}, ("assistant", "a")),
        "turn 1 is None, expected 'user' (user and assistant alternate)",
    ),
    "blank text row": ({"text": "  ", "meta": {"source": "r:12"}}, "empty text"),
}


def test_role_order_quarantines_each_broken_row_with_its_reason(
    shipped: Params, lengths: ChatLengths
) -> None:
    good = [
        chat("g:1", "q1", "a1", "q2", "a2", "q3", "a3"),
        chat("g:2", "q", "a", system=None),
        {"text": "a plain text row", "meta": {"source": "g:3"}},
    ]
    rows = [row for row, _ in BAD_ROWS.values()] + copy.deepcopy(good)
    ran = run(rows, shipped, lengths)

    assert ran.kept == good
    assert {q["source"]: (q["split"], q["reason"], q["detail"]) for q in ran.quarantined} == {
        row["meta"]["source"]: ("train", "role_order", detail) for row, detail in BAD_ROWS.values()
    }
    assert [q["row"] for q in ran.quarantined] == [row for row, _ in BAD_ROWS.values()]
    assert ran.report.rows_in == len(ran.kept) + len(ran.quarantined) == len(rows)
    assert ran.report.metrics()["quarantined_by_reason"] == {"role_order": len(BAD_ROWS)}


def test_rows_decided_chunk_by_chunk_land_as_in_one_pass(
    shipped: Params, lengths: ChatLengths, count: Callable[[Row], int]
) -> None:
    """Rows are decided a chunk at a time (one tokenizer call each, streamed to the files):
    whatever the chunk size, the same rows in the same order, a split's quarantined rows with
    broken roles first, then those over the length limit."""
    long = chat("long", "q", "word " * 40)
    bad = [row for row, _ in BAD_ROWS.values()]
    rows = [r for i, row in enumerate(bad) for r in (row, long, chat(f"g:{i}", "q", "a"))]
    changes = {"max_tokens": count(long) - 1, "overlength": "drop"}
    whole = run(copy.deepcopy(rows), shipped, lengths, **changes)
    chunked = run(copy.deepcopy(rows), shipped, lengths, chunk=2, **changes)
    assert [q["reason"] for q in chunked.quarantined] == ["role_order"] * len(bad) + [
        "overlength"
    ] * len(bad)
    assert (chunked.kept, chunked.quarantined) == (whole.kept, whole.quarantined)
    assert chunked.report.metrics() == whole.report.metrics()


# --- lengths ------------------------------------------------------------------------------------


def test_lengths_are_tokens_after_the_chat_template_and_the_contract_matches(
    shipped: Params, lengths: ChatLengths, count: Callable[[Row], int]
) -> None:
    rows = [chat(f"c:{i}", f"question {i}?", "the answer is " + "Paris " * i) for i in range(23)]
    rows.append(chat("c:multi", "q1", "a1", "q2", "a2", system=None))
    ran = run(rows, shipped, lengths)

    expected = [count(row) for row in rows]
    assert ran.report.lengths == Counter(expected)
    # The template's role headers and end markers count: more than the contents alone.
    assert expected[0] > count({"text": "You are helpful.question 0?the answer is "}) + 6

    data = contract({"train": ran.report}, {}, shipped)
    assert data["splits"]["train"]["tokens"] == {
        "min": min(expected),
        "median": statistics.median_low(expected),  # a real row length
        # numpy's "higher" percentile; for 24 rows also the nearest rank (the 23rd length).
        "p95": int(np.percentile(expected, 95, method="higher")),
        "max": max(expected),
        "total": sum(expected),
    }
    # An odd count: the median is the middle row's (the stats come from a histogram).
    odd = contract({"train": run(rows[1:], shipped, lengths).report}, {}, shipped)
    assert odd["splits"]["train"]["tokens"]["median"] == statistics.median(expected[1:])
    assert data["schema"]["format"] == "chat"
    assert data["max_tokens"] == shipped.sanitize.max_tokens


# --- over-length policy -------------------------------------------------------------------------


def test_overlength_drop_quarantines_with_the_count_and_the_limit(
    shipped: Params, lengths: ChatLengths, count: Callable[[Row], int]
) -> None:
    short = chat("s:1", "q", "short answer")
    long = chat("s:2", "q", "a much longer answer " * 10)
    limit = count(short)  # a row exactly at the limit stays
    ran = run([short, long], shipped, lengths, max_tokens=limit, overlength="drop")

    assert sources(ran.kept) == ["s:1"]
    assert ran.report.lengths == Counter([limit])
    assert [(q["source"], q["reason"], q["detail"]) for q in ran.quarantined] == [
        (
            "s:2",
            "overlength",
            f"{count(long)} tokens after the chat template > sanitize.max_tokens {limit}",
        )
    ]
    assert ran.report.truncated == 0


@pytest.mark.parametrize(
    "answer",
    ["The capital of France is Paris. " * 12, WIDE * 8],
    ids=["ascii", "multibyte"],
)
def test_overlength_truncate_cuts_only_the_last_answer_to_fit(
    shipped: Params, lengths: ChatLengths, count: Callable[[Row], int], answer: str
) -> None:
    row = chat("t:1", "first question", "first answer", "second question", answer)
    # Every limit in a range, so that some cuts fall inside a multi-byte character.
    for limit in range(count(row) - 30, count(row)):
        ran = run([copy.deepcopy(row)], shipped, lengths, max_tokens=limit, overlength="truncate")
        assert ran.quarantined == [] and ran.report.truncated == 1, limit
        [cut] = ran.kept
        assert cut["meta"] == row["meta"], limit
        assert cut["messages"][:-1] == row["messages"][:-1], limit
        kept_answer = cut["messages"][-1]["content"]
        # A prefix of the real answer ending on a whole character: no U+FFFD.
        assert kept_answer.strip() and answer.startswith(kept_answer), (limit, kept_answer)
        assert ran.report.lengths == Counter([count(cut)]), limit
        # Fits the limit, and is cut near it (an emoji is 4 byte tokens), not to nothing.
        assert limit - 6 <= count(cut) <= limit, limit


def test_overlength_truncate_of_a_text_row_fits(
    shipped: Params, lengths: ChatLengths, count: Callable[[Row], int]
) -> None:
    text = WIDE * 8
    limits = range(10, 40)
    rows = [{"text": text, "meta": {"source": f"x:{limit}"}} for limit in limits]
    for row, limit in zip(rows, limits, strict=True):
        ran = run([row], shipped, lengths, max_tokens=limit, overlength="truncate")
        [cut] = ran.kept
        assert text.startswith(cut["text"]) and "\ufffd" not in cut["text"], limit
        assert limit - 6 <= count(cut) <= limit, limit


def test_overlength_truncate_quarantines_a_row_whose_prompt_alone_is_too_long(
    shipped: Params, lengths: ChatLengths, count: Callable[[Row], int]
) -> None:
    row = chat("p:1", "a very long question " * 20, "ok")
    limit = count(row) - 10
    ran = run([copy.deepcopy(row)], shipped, lengths, max_tokens=limit, overlength="truncate")

    assert ran.kept == [] and ran.report.truncated == 0
    assert [(q["reason"], q["detail"], q["row"]) for q in ran.quarantined] == [
        (
            "overlength",
            f"{count(row)} tokens after the chat template > sanitize.max_tokens {limit} "
            "(the prompt alone is too long to truncate the answer)",
            row,
        )
    ]


def test_overlength_error_names_the_row_and_the_fix(
    shipped: Params, lengths: ChatLengths, count: Callable[[Row], int]
) -> None:
    fits = chat("ok:1", "q", "a")
    row = chat("data/raw/pairs.jsonl:7", "q", "a long answer " * 10)
    limit = count(fits)
    expected = (
        f"data/raw/pairs.jsonl:7 (train split): {count(row)} tokens after the chat template > "
        f"sanitize.max_tokens {limit}; raise sanitize.max_tokens, or set sanitize.overlength to "
        "drop or truncate"
    )
    with pytest.raises(SanitizeError, match=f"^{re.escape(expected)}$"):
        run([fits, row], shipped, lengths, max_tokens=limit, overlength="error")


# --- PII ----------------------------------------------------------------------------------------


def pii_rows() -> list[Row]:
    return [
        chat("pii:1", f"Mail {EMAIL} or call {PHONE}.", f"Use the key {API_KEY} from {IP}."),
        chat("clean:1", "What is the capital of France?", "Paris."),
        {"text": f"Contact: {EMAIL}", "meta": {"source": "pii:2"}},
    ]


def test_pii_redact_replaces_values_with_placeholders_and_counts_kinds(
    shipped: Params, lengths: ChatLengths
) -> None:
    ran = run(pii_rows(), shipped, lengths, pii_action="redact")

    assert ran.quarantined == []
    first, clean, text = ran.kept
    assert [m["content"] for m in first["messages"]] == [
        "You are helpful.",
        "Mail [EMAIL] or call [PHONE].",
        "Use the key [API_KEY] from [IP_ADDRESS].",
    ]
    assert clean == pii_rows()[1]
    assert text["text"] == "Contact: [EMAIL]"
    assert ran.report.pii_found == Counter(email=2, phone=1, api_key=1, ip_address=1)
    assert ran.report.metrics()["rows_with_pii"] == 2
    kept = json.dumps(ran.kept)
    assert not [value for value in PII_VALUES if value in kept]


def test_pii_drop_quarantines_the_row_naming_the_kinds(
    shipped: Params, lengths: ChatLengths
) -> None:
    ran = run(pii_rows(), shipped, lengths, pii_action="drop")

    assert ran.kept == [pii_rows()[1]]
    assert [(q["source"], q["reason"], q["detail"]) for q in ran.quarantined] == [
        ("pii:1", "pii", "contains api_key, email, ip_address, phone"),
        ("pii:2", "pii", "contains email"),
    ]
    assert ran.report.pii_found == Counter(email=2, phone=1, api_key=1, ip_address=1)
    assert ran.report.rows_in == len(ran.kept) + len(ran.quarantined)
    quarantined = json.dumps(ran.quarantined)
    assert "[EMAIL]" in quarantined
    assert not [value for value in PII_VALUES if value in quarantined]


# --- the stage end to end -----------------------------------------------------------------------


def project(tmp_path: Path, shipped: Params, base: Path, **sanitize_changes: Any) -> Params:
    """Params whose data paths all point into tmp_path (how bench/data.py runs the stages)."""
    paths = dataclasses.replace(
        shipped.paths,
        base=str(base),
        split=str(tmp_path / "split"),
        sanitized=str(tmp_path / "sanitized"),
        metrics=str(tmp_path / "metrics"),
        reports=str(tmp_path / "reports"),
    )
    sanitize_params = dataclasses.replace(shipped.sanitize, **sanitize_changes)
    return dataclasses.replace(shipped, paths=paths, sanitize=sanitize_params)


def write_splits(params: Params, splits: dict[str, list[Row]]) -> None:
    folder = Path(params.paths.split)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_lines(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_main_writes_the_splits_quarantine_contract_and_report(
    tmp_path: Path,
    shipped: Params,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = project(tmp_path, shipped, tiny_model_dir)
    limit = shipped.sanitize.max_tokens
    splits = {
        "train": [chat(f"train:{i}", f"question {i}", f"answer {i}") for i in range(5)]
        + [
            chat("train:pii", f"Write to {EMAIL} at {IP}", f"Call {PHONE}; key {API_KEY}"),
            chat("train:long", "q", "word " * (limit + 10)),
            roles("train:roles", ("assistant", "a"), ("user", "q")),
        ],
        "valid": [chat("valid:0", "q", "a"), chat("valid:1", "q2", "a2")],
        "test": [chat("test:0", "q", "a"), chat("test:1", "q", "a", "q2")],
    }
    write_splits(params, splits)
    sanitize.main(params)

    out = Path(params.paths.sanitized)
    assert sorted(p.name for p in out.iterdir()) == [
        "quarantine.jsonl",
        "test.jsonl",
        "train.jsonl",
        "valid.jsonl",
    ]
    # Written atomically: no temp folders or files left beside the outputs.
    assert not [p for p in tmp_path.rglob(".*") if "tmp" in p.name]
    data = json.loads((tmp_path / "metrics" / "data.json").read_text())
    for name, rows in splits.items():
        kept = read_lines(out / f"{name}.jsonl")
        split = data["splits"][name]
        assert split["rows_in"] == len(rows) == split["rows"] + split["quarantined"], name
        assert split["rows"] == len(kept), name
    assert sources(read_lines(out / "train.jsonl")) == [f"train:{i}" for i in range(5)] + [
        "train:pii"
    ]
    assert data["splits"]["train"]["quarantined_by_reason"] == {
        "overlength": 1,
        "role_order": 1,
    }
    quarantine = read_lines(out / "quarantine.jsonl")
    assert [(q["split"], q["source"], q["reason"]) for q in quarantine] == [
        ("train", "train:roles", "role_order"),
        ("train", "train:long", "overlength"),
        ("test", "test:1", "role_order"),
    ]
    assert data["pii_found"] == {"email": 1, "phone": 1, "api_key": 1, "ip_address": 1}
    assert data["files"]["train"] == f"{out}/train.jsonl"

    # Counts only, never values: not in the contract, the report or the console.
    report = (tmp_path / "reports" / "data.md").read_text()
    printed = capsys.readouterr().out
    for text in (json.dumps(data), report, printed, (out / "train.jsonl").read_text()):
        assert not [value for value in PII_VALUES if value in text]
    assert "| sanitize (train) | 8 | 6 | 2 quarantined, 0 truncated |" in report
    assert "| sanitize: overlength | 1 |" in report
    assert "| sanitize: role_order | 2 |" in report
    assert "| email | 1 |" in report

    # A second run replaces the outputs with the same bytes.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    sanitize.main(params)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_split_left_empty_is_an_error_naming_the_split_counts_and_params(
    tmp_path: Path, shipped: Params, tiny_model_dir: Path, count: Callable[[Row], int]
) -> None:
    short = chat("train:0", "q", "a", system=None)
    params = project(tmp_path, shipped, tiny_model_dir, max_tokens=count(short), overlength="drop")
    write_splits(
        params,
        {
            "train": [short],
            "valid": [
                chat("valid:0", "a longer question", "a longer answer"),
                chat("valid:1", "another question", "another answer"),
                roles("valid:2", ("user", "q")),
            ],
            "test": [short],
        },
    )
    expected = (
        "sanitize: no valid rows left of 3 (quarantined by reason: {'role_order': 1, "
        "'overlength': 2}); loosen the rule that removes them (sanitize.max_tokens, "
        "sanitize.overlength, sanitize.pii_action)"
    )
    with pytest.raises(SanitizeError, match=f"^{re.escape(expected)}$"):
        sanitize.main(params)
    # Nothing half-written: no sanitized folder, contract or report.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]


def test_a_missing_split_file_names_the_stage_that_makes_it(
    tmp_path: Path, shipped: Params, tiny_model_dir: Path
) -> None:
    params = project(tmp_path, shipped, tiny_model_dir)
    write_splits(params, {"train": [chat("train:0", "q", "a")]})
    missing = tmp_path / "split" / "valid.jsonl"
    with pytest.raises(
        SanitizeError,
        match=f"^{re.escape(f'{missing}: not found; run `dvc repro split` (it makes this file)')}$",
    ):
        sanitize.main(params)
