"""MLflow (or DagsHub) beside DVC: each stage adds what it wrote to one MLflow run per pipeline run.

Off unless MLFLOW_TRACKING_URI is set or params.yaml sets `tracking.mlflow_uri`; off, nothing
here imports MLflow or opens the DVC repo, so users who don't track install nothing more.

MLflow receives what git already holds and nothing else: params.yaml, flattened to the keys
`dvc params diff` shows, and the stage's committed outputs (`cache: false` in dvc.yaml): metrics
files as metrics (`metrics/train.json: best_val_loss` -> `metrics/train/best_val_loss`), DVCLive
folders as step series (`train/loss`, `val/loss`, the names `dvc plots` uses), every such file as
an artifact at its path in the repository, and dvc.yaml's top-level plots of them drawn as PNGs
under `plots/`. Models, data (cached outputs) and the environment never go there.

Which run: `dvc exp run` names its experiment (DVC_EXP_NAME, on its baseline commit
DVC_EXP_BASELINE_REV), and its stages share the run named after it. A plain `dvc repro` has no
name, so its stages share the run of this commit and params.yaml. A stage that a run already has
starts a new one (an edited stage re-run on the same commit is a new pipeline run, and MLflow
metric histories cannot be replaced).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lorapipe.errors import LorapipeError
from lorapipe.params import TrackingParams

INSTALL = "`uv sync --extra mlflow` (or `pip install 'lorapipe[mlflow]'`)"
RUN_KEY = "lorapipe.run_key"  # the tag that finds a pipeline run's MLflow run
GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own tag: the run page shows it


class TrackingError(LorapipeError):
    """MLflow tracking is asked for but cannot start."""


@dataclass(frozen=True)
class Target:
    uri: str
    experiment: str


def target(tracking: TrackingParams, env: Mapping[str, str]) -> Target | None:
    """Where runs go, or None (tracking off). The environment wins over params.yaml, so a CI job
    or one shell can point elsewhere without editing a committed file."""
    uri = env.get("MLFLOW_TRACKING_URI") or tracking.mlflow_uri
    if not uri:
        return None
    return Target(uri, env.get("MLFLOW_EXPERIMENT_NAME") or tracking.experiment)


def shown(uri: str) -> str:
    """The URI for messages: any user:password@ in it left out."""
    parts = urlsplit(uri)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


@dataclass(frozen=True)
class Identity:
    """Which pipeline run a stage belongs to."""

    key: str
    name: str
    tags: dict[str, str]


def identity(env: Mapping[str, str], commit: str | None, params_text: bytes) -> Identity:
    exp, baseline = env.get("DVC_EXP_NAME"), env.get("DVC_EXP_BASELINE_REV")
    if exp and baseline:
        tags = {"dvc.experiment": exp, "dvc.baseline_rev": baseline, GIT_COMMIT: baseline}
        return Identity(_digest(f"exp {baseline} {exp}".encode()), exp, tags)
    key = _digest(f"repro {commit} ".encode() + params_text)
    return Identity(key, f"workspace@{(commit or 'no-git')[:7]}", {GIT_COMMIT: commit or ""})


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def flat_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """params.yaml as `section.key: value` text, nested mappings flattened the way DVC does;
    lists, numbers, booleans and null as JSON (`[base, tuned]` -> `["base", "tuned"]`)."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return flat


def metric_name(*parts: str) -> str:
    """`a/b/c`, each part made one that MLflow accepts: letters, digits, `_ - . :` and spaces,
    anything else `_` (a JSON key such as `</think>` must not become a path)."""
    safe = (re.sub(r"[^\w.:\- ]", "_", p) for p in parts)
    return "/".join("_" if p in ("", ".", "..") else p for p in safe)


def flat_metrics(data: Any, prefix: str) -> dict[str, float]:
    """A metrics JSON's numbers (booleans as 0/1) by `prefix/key/subkey`; text is left out
    (the file itself is an artifact)."""
    if isinstance(data, Mapping):
        flat = {}
        for key, value in data.items():
            flat.update(flat_metrics(value, f"{prefix}/{metric_name(str(key))}"))
        return flat
    if isinstance(data, bool | int | float):
        return {prefix: float(data)}
    return {}


