"""`split` stage: train/valid/test by ratios and seed, duplicates grouped, optionally stratified.

Rows whose prompts are equal after normalizing case, whitespace and punctuation form one group;
a group never spans two splits, so no test prompt was seen in training. Within a group, rows
that are equal in full (prompt and answer) are duplicates: `duplicates: drop` keeps the first.

Deterministic on every machine: groups are ordered by SHA-256 of (seed, group key), never by
Python's per-process hash, and each stratum is cut at the ratio boundaries.

Streamed: the rows are read once to group them by hashes, then each is copied from its place in
`rows.jsonl` to its split, so memory grows with the number of rows, not with their text.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorapipe.errors import LorapipeError
from lorapipe.io import JsonlFiles, atomic_dir, atomic_write_json, read_line_at, read_rows
from lorapipe.params import SPLITS, Params, SplitParams

PARAMS = ("split",)
DUPLICATES = "duplicates.jsonl"
_PUNCTUATION_AND_SPACE = re.compile(r"[\W_]+", re.UNICODE)


class SplitError(LorapipeError):
    """The rows cannot be split as params.yaml asks."""


@dataclass
class SplitPlan:
    """Where each input row goes, by its number (0-based, in file order). Only numbers and
    hashes are kept, never the rows: a million rows cost a few hundred MB, not their text."""

    rows_in: int
    order: dict[str, list[int]]  # per split, its rows in output order: group by group
    duplicates: list[tuple[int, int]]  # (row, the row it repeats), as duplicates.jsonl lists them
    groups: int
    groups_with_several_rows: int

    def metrics(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            **{name: len(rows) for name, rows in self.order.items()},
            "duplicates_dropped": len(self.duplicates),
            "groups": self.groups,
            "groups_with_several_rows": self.groups_with_several_rows,
        }


def normalize_text(text: str) -> str:
    """Case, accents' composition, whitespace and punctuation do not make a new example."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _PUNCTUATION_AND_SPACE.sub(" ", text).strip()


def keys(row: dict[str, Any]) -> tuple[str, str]:
    """(prompt key, full key): rows with equal prompt keys form a group; rows of a group with
    equal full keys (prompt and answer) are duplicates. Each message is normalized once."""
    if "text" in row:
        key = normalize_text(row["text"])
        return key, key
    normalized = [(m["role"], normalize_text(m["content"])) for m in row["messages"]]
    prompt = "\x1e".join(text for role, text in normalized if role != "assistant")
    return prompt, "\x1e".join(f"{role}:{text}" for role, text in normalized)


def plan_split(rows: Iterable[dict[str, Any]], params: SplitParams) -> SplitPlan:
    """Group, deduplicate and assign `rows` (read once, in order) to the splits."""
    drop = params.duplicates == "drop"
    group_of: dict[bytes, int] = {}  # a group's order hash -> its number, in order of first row
    digests: list[bytes] = []  # per group: its order hash
    stratum_of: dict[str, int] = {}
    strata = array("q")  # per group: the stratum of its first row
    sizes = array("q")  # per group: its rows, duplicates included
    unique = array("q")  # per group: its rows kept
    row_group = array("q")  # per row: its group, or -1 for a dropped duplicate
    first_of: dict[bytes, int] = {}  # hash of (group, full key) -> the first row with them
    duplicates: list[tuple[int, int, int]] = []  # (group, row, first row)
    for i, row in enumerate(rows):
        prompt, full = keys(row)
        digest = _order(params.seed, prompt)
        g = group_of.get(digest)
        if g is None:
            g = group_of[digest] = len(digests)
            digests.append(digest)
            stratum = _stratum(row, params.stratify)
            strata.append(stratum_of.setdefault(stratum, len(stratum_of)))
            sizes.append(0)
            unique.append(0)
        sizes[g] += 1
        if drop:
            key = g.to_bytes(8, "little") + full.encode("utf-8", "surrogatepass")
            first = first_of.setdefault(hashlib.blake2b(key, digest_size=16).digest(), i)
            if first != i:
                duplicates.append((g, i, first))
                row_group.append(-1)
                continue
        unique[g] += 1
        row_group.append(g)
    del group_of, first_of

    # Groups in output order: strata by name, then by order hash. The group's midpoint decides
    # its split, so each split's share tracks its ratio even when groups differ in size.
    ratios = params.ratios
    cuts = (ratios.train, ratios.train + ratios.valid)
    by_stratum: dict[int, list[int]] = {s: [] for s in stratum_of.values()}
    for g, s in enumerate(strata):
        by_stratum[s].append(g)
    rank = np.empty(len(digests), dtype=np.int64)
    split_of = np.empty(len(digests), dtype=np.int8)
    position_of_group = 0
    for name in sorted(stratum_of):
        groups = sorted(by_stratum[stratum_of[name]], key=digests.__getitem__)
        total = sum(unique[g] for g in groups)
        done = 0
        for g in groups:
            size = unique[g]
            position = (done + size / 2) / total
            split_of[g] = 0 if position < cuts[0] else 1 if position < cuts[1] else 2
            rank[g] = position_of_group
            position_of_group += 1
            done += size

    # Rows in output order: by their group's rank, a group's rows in input order.
    row_groups = np.frombuffer(row_group, dtype=np.int64)
    kept = np.flatnonzero(row_groups >= 0)
    ordered = kept[np.argsort(rank[row_groups[kept]], kind="stable")]
    split_of_row = split_of[row_groups[ordered]]
    duplicates.sort(key=lambda d: d[0])  # stable: by group, in input order within one
    return SplitPlan(
        rows_in=len(row_group),
        order={name: ordered[split_of_row == k].tolist() for k, name in enumerate(SPLITS)},
        duplicates=[(row, first) for _, row, first in duplicates],
        groups=len(digests),
        groups_with_several_rows=sum(n > 1 for n in sizes),
    )


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
    offsets = array("q")  # per row: where its line starts, to copy it in output order

    def rows() -> Iterator[dict[str, Any]]:
        for offset, row in read_rows(source, "preprocess"):
            offsets.append(offset)
            yield row

    plan = plan_split(rows(), params.split)
    for name, order in plan.order.items():
        ratio = getattr(params.split.ratios, name)
        if ratio > 0 and not order:
            raise SplitError(
                f"split: '{name}' would be empty ({plan.rows_in} rows, ratio {ratio}); add data "
                f"or raise split.ratios.{name}"
            )
    names = [f"{name}.jsonl" for name in SPLITS]
    with (
        atomic_dir(Path(params.paths.split)) as out,
        JsonlFiles(out, [*names, DUPLICATES]) as files,
        open(source, "rb") as f,
    ):
        # A kept row is copied as preprocess wrote it: split moves rows, never rewrites them.
        for file, order in zip(names, plan.order.values(), strict=True):
            for i in order:
                files.write_line(file, read_line_at(f, offsets[i]) + b"\n")
        for i, first in plan.duplicates:
            row = json.loads(read_line_at(f, offsets[i]))
            of = json.loads(read_line_at(f, offsets[first]))["meta"]["source"]
            duplicate = {"source": row["meta"]["source"], "duplicate_of": of, "row": row}
            files.write(DUPLICATES, duplicate)
    metrics = plan.metrics()
    atomic_write_json(Path(params.paths.metrics) / "split.json", metrics)
    print(
        "split: "
        + ", ".join(f"{name} {metrics[name]}" for name in SPLITS)
        + f"; {metrics['duplicates_dropped']} duplicates dropped"
    )
