"""The pipeline's model folders (one table: name, producing stage, completeness marker) and
loading them, or any other mlx-lm model folder, for inference, with one-line errors that name
the stage to run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapipe.errors import LorapipeError
from lorapipe.params import PathsParams


class MissingArtifact(LorapipeError):
    """An upstream output is missing or does not fit."""


@dataclass(frozen=True)
class Artifact:
    """A model folder the pipeline makes, at `paths.<name>` in params.yaml."""

    name: str  # also a `generate.prefer` / `--model` choice
    stage: str  # the stage that makes it: `dvc repro <stage>`
    marker: str  # the file that is there once the folder is complete

    def path(self, paths: PathsParams) -> Path:
        return Path(getattr(paths, self.name))

    def require(self, paths: PathsParams) -> Path:
        path = self.path(paths)
        if not (path / self.marker).is_file():
            raise MissingArtifact(
                f"{path}: not found; run `dvc repro {self.stage}` (the {self.stage} stage makes it)"
            )
        return path


ARTIFACTS = {
    a.name: a
    for a in (
        Artifact("base", "base", "config.json"),
        Artifact("adapters", "train", "adapter_config.json"),
        Artifact("fused", "fuse", "config.json"),
        Artifact("quantized", "quantize", "config.json"),
    )
}


def require_folder(paths: PathsParams, folder: str) -> Path:
    """`folder` as a complete model folder: one the pipeline makes (the error names the stage to
    run) or any other mlx-lm model folder."""
    for artifact in ARTIFACTS.values():
        if Path(folder) == artifact.path(paths):
            return artifact.require(paths)
    if not (Path(folder) / "config.json").is_file():
        raise MissingArtifact(f"{folder}: not an mlx-lm model folder (it has no config.json)")
    return Path(folder)


def load_model(paths: PathsParams, name: str) -> tuple[Any, Any]:
    """Artifact `name` as an mlx-lm model and tokenizer, ready for inference; "adapters" is the
    base model with the adapter on top."""
    if name == "adapters":
        model_dir, adapters = ARTIFACTS["base"].require(paths), ARTIFACTS["adapters"].require(paths)
    else:
        model_dir, adapters = ARTIFACTS[name].require(paths), None
    return load_folder(model_dir, adapters)


def load_folder(model_dir: Path, adapters: Path | None = None) -> tuple[Any, Any]:
    """An mlx-lm model folder (with an adapter on top) as a model and tokenizer for inference
    (on an x86-64 CPU with lorapipe's exp: `cpu_exp`)."""
    from mlx_lm import load

    from lorapipe import cpu_exp

    try:
        model, tokenizer = load(str(model_dir), adapter_path=str(adapters) if adapters else None)[
            :2
        ]
    except ValueError as exc:
        if adapters is not None and "incompatible tensors" in str(exc):
            raise MissingArtifact(
                f"{adapters} does not match {model_dir} (its tensors have other names or shapes); "
                "re-run `dvc repro train` for this base model"
            ) from exc
        raise
    model.eval()
    cpu_exp.install()
    return cpu_friendly(model), tokenizer


def cpu_friendly(model: Any) -> Any:
    """On the CPU, run a quantized model with its weights dequantized: a quantized layer computes
    x @ dequantize(Wq).T, so the values are the same, but MLX's CPU quantized kernels are
    single-threaded and much slower than the BLAS matmul. Metal and CUDA keep the real kernels."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import dequantize_model

    quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    if quantized and mx.default_device() == mx.cpu:
        return dequantize_model(model)
    return model


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation up to the assistant's turn (the generation prompt)."""
    return list(
        tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
    )