def read_table(path: Path) -> list[dict[str, str]]:
    """A plot file's rows (TSV or CSV with a header, as DVCLive and `dvc plots` read them)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))


@dataclass(frozen=True)
class Point:
    name: str
    value: float
    step: int
    timestamp_ms: int


def live_series(live_dir: Path) -> Iterator[Point]:
    """A DVCLive folder's step metrics (`plots/metrics/train/loss.tsv` -> `train/loss`)."""
    root = live_dir / "plots" / "metrics"
    now = int(time.time() * 1000)
    for path in sorted(root.rglob("*.tsv")):
        name = metric_name(*path.relative_to(root).with_suffix("").parts)
        for row in read_table(path):
            stamp = int(row["timestamp"]) if row.get("timestamp") else now
            yield Point(name, float(row[path.stem]), int(row["step"]), stamp)


@dataclass(frozen=True)
class Plot:
    """A top-level dvc.yaml plot: `y` maps a file (relative to the repository) to its fields."""

    title: str
    x: str
    y: dict[str, list[str]]


def plots_of(definitions: list[Any], written: list[str]) -> list[Plot]:
    """The `{title: {x, y: {file: field(s)}}}` plots drawn only from files in `written` (the
    stage's outputs); other plot forms are left to `dvc plots`."""
    found = []
    for entry in definitions:
        if not isinstance(entry, Mapping):
            continue
        for title, spec in entry.items():
            y = spec.get("y") if isinstance(spec, Mapping) else None
            if not isinstance(y, Mapping) or not y:
                continue
            files = {str(f): [v] if isinstance(v, str) else list(v) for f, v in y.items()}
            # Curves over steps from tables (DVCLive's TSVs); a bar chart of a JSON file (the
            # eval scores) goes to MLflow as its JSON and as metrics instead.
            tables = all(Path(f).suffix in (".tsv", ".csv") for f in files)
            if tables and all(any(_under(f, out) for out in written) for f in files):
                found.append(Plot(str(title), str(spec.get("x", "step")), files))
    return found


def _under(path: str, out: str) -> bool:
    return path == out or path.startswith(out.rstrip("/") + "/")


def draw(plot: Plot, root: Path, dest: Path) -> None:
    """The plot as a PNG: a line per (file, field), labelled `folder/field` (`val/loss`)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for file, fields in plot.y.items():
        rows = read_table(root / file)
        for y in fields:
            xs = [float(r[plot.x]) for r in rows]
            ax.plot(xs, [float(r[y]) for r in rows], label=f"{Path(file).parent.name}/{y}")
    ax.set_title(plot.title)
    ax.set_xlabel(plot.x)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(dest, dpi=100, bbox_inches="tight")
    plt.close(fig)


@dataclass(frozen=True)
class Outputs:
    """What a stage's run adds to MLflow, from its outputs in dvc.yaml (paths relative to the
    repository root)."""

    metrics: list[str]  # JSON metrics files
    artifacts: list[str]  # committed files and folders (DVCLive's too: their steps are logged)
    plots: list[Plot]


def stage_outputs(addressing: str) -> tuple[Path, Outputs]:
    """The repository root and stage `addressing`'s committed outputs, read through DVC (so
    `${paths.x}`, `foreach` and `matrix` stages such as `eval@base` resolve as `dvc repro` sees
    them)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            (stage,) = repo.stage.collect(addressing)
            root = Path(repo.root_dir)
            committed = [o for o in stage.outs if not o.use_cache]
            names = [os.path.relpath(o.fs_path, root) for o in committed]
            plots = plots_of(stage.dvcfile.plots, names) if hasattr(stage.dvcfile, "plots") else []
    except (DvcException, ValueError) as exc:
        raise TrackingError(
            f"MLflow tracking needs the stage's outputs from dvc.yaml, and DVC says: {exc}; run "
            "lorapipe in the project folder (the one with dvc.yaml)"
        ) from exc
    outputs = Outputs(
        metrics=[n for o, n in zip(committed, names, strict=True) if o.metric],
        artifacts=names,
        plots=plots,
    )
    return root, outputs


