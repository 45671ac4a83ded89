"""Eval's generation several ways (`--modes`; default: eval,loss+lorapipe): same model, prompts
and token budgets.

    uv run python bench/generate.py                  # CPU: the tuned model, 128 demo test prompts
    uv run python bench/generate.py --case long      # 150 SciTLDR abstracts (bench/data)
    python3 bench/generate.py --random-weights --out $OUT/generate-gpu.json    # on a GPU machine

eval            what the eval stage runs: `lorapipe.decode.generate_batch` with each prompt's
                reference answer, which it scores (the test loss) through the prompt's KV cache,
                sparing the decoding of rows whose greedy answer that pass confirms.
loss+lorapipe   what the eval stage ran before: the test loss in its own pass over prompts and
                answers (`lorapipe.loss.dataset_loss`, train.batch_size rows a batch), then
                `generate_batch` without references.
lorapipe        `lorapipe.decode.generate_batch` without references: plain batched decoding with
                `eval.batch_size` prompts at a time (what the eval stage ran before, loss aside).
                These three run on as many lanes as the eval stage would (`lorapipe.lanes`: on
                the CPU, the prompts' prefill split over one MLX stream per BLAS thread).
eval-one-lane,  the same two on one lane (one stream, the BLAS on all its threads).
lorapipe-one-lane
lorapipe-each-row-prefix  `lorapipe` prefilling the tokens all prompts start with (a chat
                template's system prompt) with every row, not once (`decode.SHARED_PREFIX_SAVING`).
eval-mlx-exp,   the same two with MLX's own exp (LORAPIPE_CPU_EXP=mlx): on an x86-64 CPU the
lorapipe-mlx-exp  others compute exp as a power of two in swiglu, attention and the loss, as
                the eval stage does (`lorapipe.cpu_exp`); elsewhere they are the same.
batch_generate  `mlx_lm.generate.batch_generate` with `eval.batch_size` prompts at a time (mlx-lm's
                default of 8 at a time for prefill), as the eval stage called it at first.
one-by-one      `mlx_lm.generate.stream_generate` on each prompt in turn (what a loop over
                `mlx_lm.generate` does); slow on the CPU, so only with `--modes`.
All decode greedily up to the eval stage's budget for each prompt (`eval.max_tokens_factor` x
reference tokens + `eval.max_tokens_extra`) and stop at EOS. Tokens/s counts generated tokens (an
EOS included, as mlx-lm counts them) over the wall-clock time of the whole set, prompt processing
(and for the first two modes the test loss) included; tokens per CPU-second (the process's user +
system time) is steadier on a machine others share. The modes alternate `--repeats` times after a
warm-up; the table gives medians, MLX's peak memory, and how many outputs equal the first mode's.
`--random-weights` initialises the model from `--model`'s config.json (only its config and tokenizer
files are needed, so the model need not travel to a GPU machine); a random model rarely stops at
EOS, so it generates each prompt's full budget in every mode.
"""

from __future__ import annotations

import argparse
import contextlib
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
# The cases: test split and default prompt count. `long` is 150 SciTLDR test abstracts (~250
# tokens each) with their authors' one-line TLDRs: bench/data/README.md says where from.
CASES = {
    "short": (ROOT / "data" / "sanitized" / "test.jsonl", 128),
    "long": (ROOT / "bench" / "data" / "scitldr-test-150.jsonl", 150),
}


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


def workload(
    tokenizer: Any, test_split: Path, count: int
) -> tuple[list[dict[str, Any]], list[list[int]], list[int]]:
    """The first `count` test rows, and the eval stage's prompts and token budgets for them."""
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
    return rows, prompts, budgets


