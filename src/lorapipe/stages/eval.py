"""`eval` stage: one model of `eval.models` on the held-out test split (`eval@<name>`).

Test loss and perplexity (of the reference answers: each row's last assistant turn, given the
conversation before it), and batched greedy generations scored against the references with the
task metrics in `eval.metrics`. Writes metrics/eval/<name>.json (for
`dvc metrics diff` / `dvc exp show`) and every generation to reports/generations/<name>.jsonl.
Each model is its own stage so that an experiment on `lora.*` or `train.*` re-evaluates the
models it changed and never the base model; the `report` stage puts the models side by side.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorapipe import lanes
from lorapipe.artifacts import chat_prompt, load_folder, require_folder
from lorapipe.errors import LorapipeError
from lorapipe.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from lorapipe.params import Params
from lorapipe.scoring import (
    FIELD_SEPARATOR,
    RANKING,
    SCORERS,
    compression_ratio,
    evaluation_files,
)

# Not eval.models (the stage's own model folder is its dependency; adding a model must not
# re-run the others) nor eval.report_examples (the report stage's).
PARAMS = (
    "eval.metrics",
    "eval.max_rows",
    "eval.batch_size",
    "eval.max_tokens_factor",
    "eval.max_tokens_extra",
)


class EvalError(LorapipeError):
    """Nothing to evaluate."""


def test_rows(params: Params) -> list[dict[str, Any]]:
    path = Path(params.paths.sanitized) / "test.jsonl"
    if not path.is_file():
        raise EvalError(f"{path}: not found; run `dvc repro sanitize` (it makes this file)")
    rows = [line.value for line in read_jsonl(path) if line.value is not None]
    rows = [r for r in rows if "messages" in r][: params.eval.max_rows or None]
    if not rows:
        raise EvalError(
            f"{path}: no chat rows to evaluate; check the data stages' counts in reports/data.md"
        )
    return rows


def group_by_prompt(rows: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of the rows that share a prompt (every turn before the answer), in order of first
    appearance: one example each, with as many references as rows (split keeps them together)."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(json.dumps(row["messages"][:-1], sort_keys=True), []).append(i)
    return list(groups.values())


def score(
    prediction: str, references: list[str], metrics: Sequence[str]
) -> tuple[dict[str, float], int]:
    """Each text metric's best score over the references, and the best-matching reference
    (ranked by the strictest score first)."""
    scored = [
        {m: SCORERS[m](prediction, ref) for m in metrics if m in SCORERS} for ref in references
    ]
    best = max(range(len(references)), key=lambda k: tuple(scored[k].get(m, 0.0) for m in RANKING))
    return {m: max(s[m] for s in scored) for m in scored[0]}, best


def reference_tokens(tokenizer: Any, row: dict[str, Any], prompt: list[int]) -> list[int]:
    """The row's answer as training sees it after the generation `prompt`: the last assistant
    turn's tokens, its end-of-turn token and whatever the template adds after it."""
    whole = list(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False))
    if whole[: len(prompt)] != prompt or len(whole) == len(prompt):
        raise EvalError(
            "the chat template does not render a conversation as its generation prompt followed "
            "by the answer, so the answer's loss cannot be read after the prompt"
        )
    return whole[len(prompt) :]


