"""Shared fixtures. lorapipe.runtime.setup() runs before any test module imports mlx.core, so
tests get the same fast BLAS the stages use."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lorapipe import runtime
from tests.helpers import REPO

runtime.setup()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama model folder (random weights, real BPE tokenizer); treat it as read-only."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped params.yaml in a temp working directory."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path
