"""The README's experiment flows, end to end, as a user types them: in temporary copies of the
repository, on the tiny model (a shrunken run), with the real `dvc` and `git`.

One baseline `dvc repro` (module fixture) is shared: flows that need their own workspace get a
`git clone` of it that shares its DVC cache, as a teammate on the same machine would.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    BRANCH,
    commit_all,
    dvc,
    dvc_ok,
    git,
    queue,
    ran_stages,
    run_queue,
    tiny_project,
    tree_digest,
)

pytestmark = pytest.mark.slow  # every test here runs the pipeline at least once

DATA_STAGES = ["base", "preprocess", "split", "sanitize"]
AFTER_TRAIN = ["train", "fuse", "quantize", "eval@tuned", "eval@quantized", "report"]
ALL_STAGES = [*DATA_STAGES, "eval@base", *AFTER_TRAIN]
# The metric the flows rank by: exact match is 0 for every random tiny model, the loss is not.
RANK_BY = ("metrics/eval/tuned.json", "tuned.test_loss")
MODELS = ("base", "tuned", "quantized")


# --- projects ---------------------------------------------------------------------------------


def clone_of(source: Path, dest: Path) -> Path:
    """A teammate's clone on the same machine: `git clone`, sharing the DVC cache."""
    git(dest.parent, "clone", "-q", str(source), dest.name)
    dvc_ok(dest, "cache", "dir", "--local", str(source / ".dvc" / "cache"))
    dvc_ok(dest, "checkout")
    return dest


def outcomes(log: str) -> dict[str, str]:
    """Each stage's fate in the output of `dvc repro` / `dvc exp run`: ran, unchanged, or
    restored (DVC's run cache had outputs for exactly these deps and params)."""
    patterns = {
        "ran": r"Running stage '([^']+)'",
        "unchanged": r"Stage '([^']+)' didn't change, skipping",
        "restored": r"Stage '([^']+)' is cached - skipping run",
    }
    found = {}
    for line in log.splitlines():
        for outcome, pattern in patterns.items():
            if match := re.match(pattern, line):
                found[match[1]] = outcome
    return found


def assert_reran_from_train(log: str) -> None:
    """base, the data stages and the base model's evaluation untouched; train ran; fuse,
    quantize, the other evaluations and the report ran or were restored from the run cache (an
    identical adapter was fused before)."""
    fate = outcomes(log)
    assert [fate.get(s) for s in [*DATA_STAGES, "eval@base"]] == ["unchanged"] * 5, log
    assert fate.get("train") == "ran", log
    assert all(fate.get(s) in ("ran", "restored") for s in AFTER_TRAIN[1:]), log


# --- reading `dvc exp show --json` ------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row of `dvc exp show`: the baseline commit or an experiment."""

    name: str  # the branch for the baseline, the experiment's name otherwise
    rev: str
    is_baseline: bool
    params: dict[str, Any]  # params.yaml
    metrics: dict[str, Any]  # metrics file -> its data
    outs: dict[str, str]  # output path -> hash
    state: str | None  # queued runs: success, failed, ...; None for the others

    def param(self, dotted: str) -> Any:
        return dig(self.params, dotted)

    def metric(self, file: str, dotted: str) -> Any:
        return dig(self.metrics[file], dotted)


def dig(data: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        data = data[key]
    return data


def exp_rows(project: Path) -> list[Row]:
    shown = json.loads(dvc_ok(project, "exp", "show", "--json").stdout)

    def row(entry: dict[str, Any], name: str, baseline: bool, state: str | None) -> Row:
        data = entry["data"]
        return Row(
            name=name,
            rev=entry["rev"],
            is_baseline=baseline,
            params=data["params"]["params.yaml"]["data"],
            metrics={f: m["data"] for f, m in data["metrics"].items()},
            outs={p: o["hash"] for p, o in data["outs"].items()},
            state=state,
        )

    rows = []
    for commit in shown:
        if commit["rev"] == "workspace":
            continue
        rows.append(row(commit, commit["name"], True, None))
        for exp in commit.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            rows.extend(row(rev, exp["name"], False, state) for rev in exp["revs"])
    return rows


def by_name(project: Path) -> dict[str, Row]:
    return {r.name: r for r in exp_rows(project)}


# --- fixtures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    project: Path
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]
    second_seconds: float


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Baseline:
    """Flow 1's fresh copy after `dvc repro` twice, then committed: the baseline of the others."""
    project = tiny_project(tmp_path_factory.mktemp("baseline") / "lorapipe", tiny_model_dir)
    first = dvc_ok(project, "repro")
    start = time.monotonic()
    second = dvc_ok(project, "repro")
    seconds = time.monotonic() - start
    commit_all(project, "baseline run")
    return Baseline(project, first, second, seconds)


