"""`fuse` stage: merge the adapter into the base model, and prove the merge changed nothing.

The merged weights are W + scale * A @ B. On a quantized base, the merge is done on dequantized
weights (and the result stays unquantized; the `quantize` stage quantizes it): re-quantizing
right away can round a small LoRA update away entirely. The stage then compares base + adapter
with the fused model on validation prompts (logits within a tolerance, identical greedy
continuations) and fails loudly if they differ, so a broken fuse never reaches `eval`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorapipe.artifacts import chat_prompt, load_model
from lorapipe.errors import LorapipeError
from lorapipe.io import atomic_dir, atomic_write_json, read_jsonl
from lorapipe.params import FuseParams, Params

PARAMS = ("fuse",)


class FuseError(LorapipeError):
    """The fused model does not behave like base + adapter."""


def fuse_model(model: Any, config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Merge every adapter layer (LoRA, DoRA) into its base layer, dequantizing as needed."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    fused = [(n, m.fuse(dequantize=True)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if "quantization" in config:
        model = dequantize_model(model)
        config = {
            k: v for k, v in config.items() if k not in ("quantization", "quantization_config")
        }
    return model, config


def compare(
    reference: Any, candidate: Any, prompts: list[list[int]], params: FuseParams, eos: set[int]
) -> dict[str, float]:
    """Largest logit difference (relative to the logits' scale) and greedy agreement."""
    import mlx.core as mx

    worst, agree = 0.0, 0
    for prompt in prompts:
        ref_logits = reference(mx.array([prompt]))[0].astype(mx.float32)
        cand_logits = candidate(mx.array([prompt]))[0].astype(mx.float32)
        scale = mx.abs(ref_logits).max().item()
        worst = max(worst, (mx.abs(ref_logits - cand_logits).max().item()) / max(scale, 1e-6))
        agree += greedy(reference, prompt, params.check_tokens, eos) == greedy(
            candidate, prompt, params.check_tokens, eos
        )
    return {"max_relative_logit_diff": worst, "greedy_agreement": agree / max(len(prompts), 1)}


def tolerance(rtol: float, model: Any) -> float:
    """The logit difference allowed between fused and unfused: fuse.logits_rtol, or eight
    rounding units of the arithmetic if that is coarser. W x + s B (A x) and (W + s B A) x round
    differently: in float32 on the CPU or Metal by ~1e-7, but a bfloat16 or float16 model
    rounds at 2^-8 or 2^-11, and MLX's CUDA backend multiplies float32 in TF32 (2^-11): there,
    a correct fuse differs by more than 1e-3 (2.3e-3, 4.7 units, measured for the default run
    on an H100). Greedy agreement is required whatever the precision."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    dtype = next(v.dtype for _, v in tree_flatten(model.parameters()) if v.ndim == 2)
    unit = {mx.bfloat16: 2.0**-8, mx.float16: 2.0**-11}.get(dtype, 2.0**-24)
    if dtype == mx.float32 and mx.default_device() == mx.gpu and mx.cuda.is_available():
        unit = 2.0**-11  # TF32
    return max(rtol, 8 * unit)


def greedy(model: Any, prompt: list[int], count: int, eos: set[int]) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out: list[int] = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=count):
        out.append(int(token))
        if int(token) in eos:
            break
    return out


def main(params: Params) -> None:
    from mlx.utils import tree_flatten
    from mlx_lm.gguf import convert_to_gguf
    from mlx_lm.utils import save_config, save_model

    paths = params.paths
    base, adapters = Path(paths.base), Path(paths.adapters)
    tuned, tokenizer = load_model(paths, "adapters")  # base + adapter
    reference, _ = load_model(paths, "adapters")  # kept unfused, for the check
    config = json.loads((base / "config.json").read_text())
    fused, config = fuse_model(tuned, config)

    rows = [line.value for line in read_jsonl(Path(paths.sanitized) / "valid.jsonl") if line.value]
    prompts = [
        chat_prompt(tokenizer, r["messages"][:-1]) for r in rows[: params.fuse.check_prompts]
    ]
    check = compare(reference, fused, prompts, params.fuse, set(tokenizer.eos_token_ids))
    check["logits_rtol"] = tolerance(params.fuse.logits_rtol, fused)
    if check["max_relative_logit_diff"] > check["logits_rtol"] or check["greedy_agreement"] < 1:
        raise FuseError(
            f"fuse: the fused model differs from base + adapter (max relative logit difference "
            f"{check['max_relative_logit_diff']:.2e} > {check['logits_rtol']:.1e}, from "
            f"fuse.logits_rtol {params.fuse.logits_rtol} and the arithmetic's precision; greedy "
            f"agreement {check['greedy_agreement']:.0%}); nothing was written"
        )

    with atomic_dir(Path(paths.fused)) as out:
        save_model(out, fused)
        save_config(dict(config), config_path=out / "config.json")
        tokenizer.save_pretrained(str(out))
        if params.fuse.export_gguf:
            if config.get("model_type") not in ("llama", "mistral", "mixtral"):
                raise FuseError(
                    f"fuse.export_gguf: mlx-lm writes GGUF for llama-family models only, not "
                    f"{config.get('model_type')}; set fuse.export_gguf: false"
                )
            weights = dict(tree_flatten(fused.parameters()))
            convert_to_gguf(out, weights, dict(config), str(out / "model-f16.gguf"))
    atomic_write_json(Path(paths.metrics) / "fuse.json", {k: round(v, 8) for k, v in check.items()})
    print(
        f"fuse: {adapters} merged into {base} -> {paths.fused}/; check on {len(prompts)} prompts: "
        f"max relative logit difference {check['max_relative_logit_diff']:.1e}, greedy "
        f"agreement {check['greedy_agreement']:.0%}"
    )
