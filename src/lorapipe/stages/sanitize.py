"""`sanitize` stage: per split, validate roles, scrub PII and secrets, enforce the length limit.

Lengths are measured as training sees them: after the chat template, in base-model tokens. A row
over `sanitize.max_tokens` is dropped, truncated (its last answer is cut) or an error, per
`sanitize.overlength`; never cut silently. Every row ends in the sanitized split or in
quarantine.jsonl with its reason, and the data contract (`metrics/data.json`) and report
(`reports/data.md`) record the counts, never the PII itself. Rows stream through a chunk at a
time, as in preprocess; token lengths are kept as a histogram, not a list.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lorapipe.errors import LorapipeError
from lorapipe.io import JsonlFiles, atomic_dir, atomic_write_json, atomic_write_text, read_rows
from lorapipe.params import SPLITS, Params, SanitizeParams
from lorapipe.schema import role_problem
from lorapipe.tokens import count_ahead

PARAMS = ("sanitize",)
# Rows per tokenizer call (as preprocess's CHUNK).
CHUNK = 4096
QUARANTINE = "quarantine.jsonl"
# Where a row goes: (file, part, row). A split's quarantined rows come in two parts: those with
# broken roles or PII (part 0), then those over the length limit (part 1), each in input order.
Event = tuple[str, int, dict[str, Any]]


class SanitizeError(LorapipeError):
    """A row breaks a rule set to `error`, or a split is left empty."""


class Tokenizer(Protocol):
    def render(self, row: dict[str, Any]) -> str: ...
    def count(self, texts: Sequence[str]) -> list[int]: ...
    def lengths(self, conversations: list[dict[str, Any]]) -> list[int]: ...
    def truncate_answer(self, row: dict[str, Any], max_tokens: int) -> dict[str, Any] | None: ...


@dataclass
class SplitReport:
    """The counts of one split; the rows themselves go to the files as they are decided."""

    rows_in: int = 0
    kept: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)  # by reason
    truncated: int = 0
    pii_found: Counter[str] = field(default_factory=Counter)
    pii_rows: int = 0
    lengths: Counter[int] = field(default_factory=Counter)  # kept rows by length in tokens
    first: dict[str, Any] | None = None  # the first row kept, for the contract's schema

    def count(self, event: Event) -> Event:
        name, _, row = event
        if name == QUARANTINE:
            self.quarantined[row["reason"]] += 1
        else:
            self.kept += 1
            if self.first is None:
                self.first = row
        return event

    def metrics(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows": self.kept,
            "quarantined": self.quarantined.total(),
            "quarantined_by_reason": dict(sorted(self.quarantined.items())),
            "truncated": self.truncated,
            "rows_with_pii": self.pii_rows,
            "tokens": _stats(self.lengths),
        }


def sanitize_split(
    name: str,
    rows: Iterable[dict[str, Any]],
    params: SanitizeParams,
    scrubber: Any,
    tokenizer: Tokenizer,
    report: SplitReport,
    chunk: int = CHUNK,
) -> Iterator[Event]:
    """Check, scrub and measure the rows of split `name`, one chunk at a time: each row's
    (file, part, row), counted in `report`."""
    batches = _first_pass(name, rows, params, scrubber, tokenizer, report, chunk)
    for (events, candidates), lengths in count_ahead(batches, tokenizer.count):
        yield from map(report.count, events)
        for row, length in zip(candidates, lengths, strict=True):
            if length <= params.max_tokens:
                report.lengths[length] += 1
                yield report.count((f"{name}.jsonl", 0, row))
                continue
            detail = (
                f"{length} tokens after the chat template > sanitize.max_tokens {params.max_tokens}"
            )
            if params.overlength == "error":
                raise SanitizeError(
                    f"{row['meta']['source']} ({name} split): {detail}; raise sanitize.max_tokens,"
                    " or set sanitize.overlength to drop or truncate"
                )
            if params.overlength == "truncate":
                cut = tokenizer.truncate_answer(row, params.max_tokens)
                if cut is not None:
                    report.lengths[tokenizer.lengths([cut])[0]] += 1
                    report.truncated += 1
                    yield report.count((f"{name}.jsonl", 0, cut))
                    continue
                detail += " (the prompt alone is too long to truncate the answer)"
            yield report.count((QUARANTINE, 1, _quarantine(name, row, "overlength", detail)))


def _first_pass(
    name: str,
    rows: Iterable[dict[str, Any]],
    params: SanitizeParams,
    scrubber: Any,
    tokenizer: Tokenizer,
    report: SplitReport,
    chunk: int,
) -> Iterator[tuple[tuple[list[Event], list[dict[str, Any]]], list[str]]]:
    """Chunks of rows checked and scrubbed: the rows quarantined so far, the candidates, and
    the candidates rendered as training sees them, to count their tokens."""
    events: list[Event] = []
    candidates: list[dict[str, Any]] = []
    for row in rows:
        report.rows_in += 1
        problem = role_problem(row)
        if problem is not None:
            # Its PII is not counted (the row is not trained on) but is not kept either.
            clean = _redacted(row, scrubber)
            events.append((QUARANTINE, 0, _quarantine(name, clean, "role_order", problem)))
            continue
        found = _scrub(row, scrubber, params.pii_action)
        if found:
            report.pii_found.update(found)
            report.pii_rows += 1
            if params.pii_action == "drop":
                kinds = ", ".join(sorted(found))
                clean = _redacted(row, scrubber)  # the quarantine file keeps no PII either
                events.append((QUARANTINE, 0, _quarantine(name, clean, "pii", f"contains {kinds}")))
                continue
        candidates.append(row)
        if len(candidates) == chunk:
            yield (events, candidates), [tokenizer.render(row) for row in candidates]
            events, candidates = [], []
    yield (events, candidates), [tokenizer.render(row) for row in candidates]


def _scrub(row: dict[str, Any], scrubber: Any, action: str) -> Counter[str]:
    """Count PII by kind in every message; redact it in place unless the row will be dropped."""
    found: Counter[str] = Counter()
    items = [row] if "text" in row else row["messages"]
    key = "text" if "text" in row else "content"
    for item in items:
        if action == "redact":
            item[key], counts = scrubber.redact(item[key])
        else:
            counts = Counter(f.kind for f in scrubber.find(item[key]))
        found.update(counts)
    return found


def _redacted(value: Any, scrubber: Any) -> Any:
    """A copy of a JSON value with every string redacted, whatever its shape."""
    if isinstance(value, str):
        return scrubber.redact(value)[0]
    if isinstance(value, list):
        return [_redacted(v, scrubber) for v in value]
    if isinstance(value, dict):
        return {k: _redacted(v, scrubber) for k, v in value.items()}
    return value


def _quarantine(split: str, row: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    source = row.get("meta", {}).get("source", "?")
    return {"split": split, "source": source, "reason": reason, "detail": detail, "row": row}


def _stats(lengths: Counter[int]) -> dict[str, float]:
    """min, median, p95, max and total of the lengths, from their histogram."""
    if not lengths:
        return {}
    ordered = sorted(lengths.items())
    n = lengths.total()

    def nth(k: int) -> int:  # the k-th shortest row's length, 0-based
        for length, count in ordered:
            if k < count:
                return length
            k -= count
        raise IndexError(k)

    return {
        "min": ordered[0][0],
        "median": nth((n - 1) // 2),  # the lower median: a row's length, like min and max
        "p95": nth(min(n - 1, int(0.95 * n))),
        "max": ordered[-1][0],
        "total": sum(length * count for length, count in ordered),
    }


class ChatLengths:
    """Lengths and truncation with the base model's tokenizer and chat template."""

    def __init__(self, base_dir: str) -> None:
        from lorapipe.tokens import BaseTokenizer

        self.tokenizer = BaseTokenizer(base_dir)

    def render(self, row: dict[str, Any]) -> str:
        if "text" in row:
            return str(row["text"])
        return self.tokenizer.render(row["messages"])

    def count(self, texts: Sequence[str]) -> list[int]:
        return self.tokenizer.count(texts)

    def lengths(self, conversations: list[dict[str, Any]]) -> list[int]:
        return self.count([self.render(row) for row in conversations])

    def truncate_answer(self, row: dict[str, Any], max_tokens: int) -> dict[str, Any] | None:
        """`row` with its last answer (a text row: its text) cut to fit, or None if the rest of
        the row alone does not fit."""
        tok = self.tokenizer
        answer = tok.encode(row["text"] if "text" in row else row["messages"][-1]["content"])
        keep = len(answer) - (self.lengths([row])[0] - max_tokens)
        # Re-tokenizing a cut text can merge differently at the cut, and a cut inside a
        # character decodes to U+FFFD, which the data never had (and which can take more tokens
        # than the bytes it replaces): shorten until the cut ends on a whole character and fits.
        while keep > 0:
            text = tok.decode(answer[:keep])
            cut = _with_answer(row, text)
            whole = bool(text.strip()) and not text.endswith("\ufffd")
            if whole and self.lengths([cut])[0] <= max_tokens:
                return cut
            keep -= 1
        return None


