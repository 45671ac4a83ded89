"""`lorapipe serve` in a subprocess on loopback, talked to with the official `openai` client."""

from __future__ import annotations

import queue
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from tests.helpers import REPO, cli, dvc_ok, fresh_copy, set_params, start

PROMPT = "Please meet Alice on day 3 about item 7."


@pytest.fixture
def tiny_project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A project with only the tiny base model, which serve and generate then both load."""
    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "models" / "base")
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    set_params(project, **{"generate.max_tokens": 24})
    return project


@contextmanager
def server(cwd: Path, *args: str) -> Iterator[str]:
    """`lorapipe serve --port 0 ARGS` in `cwd`, on a machine without a Hugging Face cache folder,
    until it says where it serves; yields that URL, then stops it with Ctrl-C (SIGINT) and
    checks that it stops cleanly."""
    env = {"HF_HOME": str(cwd / "no-hf-home"), "HF_HUB_CACHE": str(cwd / "no-hf-cache")}
    proc = start(cwd, "serve", "--port", "0", *args, env=env)
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_read, args=(proc, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while not seen or "[lorapipe] serving" not in seen[-1]:
            line = lines.get(timeout=300)
            assert line is not None, f"serve exited:\n{''.join(seen)}"
            seen.append(line)
        yield seen[-1].split(" at ")[1].split()[0]
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        reader.join(timeout=10)
        output = "".join(seen + list(iter(lines.get_nowait, None)))
        assert code == 0 and "[lorapipe] serve: stopped" in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _read(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.put(line)
    lines.put(None)


def client(url: str) -> openai.OpenAI:
    # The server checks no key; the client insists on one.
    return openai.OpenAI(base_url=url, api_key="unused", timeout=120, max_retries=0)


def test_serve_answers_as_generate_does_over_the_openai_api(tiny_project: Path) -> None:
    generated = cli(tiny_project, "generate", PROMPT)
    assert generated.returncode == 0, generated.stderr
    expected = generated.stdout.removesuffix("\n")
    assert expected

    with server(tiny_project) as url:
        api = client(url)
        assert [m.id for m in api.models.list()] == ["base"]

        answer = api.chat.completions.create(
            model="base", messages=[{"role": "user", "content": PROMPT}]
        )
        assert answer.choices[0].message.content == expected  # greedy: generate.temperature 0
        assert answer.choices[0].finish_reason == "length"  # generate.max_tokens, 24
        assert answer.usage is not None and answer.usage.completion_tokens == 24

        pieces = api.chat.completions.create(
            model="base", messages=[{"role": "user", "content": PROMPT}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == expected

        # /v1/completions takes its prompt as it is: the training's shaping, written out by
        # hand (system prompt, template), gives the same answer.
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        shaped = load_tokenizer(tiny_project / "models" / "base").apply_chat_template(
            [
                {"role": "system", "content": "Compress the text."},
                {"role": "user", "content": PROMPT},
            ],
            add_generation_prompt=True,
            tokenize=False,
        )
        raw = api.completions.create(model="base", prompt=shaped)
        assert raw.choices[0].text == expected

        # mlx-lm would download a Hub model a request names; this server refuses.
        with pytest.raises(openai.NotFoundError) as refused:
            api.chat.completions.create(
                model="org/other-model", messages=[{"role": "user", "content": PROMPT}]
            )
        assert "serves 'base' only" in refused.value.response.json()["error"]


def test_serve_says_why_it_cannot_start(tiny_project: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = cli(tiny_project, "serve", "--port", port)
    assert busy.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in busy.stderr and "--port" in busy.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_project / "params.yaml", empty / "params.yaml")
    missing = cli(empty, "serve")
    assert missing.returncode == 1
    assert "no model to generate with" in missing.stderr and "dvc repro train" in missing.stderr


def default_run_adapter(tmp_path: Path) -> tuple[Path, bool]:
    """A project holding the embedded model and an adapter of the default run: this checkout's
    (the whole run), or, in a fresh clone (CI), a copy of it trained for 30 steps only."""
    if (REPO / "models" / "adapters" / "adapter_config.json").is_file():
        return REPO, True
    project = fresh_copy(tmp_path / "short-run")
    set_params(
        project,
        **{"train.iters": 30, "train.warmup_steps": 5, "train.steps_per_eval": 30,
           "train.val_batches": 2, "train.save_every": 30},
    )  # fmt: skip
    dvc_ok(project, "repro", "train")
    return project, False


@pytest.mark.slow
def test_serve_answers_as_generate_does_with_the_default_runs_adapter(tmp_path: Path) -> None:
    """The embedded SmolLM2-135M with the default run's adapter: the server's greedy answer,
    streamed and not, is `lorapipe generate`'s."""
    project, whole_run = default_run_adapter(tmp_path)
    params = tmp_path / "params.yaml"
    shutil.copy(project / "params.yaml", params)
    set_params(tmp_path, **{"generate.max_tokens": 64})
    prompt = "Hi Bob, lunch with Dana on Friday at noon at Rosa's?"
    generated = cli(project, "generate", prompt, "--params", str(params), "--model", "adapters")
    assert generated.returncode == 0, generated.stderr
    assert "model: adapters (models/base + models/adapters)" in generated.stderr

    with server(project, "--params", str(params), "--model", "adapters") as url:
        api = client(url)
        messages = [{"role": "user", "content": prompt}]
        answer = api.chat.completions.create(model="adapters", messages=messages)
        assert answer.choices[0].message.content == generated.stdout.removesuffix("\n")
        if whole_run:  # the tuned model answers in a line and stops (30 steps may not)
            assert answer.choices[0].finish_reason == "stop"
        pieces = api.chat.completions.create(model="adapters", messages=messages, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        assert streamed == answer.choices[0].message.content


def test_chat_requests_are_shaped_as_training_shaped_rows(project: Path) -> None:
    from lorapipe.params import load_params
    from lorapipe.serve import shape

    set_params(project, **{"data.prompt_template": "Compress:\n{prompt}"})
    params = load_params(project / "params.yaml")
    asked = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]},
    ]
    assert shape(asked, params) == [
        {"role": "system", "content": "Compress the text."},  # data.system_prompt
        {"role": "user", "content": "Compress:\na"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "Compress:\ncd"},
    ]
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}]
    assert shape(own, params) == [own[0], {"role": "user", "content": "Compress:\na"}]
