"""Your own data, right the first time: `lorapipe use-data` then `dvc repro`, as the README's
"Your own data" says, applies none of the demo's settings; data outside data/raw is refused
with the fix; a failed stage keeps the committed metrics; raw text never reaches a remote."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, commit_all, dvc, dvc_ok, fresh_copy, ran_stages, set_params

DEMO_PROMPT = "Compress the text."


def lorapipe(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorapipe.cli", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )


def chat_rows(n: int) -> list[dict[str, Any]]:
    """Ordinary chat data: short questions, long answers (the demo's ratio filter would drop
    every one), no system turn, no `kind`."""
    rng = random.Random(3)
    topics = ["tea", "rivers", "bridges", "owls", "maps", "bread", "clocks", "kites"]
    rows = []
    for i in range(n):
        topic = rng.choice(topics)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Tell me about {topic} number {i}."},
                    {
                        "role": "assistant",
                        "content": f"Here is a long answer about {topic} number {i}: "
                        + " ".join(rng.choice(topics) for _ in range(12)),
                    },
                ]
            }
        )
    return rows


def question_answer_rows(n: int) -> list[dict[str, Any]]:
    return [
        {"question": row["messages"][0]["content"], "answer": row["messages"][1]["content"]}
        for row in chat_rows(n)
    ]


@pytest.fixture
def own_project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    project = fresh_copy(tmp_path / "own")
    set_params(project, **{"model.source": str(tiny_model_dir)})
    return project


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize(
    ("rows", "expected_format"),
    [(chat_rows(60), "chat"), (question_answer_rows(60), "completions")],
    ids=["chat", "two-columns"],
)
def test_use_data_then_repro_applies_no_demo_setting(
    own_project: Path, rows: list[dict[str, Any]], expected_format: str
) -> None:
    write_jsonl(own_project / "data" / "raw" / "own" / "mine.jsonl", rows)
    used = lorapipe(own_project, "use-data", "data/raw/own/mine.jsonl")
    assert used.returncode == 0, used.stderr
    assert f"data.system_prompt: {DEMO_PROMPT!r} -> null" in used.stdout
    assert "split.stratify: 'kind' -> null" in used.stdout
    commit_all(own_project, "own data")

    result = dvc(own_project, "repro", "sanitize")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ran_stages(result) == ["base", "preprocess", "split", "sanitize"]
    pre = json.loads((own_project / "metrics" / "preprocess.json").read_text())
    assert pre["rows_in"] == pre["kept"] == 60, pre  # no ratio filter, nothing quarantined
    assert pre["system_prompt_added"] == 0
    assert "added as the system turn" not in result.stdout
    sanitized = [
        json.loads(line)
        for name in ("train", "valid", "test")
        for line in (own_project / "data" / "sanitized" / f"{name}.jsonl").read_text().splitlines()
    ]
    assert len(sanitized) == 60
    assert all(row["messages"][0]["role"] == "user" for row in sanitized)  # no system turn
    assert DEMO_PROMPT not in json.dumps(sanitized)
    from lorapipe.params import load_params

    params = load_params(own_project / "params.yaml")
    assert params.data.format == expected_format
    assert "field_f1" not in params.eval.metrics and not params.preprocess.ratio_limits
    # The real-data recipe: one epoch, not the demo's 180 steps.
    assert (params.train.iters, params.train.epochs) == (None, 1)
    marked = [
        line for line in (own_project / "params.yaml").open() if line[0] == " " and "# demo" in line
    ]
    assert marked == []  # every demo setting got its generic value


def test_use_data_asks_for_the_columns_when_it_cannot_tell(own_project: Path) -> None:
    write_jsonl(own_project / "data" / "raw" / "x.jsonl", [{"a": "1", "b": "2", "c": "3"}])
    unsure = lorapipe(own_project, "use-data", "data/raw/x.jsonl")
    assert unsure.returncode == 1
    assert "the data has: a (text), b (text), c (text)" in unsure.stderr
    assert "--prompt COLUMN --completion COLUMN" in unsure.stderr
    told = lorapipe(
        own_project, "use-data", "data/raw/x.jsonl", "--prompt", "c", "--completion", "a"
    )
    assert told.returncode == 0, told.stderr
    assert "data.fields.prompt: 'input' -> 'c'" in told.stdout


def test_data_outside_data_raw_is_refused_with_the_fix(own_project: Path, tmp_path: Path) -> None:
    """DVC tracks data/raw for preprocess: a file elsewhere could change unnoticed."""
    outside = tmp_path / "elsewhere.jsonl"
    write_jsonl(outside, question_answer_rows(5))
    used = lorapipe(own_project, "use-data", str(outside))
    assert used.returncode == 1
    assert f"{outside} is outside data/raw/" in used.stderr
    set_params(own_project, **{"data.source": str(outside)})
    result = dvc(own_project, "repro", "preprocess")
    assert result.returncode != 0
    assert f"move it under data/raw/ (and `dvc add data/raw/{outside.name}`" in result.stderr


def test_a_failed_stage_leaves_the_committed_metrics_as_they_were(own_project: Path) -> None:
    """DVC would delete a stage's outputs before running it; the committed ones persist."""
    committed = (REPO / "metrics" / "preprocess.json").read_bytes()
    assert (own_project / "metrics" / "preprocess.json").read_bytes() == committed
    set_params(own_project, **{"preprocess.on_error": "raise"})  # the demo has broken lines
    result = dvc(own_project, "repro", "preprocess")
    assert result.returncode != 0
    assert "lorapipe preprocess: error: data/raw/" in result.stderr
    assert "fix the record, or set preprocess.on_error: quarantine" in result.stderr
    assert (own_project / "metrics" / "preprocess.json").read_bytes() == committed


def test_raw_text_never_reaches_the_remote(own_project: Path, tmp_path: Path) -> None:
    """Planted secrets and emails sit in data/raw; after `dvc repro` and `dvc push`, no file in
    the remote holds one (preprocess and split outputs still do, locally)."""
    secrets = ["zq.planted.mailbox@example.org", "ghp_" + "Zq9" * 12]
    rows = question_answer_rows(40)
    for i, secret in enumerate(secrets):
        rows[i]["question"] += f" Write to {secret} please."
    write_jsonl(own_project / "data" / "raw" / "own" / "mine.jsonl", rows)
    assert lorapipe(own_project, "use-data", "data/raw/own/mine.jsonl").returncode == 0
    storage = tmp_path / "storage"
    dvc_ok(own_project, "remote", "add", "--local", "-f", "-d", "storage", str(storage))
    commit_all(own_project, "own data with secrets")
    dvc_ok(own_project, "repro", "sanitize")
    local = (own_project / "data" / "split" / "train.jsonl").read_text() + (
        own_project / "data" / "preprocessed" / "rows.jsonl"
    ).read_text()
    assert all(secret in local for secret in secrets)  # there is raw text to leak

    dvc_ok(own_project, "push")
    files = [p for p in storage.rglob("*") if p.is_file()]
    assert len(files) > 3  # the base model and the sanitized data went
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret} in {path}"