def evaluate_model(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    params: Params,
    world: Any = None,
    lane_count: int = 1,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The model's loss on every row's answer, and one greedy generation per distinct prompt
    scored against its best-matching reference (the usual rule where a prompt has several
    answers, as in SciTLDR). One pass does both: the references are scored through the prompts'
    KV cache, which also confirms the rows whose greedy answer is their reference
    (lorapipe.decode), on `lane_count` lanes. With a distributed `world`, each process takes a
    share of the prompts; every process returns the whole result."""
    import mlx.core as mx

    from lorapipe.decode import generate_batch
    from lorapipe.launch import all_gather_json

    world = world if world is not None else mx.distributed.init()
    rank, ranks = world.rank(), world.size()
    config = params.eval
    groups = group_by_prompt(rows)
    mine = list(range(rank, len(groups), ranks))  # this process's prompts
    firsts = [rows[groups[i][0]] for i in mine]
    references = [[rows[j]["messages"][-1]["content"] for j in groups[i]] for i in mine]
    budgets = [
        math.ceil(config.max_tokens_factor * max(len(tokenizer.encode(r)) for r in refs))
        + config.max_tokens_extra
        for refs in references
    ]
    tic = time.perf_counter()
    prompts = [chat_prompt(tokenizer, row["messages"][:-1]) for row in firsts]
    answers = [
        [reference_tokens(tokenizer, rows[j], prompt) for j in groups[i]]
        for i, prompt in zip(mine, prompts, strict=True)
    ]
    generation = generate_batch(
        model, tokenizer, prompts, budgets, config.batch_size, references=answers, lanes=lane_count
    )
    seconds = time.perf_counter() - tic
    predictions = [text.strip() for text in generation.texts]

    results: list[dict[str, Any]] = []
    for index, row, prediction, refs in zip(mine, firsts, predictions, references, strict=True):
        scores, best = score(prediction, refs, config.metrics)
        if "compression_ratio" in config.metrics:
            source = "\n".join(m["content"] for m in row["messages"] if m["role"] == "user")
            scores["compression_ratio"] = compression_ratio(prediction, source)
        record: dict[str, Any] = {"source": row["meta"]["source"], "reference": refs[best]}
        if len(refs) > 1:
            record["references"] = len(refs)
        results.append({"index": index, **record, "prediction": prediction, **scores})
    losses = [loss for per_prompt in generation.losses for loss in per_prompt]
    share = {
        "results": results,
        "tokens": generation.tokens,
        "verified": generation.verified,
        "seconds": seconds,
        "loss": sum(total for total, _ in losses),
        "loss_tokens": sum(count for _, count in losses),
    }
    shares = all_gather_json(share, world)
    if rank == 0:
        verified = sum(s["verified"] for s in shares)
        print(
            f"eval: {verified} of {len(groups)} greedy answers were a reference, confirmed while "
            "scoring it; the others were decoded",
            flush=True,
        )
        if ranks > 1:
            counts = " + ".join(str(len(s["results"])) for s in shares)
            print(f"eval: {ranks} processes generated {counts} of {len(groups)} prompts")
    results = sorted((r for s in shares for r in s["results"]), key=lambda r: r["index"])
    for r in results:
        del r["index"]

    loss = sum(s["loss"] for s in shares) / max(sum(s["loss_tokens"] for s in shares), 1)
    summary: dict[str, float] = {"test_loss": loss, "test_perplexity": math.exp(min(loss, 50))}
    for name in results[0]:
        if name not in ("source", "reference", "references", "prediction"):
            summary[name] = sum(r[name] for r in results) / len(results)
    # The processes generate side by side: their tokens over the slowest one's time.
    wall = max(s["seconds"] for s in shares)
    summary["generation_tokens_per_second"] = sum(s["tokens"] for s in shares) / max(wall, 1e-9)
    return {k: round(v, 5) for k, v in summary.items()}, results


def main(params: Params, name: str, folder: str) -> None:
    """Evaluate model `name` (the mlx-lm model in `folder`)."""
    import mlx.core as mx

    # Under `LORAPIPE_PROCESSES=N` / a hostfile, N processes share the work; rank 0 speaks and
    # writes. A group of one when started as one process.
    world = mx.distributed.init()
    speaks = world.rank() == 0
    rows = test_rows(params)
    references = [row["messages"][-1]["content"] for row in rows]
    if (
        speaks
        and "field_f1" in params.eval.metrics
        and not any(FIELD_SEPARATOR in r for r in references)
    ):
        print(
            f"eval: field_f1 scores `kind | key: value` records (the demo's); no reference here "
            f"has a {FIELD_SEPARATOR.strip()!r} field, so it only repeats exact_match: drop it "
            "from eval.metrics"
        )
    lane_count = lanes.count(params.eval.batch_size)
    lanes.prepare(lane_count)  # before the first eval: MLX reads the setting once
    model, tokenizer = load_folder(require_folder(params.paths, folder))
    if speaks and lane_count > 1:
        print(f"eval: prefill and decoding on {lane_count} lanes ({lanes.origin()})")
    metrics, generations = evaluate_model(model, tokenizer, rows, params, world, lane_count)
    if not speaks:
        return
    print(f"eval: {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
    metrics_file, generations_file = evaluation_files(
        params.paths.metrics, params.paths.reports, name
    )
    atomic_write_jsonl(generations_file, generations)
    # Keyed by the model: `dvc exp show` columns read tuned.exact_match, base.test_loss, ...
    atomic_write_json(metrics_file, {name: metrics})