def lorapipe_decode(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    budgets: list[int],
    size: int,
    rows: list[dict[str, Any]] | None = None,
    lanes: int = 1,
):
    """generate_batch on `lanes` lanes; with `rows`, given their references (the eval stage's
    way)."""
    from lorapipe.decode import generate_batch
    from lorapipe.stages.eval import reference_tokens

    tic = time.perf_counter()
    references = None
    if rows is not None:
        references = [
            [reference_tokens(tokenizer, row, prompt)]
            for row, prompt in zip(rows, prompts, strict=True)
        ]
    generation = generate_batch(model, tokenizer, prompts, budgets, size, references, lanes)
    if rows is not None:
        print(f"eval: {generation.verified} of {len(prompts)} answers confirmed", flush=True)
    return generation.tokens, time.perf_counter() - tic, generation.texts


def loss_then_decode(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    budgets: list[int],
    size: int,
    rows: list[dict[str, Any]],
    loss_batch: int,
):
    """The eval stage before references: the loss in its own pass, then plain decoding."""
    from lorapipe.batches import encode, make_batches
    from lorapipe.loss import dataset_loss

    tic = time.perf_counter()
    encoded = [encode(row, tokenizer, mask_prompt=True) for row in rows]
    dataset_loss(model, make_batches(encoded, loss_batch, every_row=True))
    tokens, _, texts = lorapipe_decode(model, tokenizer, prompts, budgets, size)
    return tokens, time.perf_counter() - tic, texts


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
        **({"prefill_batch_size": prefill} if prefill else {}),
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
    parser.add_argument("--case", choices=CASES, default="short")
    parser.add_argument("--test-split", default=None, help="default: the case's")
    parser.add_argument("--prompts", type=int, default=None, help="default: the case's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    parser.add_argument(
        "--prefill-batch-size", type=int, default=None, help="batch_generate's; default: mlx-lm's"
    )
    parser.add_argument("--modes", default="eval,loss+lorapipe", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="default: bench/results/generate-cpu-CASE.json")
    args = parser.parse_args()
    runtime.setup()
    import mlx.core as mx

    from lorapipe import cpu_exp, lanes
    from lorapipe.params import load_params

    params = load_params(ROOT / "params.yaml")
    size = args.batch_size or params.eval.batch_size
    lane_count = lanes.count(size)  # as the eval stage counts them
    # Before the first eval; MLX reads it once per process, so the one-lane modes run with the
    # widened eval order too (where the eval stage on one lane would not widen it).
    lanes.prepare(max(lane_count, 2))
    split, count = CASES[args.case]
    model, tokenizer = load(Path(args.model), args.random_weights)
    rows, prompts, budgets = workload(
        tokenizer, Path(args.test_split or split), args.prompts or count
    )

    def under(context: Any, run: Any) -> Any:
        """lorapipe's modes run with its exp (as the eval stage does) or MLX's; mlx-lm's as is."""

        def wrapped() -> Any:
            with context():
                return run()

        return wrapped

    @contextlib.contextmanager
    def each_row_prefix() -> Any:
        """lorapipe's decoder prefilling the prefix its prompts share with every row (as
        before `SHARED_PREFIX_SAVING`)."""
        from lorapipe import decode

        saving, decode.SHARED_PREFIX_SAVING = decode.SHARED_PREFIX_SAVING, sys.maxsize
        try:
            with cpu_exp.installed():
                yield
        finally:
            decode.SHARED_PREFIX_SAVING = saving

    def evaluation(lanes: int = lane_count) -> Any:
        return lorapipe_decode(model, tokenizer, prompts, budgets, size, rows, lanes)

    def decoding(lanes: int = lane_count) -> Any:
        return lorapipe_decode(model, tokenizer, prompts, budgets, size, None, lanes)

    modes = {
        "eval": under(cpu_exp.installed, evaluation),
        "loss+lorapipe": under(
            cpu_exp.installed,
            lambda: loss_then_decode(
                model, tokenizer, prompts, budgets, size, rows, params.train.batch_size
            ),
        ),
        "lorapipe": under(cpu_exp.installed, decoding),
        "lorapipe-each-row-prefix": under(each_row_prefix, decoding),
        "eval-one-lane": under(cpu_exp.installed, lambda: evaluation(1)),
        "lorapipe-one-lane": under(cpu_exp.installed, lambda: decoding(1)),
        "eval-mlx-exp": under(cpu_exp.mlx_exp, evaluation),
        "lorapipe-mlx-exp": under(cpu_exp.mlx_exp, decoding),
        "batch_generate": lambda: batched(
            model, tokenizer, prompts, budgets, size, args.prefill_batch_size
        ),
        "one-by-one": lambda: one_by_one(model, tokenizer, prompts, budgets),
    }
    modes = {name: modes[name] for name in args.modes.split(",")}
    with cpu_exp.installed():  # warm-up: kernels, caches
        lorapipe_decode(model, tokenizer, prompts[:4], budgets[:4], size, None, lane_count)
    batched(model, tokenizer, prompts[:4], budgets[:4], size)

    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    texts: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for mode, run in modes.items():
            mx.clear_cache()
            mx.reset_peak_memory()
            cpu = time.process_time()
            tokens, seconds, texts[mode] = run()
            cpu = time.process_time() - cpu
            peak = mx.get_peak_memory() / 1e9
            runs[mode].append(
                {
                    "tokens": tokens,
                    "seconds": seconds,
                    "tok_s": tokens / seconds,
                    "cpu_seconds": cpu,
                    "tok_per_cpu_s": tokens / cpu,
                    "peak_gb": peak,
                }
            )
            print(
                f"{mode:<15}{tokens:>6} tokens {seconds:8.2f} s {tokens / seconds:8.1f} tok/s"
                f" {cpu:8.2f} CPU-s {tokens / cpu:8.1f} tok/CPU-s {peak:6.2f} GB",
                flush=True,
            )
    medians = {mode: statistics.median(r["tok_s"] for r in rs) for mode, rs in runs.items()}
    per_cpu = {mode: statistics.median(r["tok_per_cpu_s"] for r in rs) for mode, rs in runs.items()}
    peaks = {mode: max(r["peak_gb"] for r in rs) for mode, rs in runs.items()}
    first = next(iter(texts.values()))
    same = {
        m: sum(a.strip() == b.strip() for a, b in zip(first, t, strict=True))
        for m, t in texts.items()
    }

    device = str(mx.default_device())
    lengths = [len(p) for p in prompts]
    print(f"\ngeneration, {device}, {platform.machine()}, Python {sys.version.split()[0]}")
    print(
        f"{args.case}: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens "
        f"(median {statistics.median(lengths):.0f}), budgets {min(budgets)}-{max(budgets)} "
        f"tokens, batch {size}"
    )
    print(
        f"{'mode':<16}{'tok/s':>8}{'vs first':>10}{'tok/CPU-s':>11}{'vs first':>10}"
        f"{'peak GB':>9}{'same as first':>15}"
    )
    base, base_cpu = next(iter(medians.values())), next(iter(per_cpu.values()))
    for mode, value in medians.items():
        print(
            f"{mode:<16}{value:>8.1f}{value / base:>9.2f}x{per_cpu[mode]:>11.1f}"
            f"{per_cpu[mode] / base_cpu:>9.2f}x{peaks[mode]:>9.2f}{same[mode]:>11}/{len(prompts)}"
        )
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "versions": {p: version(p) for p in ("mlx", "mlx-lm")},
        "model": args.model,
        "random_weights": args.random_weights,
        "case": args.case,
        "prompts": len(prompts),
        "prompt_tokens": lengths,
        "budgets": budgets,
        "batch_size": size,
        "prefill_batch_size": args.prefill_batch_size,
        "runs": runs,
        "median_tokens_per_s": medians,
        "median_tokens_per_cpu_s": per_cpu,
        "peak_memory_gb": peaks,
        "identical_to_first": same,
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"generate-cpu-{args.case}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
