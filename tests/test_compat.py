"""lorapipe.fast replaces mlx-lm internals: the pinned range holds the installed mlx-lm, and a
missing name fails at start-up with the mlx-lm version, not inside the first training step."""

from __future__ import annotations

import importlib
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement

from lorapipe.fast import MLX_LM_NAMES, IncompatibleMlxLm, check_mlx_lm
from tests.helpers import REPO


def test_the_installed_mlx_lm_is_in_the_pinned_range_and_has_every_name() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [Requirement(d) for d in project["dependencies"] if d.startswith("mlx-lm")]
    assert len(pins) == 1 and pins[0].specifier.contains(version("mlx-lm"))
    assert pins[0].specifier.contains("0.32.2") and not pins[0].specifier.contains("0.33.0")
    check_mlx_lm()


@pytest.mark.parametrize(("module", "name"), MLX_LM_NAMES)
def test_a_missing_mlx_lm_name_fails_naming_the_version(
    module: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(importlib.import_module(module), name)
    with pytest.raises(IncompatibleMlxLm) as error:
        check_mlx_lm()
    message = str(error.value)
    assert f"mlx-lm {version('mlx-lm')} has no {module}.{name}" in message
    assert "uv sync --locked" in message