def _with_answer(row: dict[str, Any], answer: str) -> dict[str, Any]:
    if "text" in row:
        return {**row, "text": answer}
    messages = [dict(m) for m in row["messages"]]
    messages[-1]["content"] = answer
    return {**row, "messages": messages}


def contract(
    reports: dict[str, SplitReport], upstream: dict[str, Any], params: Params
) -> dict[str, Any]:
    """The data contract and catalog: schema, counts, lengths, duplicates, rejections, PII."""
    first = next((r.first for r in reports.values() if r.first is not None), {})
    pii: Counter[str] = Counter()
    for report in reports.values():
        pii.update(report.pii_found)
    return {
        "schema": {
            "format": "text" if "text" in first else "chat",
            "fields": (
                {"text": "string", "meta": "object"}
                if "text" in first
                else {"messages": "list of {role, content}", "meta": "object"}
            ),
            "meta_fields": sorted(first.get("meta", {})),
        },
        "files": {name: f"{params.paths.sanitized}/{name}.jsonl" for name in SPLITS},
        "splits": {name: report.metrics() for name, report in reports.items()},
        "preprocess": upstream.get("preprocess", {}),
        "split": upstream.get("split", {}),
        "pii_found": {kind: pii[kind] for kind in params.sanitize.pii_kinds},
        "max_tokens": params.sanitize.max_tokens,
    }


