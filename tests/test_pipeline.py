"""The pipeline as a user runs it: `dvc repro` in a fresh copy of the repository."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tests.helpers import REPO, copy_repo, dvc, ran_stages, set_params

# Modules every stage runs that shape no stage's results: exceptions, file plumbing (atomic
# writes, JSONL reading), params.yaml loading (its values are the stages' `params`), the BLAS
# set-up, the console, progress logs and the machine record (reports/run.json).
PLUMBING = {"errors", "io", "params", "runtime", "cli", "tracking", "provenance"}


def lorapipe_imports(path: Path) -> set[Path]:
    """The lorapipe modules `path` imports anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            module = REPO / "src" / (name.replace(".", "/") + ".py")
            if name.startswith("lorapipe.") and module.is_file():
                found.add(module)
    return found


def test_every_stage_lists_the_code_it_runs_as_deps() -> None:
    """A module a stage runs but dvc.yaml does not list would not re-run the stage when it
    changes (the training step's src/lorapipe/fast.py once went missing that way)."""
    from ruamel.yaml import YAML

    stages = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]
    for name, group in stages.items():
        stage = group.get("do", group)  # eval: one stage per model (foreach)
        deps = {str(d).split()[0] for d in stage["deps"]}
        todo, seen = [REPO / "src/lorapipe/stages" / f"{stage['cmd'].split()[1]}.py"], set()
        while todo:
            module = todo.pop()
            if module not in seen and module.stem not in PLUMBING:
                seen.add(module)
                todo.extend(lorapipe_imports(module))
        missing = sorted({str(m.relative_to(REPO)) for m in seen} - deps)
        assert not missing, f"dvc.yaml stage {name} runs but does not list {missing}"


@pytest.mark.slow
def test_fresh_clone_imports_the_embedded_model_offline(tmp_path: Path) -> None:
    project = copy_repo(tmp_path / "clone")
    result = dvc(project, "repro", "base")
    assert result.returncode == 0, result.stdout + result.stderr

    from mlx_lm import generate, load

    model, tokenizer = load(str(project / "models" / "base"))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    answer = generate(model, tokenizer, prompt=prompt, max_tokens=20)  # greedy by default
    assert "Paris" in answer

    again = dvc(project, "repro", "base")
    assert again.returncode == 0
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout


def test_data_stages_with_dvc_repro_and_a_split_seed_change(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    project = copy_repo(tmp_path / "clone")
    set_params(project, **{"model.source": str(tiny_model_dir)})

    first = dvc(project, "repro", "sanitize")
    assert first.returncode == 0, first.stdout + first.stderr
    assert ran_stages(first) == ["base", "preprocess", "split", "sanitize"]
    data = json.loads((project / "metrics" / "data.json").read_text())
    pre, spl = data["preprocess"], data["split"]
    assert pre["rows_in"] == pre["kept"] + pre["rejected"] + pre["quarantined"]
    assert spl["rows_in"] == pre["kept"]
    sanitized = {n: s["rows"] + s["quarantined"] for n, s in data["splits"].items()}
    assert sum(sanitized.values()) == spl["rows_in"] - spl["duplicates_dropped"]
    for name in ("train", "valid", "test"):
        lines = (project / "data" / "sanitized" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == data["splits"][name]["rows"] > 0
    assert "PII and secrets found" in (project / "reports" / "data.md").read_text()

    shown = dvc(project, "metrics", "show")
    assert "splits.train.rows" in shown.stdout, shown.stdout

    set_params(project, **{"split.seed": 7})
    second = dvc(project, "repro", "sanitize")
    assert second.returncode == 0, second.stdout + second.stderr
    assert ran_stages(second) == ["split", "sanitize"]
