from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lorapipe.errors import LorapipeError
from lorapipe.params import SPLITS, SplitParams, load_params
from lorapipe.stages import split
from lorapipe.stages.split import SplitPlan, plan_split
from tests.helpers import REPO


def params(**changes: Any) -> SplitParams:
    return dataclasses.replace(load_params(REPO / "params.yaml").split, **changes)


def row(i: int, prompt: str, answer: str = "a", kind: str = "nl") -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
        "meta": {"source": f"f.jsonl:{i}", "kind": kind},
    }


def rows(n: int, code_every: int = 4) -> list[dict[str, Any]]:
    return [
        row(i, f"request number {i}", kind="code" if i % code_every == 0 else "nl")
        for i in range(n)
    ]


@dataclass
class Split:
    """A plan applied to the rows: what each split file and duplicates.jsonl would hold."""

    plan: SplitPlan
    splits: dict[str, list[dict[str, Any]]]
    duplicates: list[dict[str, str]]

    def metrics(self) -> dict[str, Any]:
        return self.plan.metrics()


def split_rows(data: list[dict[str, Any]], p: SplitParams) -> Split:
    plan = plan_split(iter(data), p)  # read once, as a stream
    source = lambda i: data[i]["meta"]["source"]  # noqa: E731
    return Split(
        plan,
        {name: [data[i] for i in order] for name, order in plan.order.items()},
        [{"source": source(i), "duplicate_of": source(first)} for i, first in plan.duplicates],
    )


def membership(result: Any) -> dict[str, str]:
    return {r["meta"]["source"]: name for name, rs in result.splits.items() for r in rs}


def test_ratios_and_stratification() -> None:
    result = split_rows(rows(2000), params())
    counts = {name: len(rs) for name, rs in result.splits.items()}
    assert counts == {"train": 1600, "valid": 200, "test": 200}
    for name in SPLITS:
        kinds = Counter(r["meta"]["kind"] for r in result.splits[name])
        assert kinds["code"] / len(result.splits[name]) == pytest.approx(0.25, abs=0.01)


def test_deterministic_and_independent_of_input_order() -> None:
    data = rows(500)
    first = membership(split_rows(data, params()))
    shuffled = data[:]
    random.Random(1).shuffle(shuffled)
    assert membership(split_rows(shuffled, params())) == first
    assert membership(split_rows(data, params(seed=7))) != first


def test_a_group_of_near_duplicates_never_spans_two_splits() -> None:
    data = rows(300)
    # Same prompt up to case, spacing and punctuation; one with a different answer.
    data += [
        row(1000, "Request   number 5!!"),
        row(1001, "request number 5", answer="other answer"),
        row(1002, "REQUEST, number 5."),
    ]
    result = split_rows(data, params(duplicates="keep"))
    where = membership(result)
    assert {where[s] for s in ("f.jsonl:5", "f.jsonl:1000", "f.jsonl:1001", "f.jsonl:1002")} == {
        where["f.jsonl:5"]
    }
    assert result.duplicates == []

    dropped = split_rows(data, params(duplicates="drop"))
    assert sorted(d["source"] for d in dropped.duplicates) == ["f.jsonl:1000", "f.jsonl:1002"]
    assert all(d["duplicate_of"] == "f.jsonl:5" for d in dropped.duplicates)
    m = dropped.metrics()
    assert (
        m["rows_in"] == len(data) == m["train"] + m["valid"] + m["test"] + m["duplicates_dropped"]
    )


def test_stratify_needs_the_field() -> None:
    from lorapipe.stages.split import SplitError

    data = rows(10)
    del data[3]["meta"]["kind"]
    with pytest.raises(SplitError, match="f.jsonl:3 has no 'kind'"):
        split_rows(data, params())
    assert sum(map(len, split_rows(data, params(stratify=None)).splits.values())) == 10


def test_main_copies_each_row_to_its_split_and_names_a_damaged_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    data = [*rows(40), row(100, "Request number 3")]  # a duplicate of row 3
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in data]
    source = tmp_path / "data" / "preprocessed" / "rows.jsonl"
    source.parent.mkdir(parents=True)
    source.write_text("".join(lines))
    params = load_params("params.yaml")
    split.main(params)

    expected = split_rows(data, params.split)
    out = tmp_path / "data" / "split"
    for name, split_rows_ in expected.splits.items():
        # Each row's line as preprocess wrote it, in the plan's order.
        assert (out / f"{name}.jsonl").read_text() == "".join(
            lines[data.index(r)] for r in split_rows_
        )
    [duplicate] = [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]
    assert duplicate == {"source": "f.jsonl:100", "duplicate_of": "f.jsonl:3", "row": data[-1]}

    source.write_text("".join(lines[:7]) + '{"messages": \n' + "".join(lines[7:]))
    damaged = r"^data/preprocessed/rows\.jsonl:8: invalid JSON: .*`dvc repro -f preprocess`$"
    with pytest.raises(LorapipeError, match=damaged):
        split.main(params)
