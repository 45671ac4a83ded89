"""Each stage reads only the params dvc.yaml gives it: its declaration (PARAMS) equals its
`params:` in dvc.yaml, and reading anything else is an error naming the stage and the key."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from lorapipe.params import ParamsError, for_stage, load_params
from tests.helpers import REPO


def test_every_stage_declares_exactly_its_dvc_yaml_params() -> None:
    from ruamel.yaml import YAML

    stages = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]
    assert len(stages) == 9
    for name, group in stages.items():
        stage = group.get("do", group)  # eval: one stage per model (foreach)
        module = importlib.import_module(f"lorapipe.stages.{stage['cmd'].split()[1]}")
        assert sorted(module.PARAMS) == sorted(stage["params"]), name


def test_a_stage_reads_its_sections_keys_and_paths() -> None:
    params = load_params(REPO / "params.yaml")
    view = for_stage(params, "quantize", ("quantize", "train.batch_size"))
    assert view.quantize is params.quantize  # a whole section: the real dataclass
    assert view.train.batch_size == params.train.batch_size  # one key of another section
    assert view.paths.fused == params.paths.fused  # every stage names its outputs by paths


@pytest.mark.parametrize(
    ("reads", "key"),
    [
        (("eval",), "train.batch_size"),  # eval's old undeclared read
        (("eval.metrics",), "eval.report_examples"),  # the report's key beside eval's
        (("quantize", "train.batch_size"), "train.iters"),  # a key beside the declared one
        (("fuse",), "seed"),  # a top-level value
        (("sanitize",), "data.system_prompt"),  # a section not declared at all
    ],
)
def test_reading_an_undeclared_param_names_the_stage_and_key(
    reads: tuple[str, ...], key: str
) -> None:
    params = load_params(REPO / "params.yaml")
    view = for_stage(params, "stagename", reads)
    with pytest.raises(ParamsError) as error:
        node = view
        for part in key.split("."):
            node = getattr(node, part)
    message = str(error.value)
    assert f"stage 'stagename' reads {key}, which it does not declare" in message
    assert "src/lorapipe/stages/stagename.py" in message and "dvc.yaml" in message


def test_the_cli_hands_a_stage_only_its_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lorapipe split` runs split.main on the declared view: a stage that read another
    section would fail there, not only in this module's unit tests."""
    from lorapipe import cli
    from lorapipe.stages import split

    seen = {}

    def spy(params: object) -> None:
        seen["split"] = params.split  # type: ignore[attr-defined]
        params.lora.rank  # type: ignore[attr-defined]  # not split's: must raise

    monkeypatch.setattr(split, "main", spy)
    assert cli.main(["split", "--params", str(REPO / "params.yaml")]) == 1
    assert seen["split"] == load_params(REPO / "params.yaml").split
    assert "stage 'split' reads lora.rank, which it does not declare" in capsys.readouterr().err
