"""`split` stage: train/valid/test by ratios and seed, duplicates grouped, optionally stratified.

Rows whose prompts are equal after normalizing case, whitespace and punctuation form one group;
a group never spans two splits, so no test prompt was seen in training. Within a group, rows
that are equal in full (prompt and answer) are duplicates: `duplicates: drop` keeps the first.

Deterministic on every machine: groups are ordered by SHA-256 of (seed, group key), never by
Python's per-process hash, and each stratum is cut at the ratio boundaries.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorapipe.errors import LorapipeError
from lorapipe.io import atomic_dir, atomic_write_json, atomic_write_jsonl, read_jsonl
from lorapipe.params import SPLITS, Params, SplitParams

PARAMS = ("split",)
_PUNCTUATION_AND_SPACE = re.compile(r"[\W_]+", re.UNICODE)


class SplitError(LorapipeError):
    """The rows cannot be split as params.yaml asks."""


@dataclass
class SplitResult:
    splits: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {name: [] for name in SPLITS}
    )
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    groups: int = 0
    groups_with_several_rows: int = 0

    def metrics(self) -> dict[str, Any]:
        return {
            "rows_in": sum(map(len, self.splits.values())) + len(self.duplicates),
            **{name: len(rows) for name, rows in self.splits.items()},
            "duplicates_dropped": len(self.duplicates),
            "groups": self.groups,
            "groups_with_several_rows": self.groups_with_several_rows,
        }


def normalize_text(text: str) -> str:
    """Case, accents' composition, whitespace and punctuation do not make a new example."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _PUNCTUATION_AND_SPACE.sub(" ", text).strip()


def prompt_key(row: dict[str, Any]) -> str:
    if "text" in row:
        return normalize_text(row["text"])
    return "\x1e".join(
        normalize_text(m["content"]) for m in row["messages"] if m["role"] != "assistant"
    )


def full_key(row: dict[str, Any]) -> str:
    if "text" in row:
        return normalize_text(row["text"])
    return "\x1e".join(f"{m['role']}:{normalize_text(m['content'])}" for m in row["messages"])


def split_rows(rows: list[dict[str, Any]], params: SplitParams) -> SplitResult:
    result = SplitResult()
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[prompt_key(row)].append(row)
    result.groups = len(groups)
    result.groups_with_several_rows = sum(len(g) > 1 for g in groups.values())

    if params.duplicates == "drop":
        for key, members in groups.items():
            seen: dict[str, dict[str, Any]] = {}
            unique = []
            for row in members:
                first = seen.setdefault(full_key(row), row)
                if first is row:
                    unique.append(row)
                else:
                    result.duplicates.append(
                        {
                            "source": row["meta"]["source"],
                            "duplicate_of": first["meta"]["source"],
                            "row": row,
                        }
                    )
            groups[key] = unique

    strata: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        strata[_stratum(members[0], params.stratify)].append(key)

    ratios = params.ratios
    cuts = (ratios.train, ratios.train + ratios.valid)
    for stratum in sorted(strata):
        keys = sorted(strata[stratum], key=lambda k: _order(params.seed, k))
        total = sum(len(groups[k]) for k in keys)
        done = 0
        for key in keys:
            size = len(groups[key])
            # The group's midpoint decides its split, so each split's share tracks its ratio
            # even when groups differ in size.
            position = (done + size / 2) / total
            name = (
                SPLITS[0] if position < cuts[0] else SPLITS[1] if position < cuts[1] else SPLITS[2]
            )
            result.splits[name].extend(groups[key])
            done += size
    return result


def _stratum(row: dict[str, Any], field_name: str | None) -> str:
    if field_name is None:
        return ""
    value = row["meta"].get(field_name)
    if value is None:
        raise SplitError(
            f"split.stratify: {field_name!r}, but {row['meta']['source']} has no "
            f"'{field_name}' (stratify needs a column of every row, listed in data.keep_fields; "
            "`kind` is the demo's); set split.stratify: null for your data (`lorapipe use-data` "
            "does), or add the column"
        )
    return str(value)


def _order(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


def main(params: Params) -> None:
    source = Path(params.paths.preprocessed) / "rows.jsonl"
    if not source.is_file():
        raise SplitError(f"{source}: not found; run `dvc repro preprocess` (it makes this file)")
    rows = [line.value for line in read_jsonl(source) if line.value is not None]
    result = split_rows(rows, params.split)
    for name, split_rows_ in result.splits.items():
        ratio = getattr(params.split.ratios, name)
        if ratio > 0 and not split_rows_:
            raise SplitError(
                f"split: '{name}' would be empty ({len(rows)} rows, ratio {ratio}); add data or "
                f"raise split.ratios.{name}"
            )
    with atomic_dir(Path(params.paths.split)) as out:
        for name, split_rows_ in result.splits.items():
            atomic_write_jsonl(out / f"{name}.jsonl", split_rows_)
        atomic_write_jsonl(out / "duplicates.jsonl", result.duplicates)
    metrics = result.metrics()
    atomic_write_json(Path(params.paths.metrics) / "split.json", metrics)
    print(
        "split: "
        + ", ".join(f"{name} {metrics[name]}" for name in SPLITS)
        + f"; {metrics['duplicates_dropped']} duplicates dropped"
    )
