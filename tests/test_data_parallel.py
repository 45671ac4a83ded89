"""Data-parallel training through mlx.launch, on the ring backend over loopback (CPU): the
process count changes the speed, not the result."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import cli, make_project, outcome, set_params, start, wait_for_checkpoint

STEPS = 20
TWO = {"LORAPIPE_PROCESSES": "2", "LORAPIPE_DISTRIBUTED": "ring"}


def short_project(path: Path, tiny_model_dir: Path, steps: int = STEPS) -> Path:
    project = make_project(path, tiny_model_dir)
    set_params(
        project,
        **{
            "train.iters": steps,
            "train.steps_per_report": 5,
            "train.steps_per_eval": 10,
            "train.save_every": 10,
            "lora.dropout": 0.0,  # dropout masks are drawn per process: not shared
        },
    )
    return project


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The reference: the same run in one process."""
    project = short_project(tmp_path_factory.mktemp("dp") / "one", tiny_model_dir)
    result = cli(project, "train")
    assert result.returncode == 0, result.stderr
    return project


def assert_same_training(got: Path, want: Path) -> None:
    """Same losses and adapter to float tolerance (sums over processes round differently)."""
    import mlx.core as mx

    adapters, train_loss, val_loss = outcome(got)
    ref_adapters, ref_train, ref_val = outcome(want)
    for rows, ref_rows in ((train_loss, ref_train), (val_loss, ref_val)):
        assert [r[0] for r in rows] == [r[0] for r in ref_rows]  # the same steps
        assert [float(r[1]) for r in rows[1:]] == pytest.approx(
            [float(r[1]) for r in ref_rows[1:]], rel=1e-4
        )
    assert adapters.keys() == ref_adapters.keys()
    for name, value in ref_adapters.items():
        assert mx.allclose(adapters[name], value, rtol=1e-3, atol=1e-5).item(), name


def test_two_processes_train_as_one_at_the_same_global_batch(
    one_process: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    project = short_project(tmp_path / "two", tiny_model_dir)
    result = cli(project, "train", env=TWO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mlx.launch --backend ring -n 2" in result.stdout
    assert "2 processes" in result.stdout
    assert_same_training(project, one_process)
    # One process wrote: one log, one set of plots.
    log = (project / "models" / "checkpoints" / "train.log").read_text()
    assert log.count("val_loss") == len(outcome(project)[2]) - 1


def test_a_killed_process_ends_the_run_and_one_process_resumes_it(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import psutil

    steps = 300  # long enough to be killed in the middle
    reference = short_project(tmp_path / "reference", tiny_model_dir, steps)
    assert cli(reference, "train").returncode == 0
    project = short_project(tmp_path / "killed", tiny_model_dir, steps)
    proc = start(project, "train", env=TWO)
    wait_for_checkpoint(project, proc, 10)
    ranks = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "lorapipe.cli" in " ".join(p.cmdline())
    ]
    victim = next(p for p in ranks if p.environ().get("MLX_RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    started = time.monotonic()
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the run must fail when a process dies"
    assert time.monotonic() - started < 60, "the other process must not hang"
    assert "process 1 (killed or lost) of 2 did not finish" in err
    assert "run `dvc repro train` to resume" in err
    assert not (project / "models" / "adapters").exists(), "no complete-looking output"
    assert (project / "models" / "checkpoints" / "latest.json").is_file()

    resumed = cli(project, "train")  # one process this time
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from models/checkpoints/step-00000" in resumed.stdout
    assert_same_training(project, reference)


def test_two_processes_evaluate_as_one(one_process: Path, tmp_path: Path) -> None:

    import json

    project = tmp_path / "eval"
    shutil.copytree(one_process, project)
    sanitized = project / "data" / "sanitized"
    shutil.copy(sanitized / "train.jsonl", sanitized / "test.jsonl")  # 48 rows: 3 prompts a batch
    set_params(project, **{"eval.batch_size": 4})
    outputs = ("metrics/eval/base.json", "reports/generations/base.jsonl")

    whole = cli(project, "eval", "base")
    assert whole.returncode == 0, whole.stderr
    want = {name: (project / name).read_text() for name in outputs}
    shared = cli(project, "eval", "base", env=TWO)
    assert shared.returncode == 0, shared.stdout + shared.stderr
    assert "mlx.launch --backend ring -n 2" in shared.stdout
    assert shared.stdout.count("eval: base:") == 1  # rank 0 speaks for both
    assert "eval: 2 processes generated 24 + 24 of 48 prompts" in shared.stdout
    got = {name: (project / name).read_text() for name in outputs}

    assert got["reports/generations/base.jsonl"] == want["reports/generations/base.jsonl"]
    scores = json.loads(got["metrics/eval/base.json"])
    ref_scores = json.loads(want["metrics/eval/base.json"])
    speed = "generation_tokens_per_second"
    assert {k: v for k, v in scores["base"].items() if k != speed} == pytest.approx(
        {k: v for k, v in ref_scores["base"].items() if k != speed}, rel=1e-4
    )


def test_a_batch_the_processes_cannot_share_is_refused(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    project = short_project(tmp_path / "odd", tiny_model_dir)
    set_params(project, **{"train.batch_size": 3})
    result = cli(project, "train", env=TWO)
    assert result.returncode != 0
    assert "train.batch_size: 3 rows cannot be shared by 2 processes" in result.stderr
    shutil.rmtree(project)


def test_the_launch_command_comes_from_one_setting(tmp_path: Path) -> None:
    import os
    import sys

    from lorapipe.launch import LaunchError, launch_command

    assert launch_command(["train"], {}) is None  # one process: nothing to launch
    assert launch_command(["train"], {"LORAPIPE_PROCESSES": "1"}) is None
    assert launch_command(["train"], {**TWO, "MLX_RANK": "0"}) is None  # already launched
    command = launch_command(["train", "--params", "p.yaml"], TWO)
    assert command is not None
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert command[1:] == [
        "--backend", "ring", "-n", "2", "--env", f"OPENBLAS_NUM_THREADS={threads}",
        "--", sys.executable, "-m", "lorapipe.cli", "train", "--params", "p.yaml",
    ]  # fmt: skip
    hosts = tmp_path / "hosts.json"
    hosts.write_text('[{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2"]}]')
    command = launch_command(["train"], {"LORAPIPE_HOSTFILE": str(hosts)})
    assert command is not None and ["--hostfile", str(hosts)] == command[3:5]
    with pytest.raises(LaunchError, match="'two' is not a number of processes"):
        launch_command(["train"], {"LORAPIPE_PROCESSES": "two"})
    with pytest.raises(LaunchError, match="LORAPIPE_HOSTFILE: .*nothing.json not found"):
        launch_command(["train"], {"LORAPIPE_HOSTFILE": str(tmp_path / "nothing.json")})
