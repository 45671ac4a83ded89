"""Eval's generation, batched vs one prompt at a time: same model, prompts and token budgets.

    uv run python bench/generate.py                        # CPU: the tuned model on test prompts
    python3 bench/generate.py --random-weights --out $OUT/generate-gpu.json    # on a GPU machine

batched     `mlx_lm.generate.batch_generate` with `eval.batch_size` prompts at a time, as the
            eval stage calls it.
one-by-one  `mlx_lm.generate.stream_generate` on each prompt in turn (what a loop over
            `mlx_lm.generate` does).
Both decode greedily up to the eval stage's budget for each prompt (`eval.max_tokens_factor` x
reference tokens + `eval.max_tokens_extra`) and stop at EOS. Tokens/s counts generated tokens
over the wall-clock time of the whole set, prompt processing included. The two modes alternate
`--repeats` times after a warm-up; the table gives medians. `--random-weights` initialises the
model from `--model`'s config.json (only its config and tokenizer files are needed, so the
model need not travel to a GPU machine); a random model rarely stops at EOS, so it generates
each prompt's full budget in both modes.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from lorapipe import runtime

ROOT = Path(__file__).resolve().parents[1]


def load(model_dir: Path, random_weights: bool) -> tuple[Any, Any]:
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.utils import load as load_model

    if not random_weights:
        from lorapipe.artifacts import cpu_friendly

        model, tokenizer = load_model(str(model_dir))[:2]
        model.eval()
        return cpu_friendly(model), tokenizer
    from mlx_lm.utils import _get_classes

    config = json.loads((model_dir / "config.json").read_text())
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    model.eval()
    return model, load_tokenizer(model_dir)


def workload(tokenizer: Any, test_split: Path, count: int) -> tuple[list[list[int]], list[int]]:
    """The eval stage's prompts and token budgets for the first `count` test rows."""
    from lorapipe.artifacts import chat_prompt
    from lorapipe.params import load_params

    config = load_params(ROOT / "params.yaml").eval
    rows = [json.loads(line) for line in test_split.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "messages" in r][:count]
    prompts = [chat_prompt(tokenizer, r["messages"][:-1]) for r in rows]
    budgets = [
        math.ceil(config.max_tokens_factor * len(tokenizer.encode(r["messages"][-1]["content"])))
        + config.max_tokens_extra
        for r in rows
    ]
    return prompts, budgets


def batched(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    budgets: list[int],
    size: int,
    prefill: int | None = None,
):
    from mlx_lm.generate import batch_generate

    tic = time.perf_counter()
    response = batch_generate(
        model,
        tokenizer,
        prompts,
        max_tokens=budgets,
        completion_batch_size=size,
        prefill_batch_size=prefill or size,
    )
    seconds = time.perf_counter() - tic
    return response.stats.generation_tokens, seconds, list(response.texts)


def one_by_one(model: Any, tokenizer: Any, prompts: list[list[int]], budgets: list[int]):
    from mlx_lm.generate import stream_generate

    tokens, texts = 0, []
    tic = time.perf_counter()
    for prompt, budget in zip(prompts, budgets, strict=True):
        pieces, last = [], None
        for last in stream_generate(model, tokenizer, prompt, max_tokens=budget):
            pieces.append(last.text)
        tokens += last.generation_tokens if last is not None else 0
        texts.append("".join(pieces))
    return tokens, time.perf_counter() - tic, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "fused"))
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--test-split", default=str(ROOT / "data" / "sanitized" / "test.jsonl"))
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    parser.add_argument(
        "--prefill-batch-size", type=int, default=None, help="default: the batch size"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "generate-cpu.json"))
    args = parser.parse_args()
    runtime.setup()
    import mlx.core as mx

    from lorapipe.params import load_params

    size = args.batch_size or load_params(ROOT / "params.yaml").eval.batch_size
    model, tokenizer = load(Path(args.model), args.random_weights)
    prompts, budgets = workload(tokenizer, Path(args.test_split), args.prompts)
    batched(model, tokenizer, prompts[:4], budgets[:4], size)  # warm-up: kernels, caches
    one_by_one(model, tokenizer, prompts[:1], budgets[:1])

    runs: dict[str, list[dict[str, float]]] = {"batched": [], "one-by-one": []}
    texts: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for mode in runs:
            if mode == "batched":
                tokens, seconds, texts[mode] = batched(
                    model, tokenizer, prompts, budgets, size, args.prefill_batch_size
                )
            else:
                tokens, seconds, texts[mode] = one_by_one(model, tokenizer, prompts, budgets)
            runs[mode].append({"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds})
            print(f"{mode:<11} {tokens:>6} tokens {seconds:8.2f} s {tokens / seconds:9.1f} tok/s")
    medians = {mode: statistics.median(r["tok_s"] for r in rs) for mode, rs in runs.items()}
    same = sum(a.strip() == b.strip() for a, b in zip(*texts.values(), strict=True))
    ratio = medians["batched"] / medians["one-by-one"]

    device = str(mx.default_device())
    print(f"\ngeneration, {device}, {platform.machine()}, Python {sys.version.split()[0]}")
    print(f"{len(prompts)} prompts, budgets {min(budgets)}-{max(budgets)} tokens, batch {size}")
    print(f"{'mode':<12}{'tok/s (median)':>16}")
    for mode, value in medians.items():
        print(f"{mode:<12}{value:>16.1f}")
    print(f"batched / one-by-one: {ratio:.2f}x; identical outputs: {same}/{len(prompts)}")
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "versions": {p: version(p) for p in ("mlx", "mlx-lm")},
        "model": args.model,
        "random_weights": args.random_weights,
        "prompts": len(prompts),
        "budgets": budgets,
        "batch_size": size,
        "prefill_batch_size": args.prefill_batch_size or size,
        "runs": runs,
        "median_tokens_per_s": medians,
        "ratio": ratio,
        "identical_outputs": same,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
