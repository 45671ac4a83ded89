"""MLflow tracking, end to end: a real MLflow server on loopback (sqlite, artifacts served over
HTTP as DagsHub's are), the pipeline run by `dvc repro` and `dvc exp run` on the tiny model, and
everything read back through MLflow's client."""

from __future__ import annotations

import functools
import json
import operator
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.helpers import SECRETS, commit_all, dvc_ok, git, tiny_project


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a free loopback port; its URL."""
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its uvicorn workers go down with it
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # about a minute on a busy 2-core machine
        while not _healthy(url):
            assert proc.poll() is None and time.monotonic() < deadline, (
                root / "server.log"
            ).read_text()[-3000:]
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def leaves(data: Any, prefix: str) -> dict[str, float]:
    """A metrics JSON's numbers by `prefix/key/subkey` (booleans as 0/1; keys as MLflow allows:
    data.json counts `(?s)<think>.*?</think>`)."""
    from lorapipe.mlflow_sync import metric_name

    if not isinstance(data, dict):
        return {prefix: float(data)} if isinstance(data, int | float) else {}
    found = {}
    for key, value in data.items():
        found.update(leaves(value, f"{prefix}/{metric_name(key)}"))
    return found


@pytest.mark.slow
def test_a_repro_and_an_experiment_are_one_mlflow_run_each(
    server: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    from mlflow.tracking import MlflowClient

    project = tiny_project(tmp_path / "lorapipe", tiny_model_dir)
    # What a DagsHub user sets; the password is one more secret that must not get into a run.
    env = {
        "MLFLOW_TRACKING_URI": server,
        "MLFLOW_TRACKING_USERNAME": "someone",
        "MLFLOW_TRACKING_PASSWORD": "dh_" + "9xK" * 12,
        **SECRETS,
    }
    dvc_ok(project, "repro", env=env)
    commit_all(project, "tracked run")
    head = git(project, "rev-parse", "HEAD").strip()

    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name("lorapipe")
    (run,) = client.search_runs([experiment.experiment_id])  # every stage in one run
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    stages = ["base", "preprocess", "split", "sanitize", "train", "fuse", "quantize", "report"]
    stages += [f"eval_{model}" for model in ("base", "tuned", "quantized")]  # eval@base, ...
    assert all(run.data.tags[f"lorapipe.stage/{s}"] == "finished" for s in stages)
    assert run.data.tags["mlflow.source.git.commit"] == git(project, "rev-parse", "HEAD~1").strip()

    # Params: every key of params.yaml as DVC flattens it; values as written (JSON but text).
    keys = json.loads(dvc_ok(project, "params", "diff", "--all", "--json").stdout)["params.yaml"]
    assert set(run.data.params) == set(keys)
    written = YAML(typ="safe").load(project / "params.yaml")  # as DVC reads it
    for key in keys:
        value = functools.reduce(operator.getitem, key.split("."), written)
        assert run.data.params[key] == (value if isinstance(value, str) else json.dumps(value))

    # Every stage's final metrics, and training's step metrics with their steps.
    for path in (project / "metrics").rglob("*.json"):
        prefix = path.relative_to(project).with_suffix("").as_posix()  # metrics/eval/tuned
        for name, value in leaves(json.loads(path.read_text()), prefix).items():
            assert run.data.metrics[name] == pytest.approx(value), name
    live = project / "dvclive" / "train" / "plots" / "metrics"
    for series in ("train/loss", "val/loss", "train/learning_rate"):
        rows = [r.split("\t") for r in (live / f"{series}.tsv").read_text().splitlines()[1:]]
        logged = sorted(client.get_metric_history(run_id, series), key=lambda h: h.step)
        assert len(rows) >= 2
        assert [(h.step, h.value) for h in logged] == [(int(s), float(v)) for s, v in rows]

    # The reports and the plots, as files.
    got = Path(client.download_artifacts(run_id, "", str(tmp_path / "got")))
    for report in ("reports/data.md", "reports/eval.md", "metrics/eval/tuned.json"):
        assert (got / report).read_bytes() == (project / report).read_bytes()
    assert (got / "plots" / "Loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not (got / "models").exists() and not (got / "data").exists()

    # No secret from the environment anywhere in the run.
    texts = [json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics)])]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in got.rglob("*") if p.is_file()]
    for name, value in {**SECRETS, "password": env["MLFLOW_TRACKING_PASSWORD"]}.items():
        assert not any(value in text for text in texts), f"{name} leaked"

    # `dvc exp run`: a run of its own, named as `dvc exp show` names the experiment.
    ran = dvc_ok(project, "exp", "run", "-S", "eval.max_rows=4", env=env)
    exp_names = [e["name"] for c in json.loads(dvc_ok(project, "exp", "show", "--json").stdout)
                 for e in c.get("experiments") or []]  # fmt: skip
    assert len(exp_names) == 1 and exp_names[0] in ran.stdout
    (exp,) = client.search_runs(
        [experiment.experiment_id], f"tags.`dvc.experiment` = '{exp_names[0]}'"
    )
    assert exp.info.run_name == exp_names[0]
    assert exp.data.tags["dvc.baseline_rev"] == exp.data.tags["mlflow.source.git.commit"] == head
    assert exp.data.params["eval.max_rows"] == "4"
    assert "metrics/eval/tuned/tuned/test_loss" in exp.data.metrics
    assert len(client.search_runs([experiment.experiment_id])) == 2