def render_report(data: dict[str, Any]) -> str:
    pre, spl = data["preprocess"], data["split"]
    split_out = spl.get("rows_in", 0) - spl.get("duplicates_dropped", 0)
    lines = [
        "# Data report",
        "",
        "Made by `lorapipe sanitize`; the numbers are in `metrics/data.json`.",
        "",
        "## Rows through the stages",
        "",
        "| stage | in | out | set aside |",
        "|---|---|---|---|",
        f"| preprocess | {pre.get('rows_in', '?')} | {pre.get('kept', '?')} | "
        f"{pre.get('rejected', 0)} rejected, {pre.get('quarantined', 0)} quarantined |",
        f"| split | {spl.get('rows_in', '?')} | {split_out} | "
        f"{spl.get('duplicates_dropped', 0)} duplicates |",
    ]
    for name, split in data["splits"].items():
        lines.append(
            f"| sanitize ({name}) | {split['rows_in']} | {split['rows']} | "
            f"{split['quarantined']} quarantined, {split['truncated']} truncated |"
        )
    lines += [
        "",
        f"## Lengths (tokens after the chat template; limit {data['max_tokens']})",
        "",
        "| split | rows | min | median | p95 | max |",
        "|---|---|---|---|---|---|",
    ]
    for name, split in data["splits"].items():
        t = split["tokens"]
        lines.append(
            f"| {name} | {split['rows']} | {t.get('min', '-')} | {t.get('median', '-')} | "
            f"{t.get('p95', '-')} | {t.get('max', '-')} |"
        )
    reasons = {
        **{f"rejected: {k}": v for k, v in pre.get("rejected_by_reason", {}).items()},
        **{f"quarantined: {k}": v for k, v in pre.get("quarantined_by_reason", {}).items()},
    }
    # Sanitize's reasons summed over the splits (per split in metrics/data.json).
    sanitized: Counter[str] = Counter()
    for split in data["splits"].values():
        sanitized.update(split["quarantined_by_reason"])
    reasons.update({f"sanitize: {k}": v for k, v in sorted(sanitized.items())})
    lines += ["", "## Set aside, by reason", "", "| reason | rows |", "|---|---|"]
    lines += [f"| {reason} | {count} |" for reason, count in reasons.items()]
    lines += [
        f"| duplicates ({spl.get('groups_with_several_rows', 0)} groups of equal prompts) | "
        f"{spl.get('duplicates_dropped', 0)} |",
        "",
        "## PII and secrets found (counts only)",
        "",
        "| kind | found |",
        "|---|---|",
    ]
    lines += [f"| {kind} | {count} |" for kind, count in data["pii_found"].items()]
    return "\n".join(lines) + "\n"


def main(params: Params) -> None:
    from lorapipe.pii import Scrubber

    split_dir = Path(params.paths.split)
    for name in SPLITS:
        if not (split_dir / f"{name}.jsonl").is_file():
            raise SanitizeError(
                f"{split_dir / f'{name}.jsonl'}: not found; run `dvc repro split` (it makes this "
                "file)"
            )
    scrubber = Scrubber(params.sanitize.pii_kinds, phone_region=params.sanitize.phone_region)
    tokenizer = ChatLengths(params.paths.base)
    reports = {name: SplitReport() for name in SPLITS}
    names = [f"{name}.jsonl" for name in SPLITS]
    with (
        atomic_dir(Path(params.paths.sanitized)) as out,
        JsonlFiles(out, [*names, QUARANTINE]) as files,
    ):
        for k, (name, report) in enumerate(reports.items()):
            rows = (row for _, row in read_rows(split_dir / f"{name}.jsonl", "split"))
            for file, part, row in sanitize_split(
                name, rows, params.sanitize, scrubber, tokenizer, report
            ):
                # quarantine.jsonl: split by split, each split's two parts in order.
                files.write(file, row, 2 * k + part)
            if report.rows_in and not report.kept:
                raise SanitizeError(
                    f"sanitize: no {name} rows left of {report.rows_in} (quarantined by reason: "
                    f"{dict(report.quarantined)}); loosen the rule that removes them "
                    "(sanitize.max_tokens, sanitize.overlength, sanitize.pii_action)"
                )
    metrics_dir = Path(params.paths.metrics)
    upstream = {
        stage: json.loads((metrics_dir / f"{stage}.json").read_text())
        for stage in ("preprocess", "split")
        if (metrics_dir / f"{stage}.json").is_file()
    }
    data = contract(reports, upstream, params)
    atomic_write_json(metrics_dir / "data.json", data)
    atomic_write_text(Path(params.paths.reports) / "data.md", render_report(data))
    print(
        "sanitize: "
        + ", ".join(f"{n} {r.kept}/{r.rows_in}" for n, r in reports.items())
        + f" rows kept; PII found: {dict(data['pii_found'])}"
    )
