from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from lorapipe.params import ParamsError, load_params, params_from_dict
from tests.helpers import REPO


def shipped() -> dict[str, Any]:
    data = YAML(typ="safe").load((REPO / "params.yaml").read_text())
    assert isinstance(data, dict)
    return data


def with_change(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(shipped())
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


def test_shipped_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.model.source == "embedded"
    assert params.paths.base == "models/base"


def test_every_dvc_yaml_params_section_exists_in_params() -> None:
    # A stage listing a section that params.yaml lacks would fail only inside `dvc repro`.
    dvc = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())
    sections = set(shipped())
    for name, stage in dvc["stages"].items():
        for entry in stage.get("params", []):
            key = entry if isinstance(entry, str) else next(iter(entry))
            assert key.split(".")[0] in sections, f"stage {name} lists unknown params {key}"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("model.dtype", "float8", "model.dtype: 'float8' is not one of 'float32', 'float16'"),
        ("model.quantize_bits", True, "model.quantize_bits: true is not"),
        ("model.quantize_bits", 7, "model.quantize_bits: 7 is not"),
        ("model.trust_remote_code", "no", "model.trust_remote_code: expected true or false"),
        ("model.source", 3, "model.source: expected a string, got 3"),
        ("seed", -1, "seed: -1 is out of range; must be >= 0"),
        ("seed", 1.5, "seed: expected an integer, got 1.5"),
        ("model", [], "model must be a mapping, got a list"),
        # params.yaml is committed: a token in it would be in git and `dvc exp show`.
        (
            "tracking.mlflow_uri",
            "https://me:tok@dagshub.com/me/repo.mlflow",
            "tracking.mlflow_uri: holds credentials (user:password@); keep the plain address",
        ),
    ],
)
def test_bad_values_name_key_value_and_allowed(path: str, value: Any, message: str) -> None:
    with pytest.raises(ParamsError, match=None) as info:
        params_from_dict(with_change(path, value), source="params.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("params.yaml: ")


def test_misspelled_key_is_an_error_with_a_suggestion() -> None:
    data = shipped()
    data["model"]["dtpye"] = data["model"].pop("dtype")
    with pytest.raises(ParamsError) as info:
        params_from_dict(data, source="params.yaml")
    assert "unknown key 'model.dtpye'" in str(info.value)
    assert "did you mean 'dtype'" in str(info.value)


def test_unknown_section_and_missing_key() -> None:
    data = shipped()
    data["trian"] = {}
    with pytest.raises(ParamsError, match="unknown key 'trian'"):
        params_from_dict(data)
    data = shipped()
    del data["model"]["revision"]
    with pytest.raises(ParamsError, match="missing key 'model.revision'"):
        params_from_dict(data)


def test_params_are_frozen() -> None:
    params = load_params(REPO / "params.yaml")
    with pytest.raises(AttributeError):
        params.model.source = "x"  # type: ignore[misc]


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="params.yaml: not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