class Run:
    """The MLflow run a stage adds to: found or made before the stage runs (so a wrong address
    or password stops the stage before hours of training, not after), filled in after it."""

    def __init__(self, client: Any, run_id: str, stage: str, root: Path, outputs: Outputs):
        self.client, self.run_id, self.stage = client, run_id, stage
        self.root, self.outputs = root, outputs

    def finish(self, code: int) -> None:
        """Log the stage's outputs (when it succeeded) and its fate. A failure here only warns:
        the stage's outputs are complete and DVC records them; MLflow misses this stage."""
        from mlflow.exceptions import MlflowException
        from requests.exceptions import RequestException

        try:
            if code == 0:
                self._log_outputs()
            fate = "finished" if code == 0 else "failed"
            self.client.set_tag(self.run_id, metric_name("lorapipe.stage", self.stage), fate)
            status = {0: "FINISHED", 130: "KILLED"}.get(code, "FAILED")
            self.client.set_terminated(self.run_id, status)
        except (MlflowException, RequestException, OSError, ValueError, KeyError) as exc:
            print(
                f"lorapipe {self.stage}: warning: MLflow did not get this stage's results "
                f"({exc}); its outputs are complete and DVC has them",
                file=sys.stderr,
            )

    def _log_outputs(self) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(name, value, now, 0)
            for file in self.outputs.metrics
            for name, value in flat_metrics(
                json.loads((self.root / file).read_text(encoding="utf-8")),
                metric_name(*Path(file).with_suffix("").parts),
            ).items()
        ]
        for name in self.outputs.artifacts:
            if (self.root / name / "plots" / "metrics").is_dir():  # a DVCLive folder
                metrics += [
                    Metric(p.name, p.value, p.timestamp_ms, p.step)
                    for p in live_series(self.root / name)
                ]
        self.client.log_batch(self.run_id, metrics=metrics)
        for name in self.outputs.artifacts:
            path, folder = self.root / name, str(Path(name).parent)
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), name)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path), None if folder == "." else folder)
        with tempfile.TemporaryDirectory() as tmp:
            for plot in self.outputs.plots:
                dest = Path(tmp) / f"{plot.title.replace('/', '_')}.png"
                draw(plot, self.root, dest)
                self.client.log_artifact(self.run_id, str(dest), "plots")


def start(stage: str, params_path: str, env: Mapping[str, str]) -> Run | None:
    """Tracking for `lorapipe <stage>`: None when it is off; else the run, RUNNING, holding the
    params and tags. Raises TrackingError when it is on but cannot work."""
    from lorapipe.params import load_params

    where = target(load_params(params_path).tracking, env)
    if where is None:
        return None
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from requests.exceptions import RequestException
    except ImportError as exc:
        raise TrackingError(
            f"MLflow tracking is on ({shown(where.uri)}) but MLflow is not installed ({exc}); "
            f"install the extra: {INSTALL}, or unset MLFLOW_TRACKING_URI and tracking.mlflow_uri"
        ) from exc
    from lorapipe.provenance import git_commit

    addressing = env.get("DVC_STAGE") or stage  # `eval@base` under DVC
    root, outputs = stage_outputs(addressing)
    params_text = Path(params_path).read_bytes()
    who = identity(env, git_commit()["commit"], params_text)
    client = MlflowClient(tracking_uri=where.uri)
    try:
        run_id = _run_for(client, where.experiment, who, addressing, params_text)
        client.update_run(run_id, status="RUNNING")
    except (MlflowException, RequestException, OSError) as exc:
        raise TrackingError(f"MLflow at {shown(where.uri)}: {exc}") from exc
    return Run(client, run_id, addressing, root, outputs)


def _run_for(client: Any, experiment: str, who: Identity, stage: str, params_text: bytes) -> str:
    """The run of pipeline run `who` that has no results of `stage` yet, or a new one."""
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException
    from ruamel.yaml import YAML

    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        try:
            experiment_id = client.create_experiment(experiment)
        except MlflowException:  # made by a run beside this one (dvc queue workers)
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    latest = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_KEY}` = '{who.key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    done = metric_name("lorapipe.stage", stage)
    if latest and latest[0].data.tags.get(done) != "finished":
        return str(latest[0].info.run_id)
    run = client.create_run(experiment_id, run_name=who.name, tags={RUN_KEY: who.key})
    params = flat_params(YAML(typ="safe").load(params_text.decode("utf-8")))
    client.log_batch(
        run.info.run_id,
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in who.tags.items() if v],
    )
    return str(run.info.run_id)
