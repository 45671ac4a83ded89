"""`preprocess` stage: raw records -> one internal schema, artifacts stripped, ratio-filtered.

Every raw record ends in exactly one of three files, so rows in = kept + rejected + quarantined:
  rows.jsonl        kept rows: {"messages": [...], "meta": {"source": "file:line", ...}}
                    (format `text`: {"text": ..., "meta": ...})
  rejected.jsonl    well-formed rows a rule filtered out, with the reason
  quarantine.jsonl  malformed records (bad UTF-8, bad JSON, wrong types, empty fields)
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorapipe.datasource import RawRecord, check_tracked, read_source
from lorapipe.errors import LorapipeError
from lorapipe.io import atomic_dir, atomic_write_json, atomic_write_jsonl
from lorapipe.params import DataParams, Params, PreprocessParams, RatioLimit
from lorapipe.schema import ROLES, control_character, role_problem

PARAMS = ("data", "preprocess")


class PreprocessError(LorapipeError):
    """A malformed record under `on_error: raise`, or nothing left to train on."""


@dataclass
class Outcome:
    kept: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    stripped: Counter[str] = field(default_factory=Counter)
    system_prompt_added: int = 0  # rows given data.system_prompt as their system turn
    kept_fields: Counter[str] = field(default_factory=Counter)  # rows carrying each keep_field

    def metrics(self) -> dict[str, Any]:
        def by_reason(rows: list[dict[str, Any]]) -> dict[str, int]:
            return dict(sorted(Counter(r["reason"] for r in rows).items()))

        return {
            "rows_in": len(self.kept) + len(self.rejected) + len(self.quarantined),
            "kept": len(self.kept),
            "rejected": len(self.rejected),
            "quarantined": len(self.quarantined),
            "rejected_by_reason": by_reason(self.rejected),
            "quarantined_by_reason": by_reason(self.quarantined),
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
) -> Outcome:
    """Normalize, strip and filter `records`. `count_tokens(texts) -> lengths` (batched)."""
    outcome = Outcome()
    patterns = [re.compile(p) for p in params.strip_patterns]
    candidates: list[tuple[RawRecord, dict[str, Any]]] = []
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
            outcome.quarantined.append(
                {
                    "source": record.where,
                    "reason": exc.reason,
                    "detail": str(exc),
                    "raw": record.raw,
                }
            )
            continue
        kept = _kept_fields(record.value, data)
        outcome.kept_fields.update(kept.keys())
        outcome.system_prompt_added += added
        row["meta"] = {"source": record.where, **kept}
        if _strip_artifacts(row, patterns, outcome.stripped):
            outcome.rejected.append(
                _rejection(
                    row,
                    "empty_after_strip",
                    "the output is empty once the generation artifacts are removed",
                )
            )
            continue
        candidates.append((record, row))

    # Ratio limits in tokens need every row's token counts: one batched call, not one per row.
    sides = [_sides(row) for _, row in candidates]
    limits = [_limit_for(record.file, params.ratio_limits) for record, _ in candidates]
    needs_tokens = [i for i, limit in enumerate(limits) if limit and limit.max_token_ratio]
    texts = [text for i in needs_tokens for text in sides[i]]
    lengths = count_tokens(texts)
    token_sides = {i: (lengths[2 * k], lengths[2 * k + 1]) for k, i in enumerate(needs_tokens)}

    for i, (_, row) in enumerate(candidates):
        verdict = _ratio_verdict(sides[i], token_sides.get(i), limits[i])
        if verdict is None:
            outcome.kept.append(row)
        else:
            outcome.rejected.append(_rejection(row, *verdict))
    return outcome


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
    outcome = preprocess(read_source(params.data), params.data, params.preprocess, tokenizer.count)
    if not outcome.kept:
        m = outcome.metrics()
        first = (outcome.quarantined or outcome.rejected or [{}])[0]
        example = f"; the first: {first['source']}: {first['detail']}" if first else ""
        raise PreprocessError(
            f"preprocess: no rows left of {m['rows_in']} (rejected: {m['rejected_by_reason']}, "
            f"quarantined: {m['quarantined_by_reason']}){example}; check data.format "
            f"({params.data.format}) and data.fields, or loosen preprocess.ratio_limits"
        )
    with atomic_dir(Path(params.paths.preprocessed)) as out:
        atomic_write_jsonl(out / "rows.jsonl", outcome.kept)
        atomic_write_jsonl(out / "rejected.jsonl", outcome.rejected)
        atomic_write_jsonl(out / "quarantine.jsonl", outcome.quarantined)
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
