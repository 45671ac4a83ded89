"""The `base` stage on real files: the tiny model as a folder, a local Hub cache, bad sources."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorapipe.params import ModelParams, load_params
from lorapipe.stages.base import SOURCE_RECORD, BaseModelError, import_base_model
from tests.helpers import REPO, set_params

SHA = "0123456789abcdef0123456789abcdef01234567"


def model_params(**changes: object) -> ModelParams:
    return dataclasses.replace(load_params(REPO / "params.yaml").model, **changes)  # type: ignore[arg-type]


def greedy_tokens(model_dir: Path, prompt: str = "The capital of France") -> list[int]:
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(str(model_dir))
    ids = mx.array([tokenizer.encode(prompt)])
    return [int(t) for t in mx.argmax(model(ids)[0], axis=-1).tolist()]


def test_folder_source_gives_an_mlx_lm_folder_with_the_same_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "models" / "base"
    record = import_base_model(model_params(source=str(tiny_model_dir)), out)

    assert record["kind"] == "folder"
    assert {"config.json", "model.safetensors", "tokenizer.json", SOURCE_RECORD} <= {
        p.name for p in out.iterdir()
    }
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in (
        tokenizer_config.get("chat_template") or (out / "chat_template.jinja").read_text()
    )
    assert greedy_tokens(out) == greedy_tokens(tiny_model_dir)
    assert [p.name for p in out.parent.iterdir()] == ["base"], "no temp folders left behind"


def test_dtype_and_quantization_at_import(tiny_model_dir: Path, tmp_path: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    half = tmp_path / "half"
    import_base_model(model_params(source=str(tiny_model_dir), dtype="bfloat16"), half)
    model, _ = load(str(half))
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}

    quantized = tmp_path / "q4"
    import_base_model(
        model_params(source=str(tiny_model_dir), quantize_bits=4, quantize_group_size=32),
        quantized,
    )
    config = json.loads((quantized / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    model, _ = load(str(quantized))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"

    with pytest.raises(BaseModelError, match="already quantized"):
        import_base_model(model_params(source=str(quantized), quantize_bits=4), tmp_path / "qq")


def make_hub_cache(cache: Path, model_dir: Path, repo_id: str) -> Path:
    """Lay out a Hugging Face Hub cache entry the way `hf download` leaves it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    shutil.copytree(model_dir, snapshot)
    # Code shipped with a model must never be fetched or run.
    (snapshot / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return snapshot


def run_cli(
    project: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorapipe.cli", *args],
        cwd=project,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_hub_source_from_a_local_cache_offline(tiny_model_dir: Path, project: Path) -> None:
    cache = project / "hf-cache"
    make_hub_cache(cache, tiny_model_dir, "someorg/tiny-llama")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    for revision in ("main", SHA):
        set_params(project, **{"model.source": "someorg/tiny-llama", "model.revision": revision})
        result = run_cli(project, "base", env=env)
        assert result.returncode == 0, result.stderr
        out = project / "models" / "base"
        assert not list(out.glob("*.py"))
        record = json.loads((out / SOURCE_RECORD).read_text())
        assert record == {**record, "kind": "hub", "revision": revision}
    assert greedy_tokens(project / "models" / "base") == greedy_tokens(tiny_model_dir)


@pytest.mark.parametrize("offline", ["1", "0"])
def test_unknown_hub_id_offline_is_a_one_line_error(project: Path, offline: str) -> None:
    # HF_HUB_OFFLINE=0 really tries the network, which is unreachable here (as on a plane).
    set_params(project, **{"model.source": "nobody/no-such-model", "model.revision": "main"})
    env = {"HF_HUB_CACHE": str(project / "empty-cache"), "HF_HUB_OFFLINE": offline}
    result = run_cli(project, "base", env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "nobody/no-such-model@main is not in the local Hugging Face cache" in lines[0]
    assert "hf download nobody/no-such-model" in lines[0]
    assert not (project / "models" / "base").exists()


def test_hub_id_needs_a_pinned_revision(project: Path) -> None:
    set_params(project, **{"model.source": "someorg/tiny-llama", "model.revision": None})
    result = run_cli(project, "base")
    assert result.returncode == 1
    assert "model.revision: is null" in result.stderr


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "nope.gguf", "does not exist"),
        (lambda p: p / "missing" / "folder", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "has no config.json"),
        (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt", "not a .gguf"),
    ],
)
def test_bad_local_sources_name_the_path_and_fix(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(BaseModelError) as info:
        import_base_model(model_params(source=str(path)), tmp_path / "out")
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_failed_import_keeps_the_previous_output_and_leaves_no_temp(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "models" / "base"
    import_base_model(model_params(source=str(tiny_model_dir)), out)
    before = (out / "model.safetensors").read_bytes()

    with pytest.raises(BaseModelError, match="cannot load .*complete model"):
        import_base_model(model_params(source=str(broken)), out)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["base"]


def test_cli_reports_bad_params_in_one_line(project: Path) -> None:
    set_params(project, **{"model.dtype": "float8"})
    result = run_cli(project, "base")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "lorapipe base: error: params.yaml: model.dtype: 'float8' is not one of "
        "'float32', 'float16', 'bfloat16', null"
    )
