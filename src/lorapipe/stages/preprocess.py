"""`preprocess` stage: raw records -> one internal schema, artifacts stripped, ratio-filtered.

Every raw record ends in exactly one of three files, so rows in = kept + rejected + quarantined:
  rows.jsonl        kept rows: {"messages": [...], "meta": {"source": "file:line", ...}}
                    (format `text`: {"text": ..., "meta": ...})
  rejected.jsonl    well-formed rows a rule filtered out, with the reason
  quarantine.jsonl  malformed records (bad UTF-8, bad JSON, wrong types, empty fields)

Records are read, decided and written a chunk at a time (`CHUNK` rows, one tokenizer call), so
memory does not grow with the data: a million rows are read in the memory of a few thousand.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorapipe.datasource import RawRecord, check_tracked, read_source
from lorapipe.errors import LorapipeError
from lorapipe.io import JsonlFiles, atomic_dir, atomic_write_json
from lorapipe.params import DataParams, Params, PreprocessParams, RatioLimit
from lorapipe.schema import ROLES, control_character, role_problem
from lorapipe.tokens import count_ahead

PARAMS = ("data", "preprocess")


class PreprocessError(LorapipeError):
    """A malformed record under `on_error: raise`, or nothing left to train on."""


# Rows per tokenizer call: enough that a call keeps the Rust tokenizer's threads busy and its
# overhead is nothing, few enough that a chunk's rows are a few MB. Not tuned beyond that.
CHUNK = 4096
ROWS, REJECTED, QUARANTINE = "rows.jsonl", "rejected.jsonl", "quarantine.jsonl"
# Where a row goes: (file, part, row). rejected.jsonl lists the rules' rejections rule by rule,
# each in input order: part 0 is empty_after_strip, part 1 the ratio limits.
Event = tuple[str, int, dict[str, Any]]


@dataclass
class Outcome:
    """The counts of a preprocess run; the rows themselves go to the files as they are decided."""

    kept: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # by reason
    quarantined: Counter[str] = field(default_factory=Counter)  # by reason
    stripped: Counter[str] = field(default_factory=Counter)
    system_prompt_added: int = 0  # rows given data.system_prompt as their system turn
    kept_fields: Counter[str] = field(default_factory=Counter)  # rows carrying each keep_field
    # The first quarantined and the first rejected record, for the error when none is kept.
    first: dict[str, dict[str, Any]] = field(default_factory=dict)

    def count(self, event: Event) -> Event:
        name, _, item = event
        if name == ROWS:
            self.kept += 1
        else:
            (self.quarantined if name == QUARANTINE else self.rejected)[item["reason"]] += 1
            self.first.setdefault(name, item)
        return event

    def metrics(self) -> dict[str, Any]:
        rejected, quarantined = self.rejected.total(), self.quarantined.total()
        return {
            "rows_in": self.kept + rejected + quarantined,
            "kept": self.kept,
            "rejected": rejected,
            "quarantined": quarantined,
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "quarantined_by_reason": dict(sorted(self.quarantined.items())),
            "artifacts_stripped": dict(sorted(self.stripped.items())),
            "system_prompt_added": self.system_prompt_added,
            "keep_fields_found": dict(sorted(self.kept_fields.items())),
        }


class Malformed(Exception):
    """A record that does not fit the schema; `reason` is the category counted in metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def preprocess(
    records: Iterable[RawRecord],
    data: DataParams,
    params: PreprocessParams,
    count_tokens: Any,
    outcome: Outcome,
    chunk: int = CHUNK,
) -> Iterator[Event]:
    """Normalize, strip and filter `records`, one chunk at a time: each record's (file, part,
    row), counted in `outcome`. `count_tokens(texts) -> lengths` (batched)."""
    batches = _first_pass(records, data, params, outcome, chunk)
    for (events, candidates, sides, limits, needs_tokens), lengths in count_ahead(
        batches, count_tokens
    ):
        yield from map(outcome.count, events)
        token_sides = {i: (lengths[2 * k], lengths[2 * k + 1]) for k, i in enumerate(needs_tokens)}
        for i, row in enumerate(candidates):
            verdict = _ratio_verdict(sides[i], token_sides.get(i), limits[i])
            if verdict is None:
                yield outcome.count((ROWS, 0, row))
            else:
                yield outcome.count((REJECTED, 1, _rejection(row, *verdict)))


