"""`quantize` stage: the fused model at `quantize.bits` with mlx-lm's quantization, and what it
costs: size on disk and validation loss (perplexity) before and after, as metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lorapipe import lanes
from lorapipe.artifacts import cpu_friendly, load_model
from lorapipe.batches import encode, make_batches
from lorapipe.io import atomic_dir, atomic_write_json, read_jsonl
from lorapipe.loss import dataset_loss
from lorapipe.params import Params

# train.batch_size: the loss batches are training's, so what fit in training fits here.
PARAMS = ("quantize", "train.batch_size")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def validation_loss(model: Any, tokenizer: Any, params: Params, lane_count: int) -> float:
    rows = [line.value for line in read_jsonl(Path(params.paths.sanitized) / "valid.jsonl")]
    examples = [encode(row, tokenizer, mask_prompt=True) for row in rows if row is not None]
    batches = make_batches(examples, min(params.train.batch_size, len(examples)))
    return dataset_loss(model, batches, params.quantize.loss_batches, lanes=lane_count)


def main(params: Params) -> None:
    from mlx_lm.utils import quantize_model, save_config, save_model

    fused_dir, q = Path(params.paths.fused), params.quantize
    lane_count = lanes.count(params.train.batch_size)  # each loss batch's rows over CPU streams
    lanes.prepare(lane_count)  # before the first eval: MLX reads the setting once
    model, tokenizer = load_model(params.paths, "fused")
    before = validation_loss(model, tokenizer, params, lane_count)
    config = json.loads((fused_dir / "config.json").read_text())
    model, config = quantize_model(model, config, q.group_size, q.bits, mode=q.mode)
    with atomic_dir(Path(params.paths.quantized)) as out:
        save_model(out, model)
        save_config(config, config_path=out / "config.json")
        tokenizer.save_pretrained(str(out))
        size = folder_bytes(out)
    # Saved first: on the CPU, cpu_friendly() dequantizes the model in place.
    after = validation_loss(cpu_friendly(model), tokenizer, params, lane_count)
    metrics = {
        "bits": q.bits,
        "group_size": q.group_size,
        "fused_mb": round(folder_bytes(fused_dir) / 1e6, 1),
        "quantized_mb": round(size / 1e6, 1),
        "size_ratio": round(size / max(folder_bytes(fused_dir), 1), 4),
        "val_loss_fused": round(before, 5),
        "val_loss_quantized": round(after, 5),
        "val_perplexity_fused": round(math.exp(before), 4),
        "val_perplexity_quantized": round(math.exp(after), 4),
        "val_loss_increase": round(after - before, 5),
    }
    atomic_write_json(Path(params.paths.metrics) / "quantize.json", metrics)
    print(
        f"quantize: {q.bits}-bit -> {params.paths.quantized}/ ({metrics['quantized_mb']} MB, "
        f"{metrics['size_ratio']:.0%} of fused); val loss {before:.4f} -> {after:.4f}"
    )
