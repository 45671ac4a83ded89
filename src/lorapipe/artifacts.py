"""Loading the pipeline's models for inference, with one-line errors that name the stage to run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorapipe.errors import LorapipeError
from lorapipe.params import Params


class MissingArtifact(LorapipeError):
    """An upstream output is missing or does not fit."""


def artifact_paths(params: Params) -> dict[str, tuple[Path, str]]:
    """Each artifact's folder and the stage that makes it."""
    p = params.paths
    return {
        "base": (Path(p.base), "base"),
        "adapters": (Path(p.adapters), "train"),
        "fused": (Path(p.fused), "fuse"),
        "quantized": (Path(p.quantized), "quantize"),
    }


def require(path: Path, stage: str, marker: str) -> Path:
    if not (path / marker).is_file():
        raise MissingArtifact(
            f"{path}: not found; run `dvc repro {stage}` (the {stage} stage makes it)"
        )
    return path


def load_model(model_dir: Path, stage: str, adapters: Path | None = None) -> tuple[Any, Any]:
    """An mlx-lm model (and tokenizer) from a pipeline folder, optionally with an adapter."""
    from mlx_lm import load

    require(model_dir, stage, "config.json")
    if adapters is not None:
        require(adapters, "train", "adapter_config.json")
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
    return cpu_friendly(model), tokenizer


def cpu_friendly(model: Any) -> Any:
    """On the CPU, run a quantized model with its weights dequantized: a quantized layer computes
    x @ dequantize(Wq).T, so the values are the same, but MLX's CPU quantized kernels are
    single-threaded and ~10x slower than the BLAS matmul. Metal and CUDA keep the real kernels."""
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