def _first_pass(
    records: Iterable[RawRecord],
    data: DataParams,
    params: PreprocessParams,
    outcome: Outcome,
    chunk: int,
) -> Iterator[tuple[Any, list[str]]]:
    """Chunks of records read, normalized and stripped: the rows set aside so far, the
    candidates for the ratio limits, and the texts to count tokens of (two per row that has a
    token limit and passes its char limit)."""
    patterns = [re.compile(p) for p in params.strip_patterns]
    events: list[Event] = []
    candidates: list[dict[str, Any]] = []
    files: list[str] = []
    for record in records:
        try:
            if record.error is not None or record.value is None:
                raise Malformed(_reason_of(record.error), record.error or "unreadable")
            row, added = normalize(record.value, data)
        except Malformed as exc:
            if params.on_error == "raise":
                raise PreprocessError(
                    f"{record.where}: {exc}; fix the record, or set preprocess.on_error: "
                    "quarantine to set it aside"
                ) from exc
            quarantined = {
                "source": record.where,
                "reason": exc.reason,
                "detail": str(exc),
                "raw": record.raw,
            }
            events.append((QUARANTINE, 0, quarantined))
            continue
        kept = _kept_fields(record.value, data)
        outcome.kept_fields.update(kept.keys())
        outcome.system_prompt_added += added
        row["meta"] = {"source": record.where, **kept}
        if _strip_artifacts(row, patterns, outcome.stripped):
            rejection = _rejection(
                row,
                "empty_after_strip",
                "the output is empty once the generation artifacts are removed",
            )
            events.append((REJECTED, 0, rejection))
            continue
        candidates.append(row)
        files.append(record.file)
        if len(candidates) == chunk:
            yield _batch(events, candidates, files, params)
            events, candidates, files = [], [], []
    yield _batch(events, candidates, files, params)


def _batch(
    events: list[Event],
    candidates: list[dict[str, Any]],
    files: list[str],
    params: PreprocessParams,
) -> tuple[Any, list[str]]:
    sides = [_sides(row) for row in candidates]
    limits = [_limit_for(file, params.ratio_limits) for file in files]
    needs_tokens = [i for i, limit in enumerate(limits) if limit and limit.max_token_ratio]
    texts = [text for i in needs_tokens for text in sides[i]]
    return (events, candidates, sides, limits, needs_tokens), texts


def normalize(value: dict[str, Any], data: DataParams) -> tuple[dict[str, Any], bool]:
    """One raw record -> lorapipe's schema, and whether data.system_prompt was added to it;
    Malformed if it does not fit `data.format`."""
    fields = data.fields
    if data.format == "text":
        return {"text": _text_field(value, "text", fields.text)}, False
    system, default = data.system_prompt, True
    if fields.system is not None and fields.system in value:
        system, default = _text_field(value, "system", fields.system), False
    if data.format == "completions":
        prompt = _text_field(value, "prompt", fields.prompt)
        completion = _text_field(value, "completion", fields.completion)
        messages = [
            {"role": "user", "content": data.prompt_template.replace("{prompt}", prompt)},
            {"role": "assistant", "content": completion},
        ]
    else:
        messages = _messages_field(value, fields.messages)
    added = False
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
        added = True
    row = {"messages": messages}
    problem = role_problem(row)
    if problem is not None:
        raise Malformed("role_order", problem)
    return row, added and default


def _missing(value: dict[str, Any], field: str, name: str) -> Malformed:
    """The error for a column that is not there: which param names it, and what the row has."""
    return Malformed(
        "missing_field",
        f"field '{name}' (data.fields.{field}) is missing; the row has: "
        f"{', '.join(map(str, value)) or 'no fields'}",
    )