@dataclass(frozen=True)
class Grid:
    project: Path
    names: list[str]  # the queued experiments, in the order of `-S lora.rank=2,4,16`


@pytest.fixture(scope="module")
def grid(baseline: Baseline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    """Flow 3's grid, queued and run two at a time in a clone of the baseline."""
    project = clone_of(baseline.project, tmp_path_factory.mktemp("grid") / "lorapipe")
    names = queue(project, "lora.rank=2,4,16")
    try:
        run_queue(project, names)
        yield Grid(project, names)
    finally:
        dvc(project, "queue", "stop", "--kill")  # nothing to stop unless a run hung


# --- the flows --------------------------------------------------------------------------------


def test_repro_runs_every_stage_then_nothing(baseline: Baseline) -> None:
    """Flow 1: `dvc repro` on a fresh copy runs every stage; a second one runs none, fast."""
    assert sorted(ran_stages(baseline.first)) == sorted(ALL_STAGES), baseline.first.stdout
    assert ran_stages(baseline.second) == []
    assert "Data and pipelines are up to date." in baseline.second.stdout
    print(f"second `dvc repro`: {baseline.second_seconds:.1f} s")
    assert baseline.second_seconds < 30
    status = dvc_ok(baseline.project, "status")
    assert "Data and pipelines are up to date." in status.stdout
    eval_metrics = {
        model: json.loads((baseline.project / f"metrics/eval/{model}.json").read_text())[model]
        for model in MODELS
    }
    # Fine-tuning, even 20 steps of it, lowers the test loss of a random model.
    assert eval_metrics["tuned"]["test_loss"] < eval_metrics["base"]["test_loss"]


def test_a_retrain_to_the_same_adapter_reevaluates_nothing(
    baseline: Baseline, tmp_path: Path
) -> None:
    """Training's timings (metrics/train.json) change on every run; only the report reads them.
    A forced retrain that makes the same adapter byte for byte re-runs the report alone."""
    import shutil

    project = clone_of(baseline.project, tmp_path / "lorapipe")
    adapter = (project / "models/adapters/adapters.safetensors").read_bytes()
    summary = (project / "metrics/train.json").read_text()
    shutil.rmtree(project / "models/checkpoints")  # from step 0, not resumed at the end
    dvc_ok(project, "repro", "--force", "--single-item", "train")
    assert (project / "models/adapters/adapters.safetensors").read_bytes() == adapter
    assert (project / "metrics/train.json").read_text() != summary  # its timings
    fate = outcomes(dvc_ok(project, "repro").stdout)
    assert {s: fate.get(s) for s in fate if fate[s] == "ran"} == {"report": "ran"}, fate
    assert all(fate.get(s) == "unchanged" for s in ALL_STAGES if s != "report"), fate


def test_exp_run_with_another_rank_reruns_train_and_after_only(
    baseline: Baseline, tmp_path: Path
) -> None:
    """Flow 2: `dvc exp run -S lora.rank=4` (the default is 8) re-runs train and what follows;
    `dvc exp show` lists it next to the baseline with its params and metrics."""
    project = clone_of(baseline.project, tmp_path / "lorapipe")
    result = dvc_ok(project, "exp", "run", "-S", "lora.rank=4")
    assert_reran_from_train(result.stdout)
    name = re.search(r"Ran experiment\(s\): (\S+)", result.stdout)
    assert name, result.stdout

    rows = by_name(project)
    base, exp = rows[BRANCH], rows[name[1]]
    assert base.is_baseline and not exp.is_baseline
    assert (base.param("lora.rank"), exp.param("lora.rank")) == (8, 4)
    for row in (base, exp):
        assert row.metric(*RANK_BY) > 0
        assert row.metric("metrics/train.json", "steps") == 20
    assert exp.metric(*RANK_BY) != base.metric(*RANK_BY)
    assert exp.outs["models/base"] == base.outs["models/base"]
    assert exp.outs["data/sanitized"] == base.outs["data/sanitized"]
    assert exp.outs["models/adapters"] != base.outs["models/adapters"]

    table = dvc_ok(project, "exp", "show", "--csv", "--only-changed").stdout
    header, *lines = list(csv.reader(io.StringIO(table)))
    assert "lora.rank" in header and "tuned.test_loss" in header, header  # a column per model
    # The base model was not re-evaluated: its scores did not change, so --only-changed hides them.
    assert "base.test_loss" not in header, header
    ranks = {line[0] or line[1]: line[header.index("lora.rank")] for line in lines}
    assert ranks[BRANCH] == "8" and ranks[name[1]] == "4", table


def test_queued_grid_runs_and_ranks_by_a_metric(grid: Grid) -> None:
    """Flow 3: `dvc exp run --queue -S 'lora.rank=2,4,16'` + `dvc queue start -j 2` run three
    experiments from git commits; `dvc exp show --only-changed --sort-by` ranks them."""
    rows = by_name(grid.project)
    runs = [rows[n] for n in grid.names]
    assert [r.param("lora.rank") for r in runs] == [2, 4, 16]
    assert all(r.state == "success" for r in runs)
    assert len({r.outs["models/adapters"] for r in runs}) == 3
    for name in grid.names:
        # A queued run starts from a git commit plus DVC's cache: the data stages' outputs
        # came from the cache, so only training and what follows ran.
        assert_reran_from_train(dvc_ok(grid.project, "queue", "logs", name).stdout)

    file, key = RANK_BY
    table = dvc_ok(
        grid.project,
        "exp", "show", "--csv", "--only-changed",
        "--sort-by", f"{file}:{key}", "--sort-order", "asc",
    ).stdout  # fmt: skip
    header, *lines = list(csv.reader(io.StringIO(table)))
    assert "lora.rank" in header and key in header, header
    assert "train.iters" not in header and "iters" not in header  # --only-changed
    shown = [line[0] for line in lines if line[0] in grid.names]
    expected = sorted(grid.names, key=lambda n: rows[n].metric(file, key))
    assert shown == expected, table
    losses = [float(line[header.index(key)]) for line in lines if line[0] in grid.names]
    assert losses == sorted(losses)


def test_two_base_models_run_as_queued_experiments(baseline: Baseline, tmp_path: Path) -> None:
    """Flow 4: two local base models, tracked with `dvc add` under models/sources/, run the same
    way with `dvc exp run --queue -S model.source=...`."""
    from tests.tiny_model import build_tiny_model

    project = clone_of(baseline.project, tmp_path / "lorapipe")
    sources = ["models/sources/tiny-a", "models/sources/tiny-b"]
    for seed, source in enumerate(sources, start=1):
        build_tiny_model(project / source, seed=seed)
    dvc_ok(project, "add", *sources)
    # A queued run starts from a git commit of the workspace: staged files go in, untracked
    # ones do not. The shipped `core.autostage` made `dvc add` stage the .dvc files.
    staged = git(project, "diff", "--cached", "--name-only").split()
    assert {f"{s}.dvc" for s in sources} <= set(staged), staged

    names = [n for s in sources for n in queue(project, f"model.source={s}")]
    run_queue(project, names)

    rows = by_name(project)
    a, b = rows[names[0]], rows[names[1]]
    assert (a.param("model.source"), b.param("model.source")) == tuple(sources)
    for name in names:
        # From the new base model on; the data stages re-run only where the base model's
        # tokenizer changed what they write (the two tiny models share one).
        log = dvc_ok(project, "queue", "logs", name).stdout
        fate = outcomes(log)
        stages = ("base", "eval@base", *AFTER_TRAIN)
        assert [fate.get(s) for s in stages] == ["ran"] * len(stages), log
    assert a.outs["models/base"] != b.outs["models/base"] != rows[BRANCH].outs["models/base"]
    assert a.metric("metrics/eval/base.json", "base.test_loss") != b.metric(
        "metrics/eval/base.json", "base.test_loss"
    )
    table = dvc_ok(project, "exp", "show", "--csv", "--only-changed").stdout
    assert "model.source" in table.splitlines()[0]


def test_plots_and_metrics_diff_against_the_baseline(grid: Grid, tmp_path: Path) -> None:
    """Flow 5: `dvc plots diff` draws the training curves and eval scores of the baseline and the
    experiments in one HTML page; `dvc metrics diff` prints what changed."""
    out = tmp_path / "plots"
    dvc_ok(grid.project, "plots", "diff", BRANCH, *grid.names, "-o", str(out))
    page = (out / "index.html").read_text()
    for plot in ("Loss", "Learning_rate", "Tokens_per_second", "Exact_match_by_model"):
        assert f'<div id = "{plot}"' in page, plot
    # The page embeds each plot's data points, tagged with their revision: every revision has
    # its own validation curve (its committed TSV) and its own eval scores.
    points = [json.loads(p) for p in re.findall(r'\{[^{}]*"rev": "[^"]*"[^{}]*\}', page)]
    rows = by_name(grid.project)
    train_log = yaml.safe_load((grid.project / "params.yaml").read_text())["paths"]["train_log"]
    for name in (BRANCH, *grid.names):
        mine = [p for p in points if p["rev"] == name]
        curve = {(p["step"], p["loss"]) for p in mine if p.get("filename") == "val/loss.tsv"}
        tsv = git(grid.project, "show", f"{rows[name].rev}:{train_log}/plots/metrics/val/loss.tsv")
        assert curve == {tuple(line.split("\t")) for line in tsv.splitlines()[1:]}, name
        scores = {p["model"]: p["test_loss"] for p in mine if "model" in p}
        assert scores == {
            model: rows[name].metric(f"metrics/eval/{model}.json", f"{model}.test_loss")
            for model in MODELS
        }, name

    winner = min(grid.names, key=lambda n: rows[n].metric(*RANK_BY))
    diff = dvc_ok(grid.project, "metrics", "diff", BRANCH, winner).stdout
    lines = [line.split() for line in diff.splitlines()]
    tuned = next(line for line in lines if line[:2] == list(RANK_BY))  # path, metric, ...
    old, new = rows[BRANCH].metric(*RANK_BY), rows[winner].metric(*RANK_BY)
    assert [float(v) for v in tuned[2:5]] == pytest.approx([old, new, new - old], abs=1e-4)
    assert not any(line[:2] == ["metrics/data.json", "splits.train.rows"] for line in lines)


def test_promote_a_winner_and_share_experiments_through_git(grid: Grid, tmp_path: Path) -> None:
    """Flow 6: `dvc exp apply` and `dvc exp branch` promote the best run; `dvc exp push` /
    `dvc exp pull` share experiments (refs through git, outputs through the DVC remote)."""
    project = grid.project
    rows = by_name(project)
    winner = min(grid.names, key=lambda n: rows[n].metric(*RANK_BY))

    dvc_ok(project, "exp", "apply", winner)
    applied = yaml.safe_load((project / "params.yaml").read_text())
    assert applied["lora"]["rank"] == rows[winner].param("lora.rank")
    assert "Data and pipelines are up to date." in dvc_ok(project, "status").stdout
    for model in MODELS:
        file = f"metrics/eval/{model}.json"
        assert json.loads((project / file).read_text()) == rows[winner].metrics[file]

    dvc_ok(project, "exp", "branch", winner, "best-rank")
    on_branch = yaml.safe_load(git(project, "show", "best-rank:params.yaml"))
    assert on_branch["lora"]["rank"] == rows[winner].param("lora.rank")

    # A real git remote: a bare repository. The DVC remote is the shipped default, a folder
    # beside the clones (../lorapipe-storage), so both clones below reach the same one.
    origin = project.parent / "origin.git"
    git(project.parent, "init", "-q", "--bare", "-b", BRANCH, str(origin))
    git(project, "remote", "add", "shared", str(origin))
    git(project, "push", "-q", "shared", BRANCH)
    dvc_ok(project, "exp", "push", "shared", *grid.names)
    refs = git(project, "ls-remote", str(origin), "refs/exps/*")
    assert all(name in refs for name in grid.names), refs

    other = project.parent / "teammate"
    git(project.parent, "clone", "-q", str(origin), other.name)
    assert by_name(other).keys() == {BRANCH}
    dvc_ok(other, "exp", "pull", "origin", winner)
    pulled = by_name(other)[winner]
    assert pulled.metrics == rows[winner].metrics and pulled.params == rows[winner].params
    # The raw-text data folders are never pushed (push: false): `dvc exp apply` applies the
    # run and every output the remote has, then names those two as missing.
    applied = dvc(other, "exp", "apply", winner)
    missing = applied.stderr.split("Checkout failed for following targets:")[-1]
    assert applied.returncode != 0 and "data/split" in missing and "data/preprocessed" in missing
    assert "models/" not in missing
    for out in ("models/adapters", "models/quantized"):
        assert tree_digest(other / out) == tree_digest(project / out), out
    assert ran_stages(dvc_ok(other, "repro")) == ["preprocess", "split"]  # remade from data/raw