def _text_field(value: dict[str, Any], field: str, name: str) -> str:
    if name not in value:
        raise _missing(value, field, name)
    text = value[name]
    if not isinstance(text, str):
        raise Malformed("wrong_type", f"field '{name}' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise Malformed("empty_field", f"field '{name}' is empty")
    control = control_character(text)
    if control is not None:
        raise Malformed("control_character", f"field '{name}' has {control}")
    return text


def _messages_field(value: dict[str, Any], name: str) -> list[dict[str, str]]:
    if name not in value:
        raise _missing(value, "messages", name)
    messages = value[name]
    if not isinstance(messages, list) or not messages:
        raise Malformed("wrong_type", f"field '{name}' must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise Malformed(
                "wrong_type", f"{name}[{i}] must be an object with 'role' and 'content'"
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise Malformed("bad_role", f"{name}[{i}].role is {role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise Malformed("wrong_type", f"{name}[{i}].content must be a string")
        if not content.strip():
            raise Malformed("empty_field", f"{name}[{i}].content is empty")
        control = control_character(content)
        if control is not None:
            raise Malformed("control_character", f"{name}[{i}].content has {control}")
        out.append({"role": role, "content": content})
    return out


def _kept_fields(value: dict[str, Any], data: DataParams) -> dict[str, Any]:
    return {name: value[name] for name in data.keep_fields if name in value}


def _strip_artifacts(
    row: dict[str, Any], patterns: list[re.Pattern[str]], seen: Counter[str]
) -> bool:
    """Remove generation artifacts from the outputs; True if an output is left empty."""
    if "text" in row:
        return False
    for message in row["messages"]:
        if message["role"] != "assistant":
            continue
        content = message["content"]
        for pattern in patterns:
            content, n = pattern.subn("", content)
            if n:
                seen[pattern.pattern] += 1
        if content != message["content"]:
            message["content"] = content.strip()
        if not message["content"].strip():
            return True
    return False


def _sides(row: dict[str, Any]) -> tuple[str, str]:
    """(input, output) text for ratio limits: the user turns and the assistant turns."""
    if "text" in row:
        return row["text"], row["text"]
    user = "\n".join(m["content"] for m in row["messages"] if m["role"] == "user")
    assistant = "\n".join(m["content"] for m in row["messages"] if m["role"] == "assistant")
    return user, assistant


def _limit_for(file: str, limits: tuple[RatioLimit, ...]) -> RatioLimit | None:
    return next((limit for limit in limits if fnmatch.fnmatch(file, limit.files)), None)


def _ratio_verdict(
    chars: tuple[str, str], tokens: tuple[int, int] | None, limit: RatioLimit | None
) -> tuple[str, str] | None:
    if limit is None:
        return None
    if limit.max_char_ratio is not None:
        ratio = len(chars[1]) / max(len(chars[0]), 1)
        if ratio > limit.max_char_ratio:
            return "char_ratio", f"output/input = {ratio:.3f} chars > {limit.max_char_ratio}"
    if limit.max_token_ratio is not None and tokens is not None:
        ratio = tokens[1] / max(tokens[0], 1)
        if ratio > limit.max_token_ratio:
            return "token_ratio", f"output/input = {ratio:.3f} tokens > {limit.max_token_ratio}"
    return None


def _rejection(row: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {"source": row["meta"]["source"], "reason": reason, "detail": detail, "row": row}


def _reason_of(error: str | None) -> str:
    if error is None:
        return "unreadable"
    for prefix, reason in (
        ("invalid UTF-8", "invalid_utf8"),
        ("invalid JSON", "invalid_json"),
        ("expected a JSON object", "not_object"),
        ("wrong number of columns", "bad_csv_row"),
        ("duplicate key", "duplicate_key"),
    ):
        if error.startswith(prefix):
            return reason
    return "unreadable"


def main(params: Params) -> None:
    from lorapipe.tokens import BaseTokenizer

    check_tracked(params.data.source, params.paths.raw)
    tokenizer = BaseTokenizer(params.paths.base)
    outcome = Outcome()
    with atomic_dir(Path(params.paths.preprocessed)) as out:
        with JsonlFiles(out, (ROWS, REJECTED, QUARANTINE)) as files:
            events = preprocess(
                read_source(params.data), params.data, params.preprocess, tokenizer.count, outcome
            )
            for name, part, row in events:
                files.write(name, row, part)
        if not outcome.kept:
            m = outcome.metrics()
            first = outcome.first.get(QUARANTINE) or outcome.first.get(REJECTED)
            example = f"; the first: {first['source']}: {first['detail']}" if first else ""
            raise PreprocessError(
                f"preprocess: no rows left of {m['rows_in']} (rejected: "
                f"{m['rejected_by_reason']}, quarantined: {m['quarantined_by_reason']}){example}; "
                f"check data.format ({params.data.format}) and data.fields, or loosen "
                "preprocess.ratio_limits"
            )
    metrics = outcome.metrics()
    atomic_write_json(Path(params.paths.metrics) / "preprocess.json", metrics)
    print(
        f"preprocess: {metrics['rows_in']} rows in -> {metrics['kept']} kept, "
        f"{metrics['rejected']} rejected, {metrics['quarantined']} quarantined"
    )
    # Settings that change rows without a row being set aside: said, never silent.
    if outcome.system_prompt_added:
        print(
            f"preprocess: data.system_prompt {params.data.system_prompt!r} added as the system "
            f"turn of {outcome.system_prompt_added} rows"
        )
    for name in params.data.keep_fields:
        if not outcome.kept_fields[name]:
            print(f"preprocess: data.keep_fields: no row has a '{name}' column")
