"""`eval` stage: base vs tuned vs quantized on the held-out test split.

For each model: test loss and perplexity (assistant tokens only), and batched greedy
generations scored against the references with the task metrics in `eval.metrics`. Writes
metrics/eval.json (for `dvc metrics diff` / `dvc exp show`), a per-model score file for
`dvc plots`, every generation to reports/generations.jsonl, and reports/eval.md: the headline
table, the training summary and generations beside their references, worst first.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorapipe.artifacts import EVALUATED, chat_prompt, load_model
from lorapipe.batches import encode, make_batches
from lorapipe.errors import LorapipeError
from lorapipe.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from lorapipe.loss import dataset_loss
from lorapipe.params import Params
from lorapipe.scoring import FIELD_SEPARATOR, SCORERS, compression_ratio

# train.batch_size: the loss batches are training's, so what fit in training fits here (the
# full-vocabulary logits of eval.batch_size rows might not).
PARAMS = ("eval", "train.batch_size")


# The scores that order the report's examples, strictest first.
RANKING = ("exact_match", "field_f1", "chrf", "token_f1")


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


def evaluate_model(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], params: Params, world: Any = None
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The model's loss on every row, and one greedy generation per distinct prompt scored
    against its best-matching reference (the usual rule where a prompt has several answers, as
    in SciTLDR). With a distributed `world`, each process takes a share of the loss batches and
    of the prompts; every process returns the whole result."""
    import mlx.core as mx

    from lorapipe.decode import generate_batch
    from lorapipe.launch import all_gather_json

    world = world if world is not None else mx.distributed.init()
    rank, ranks = world.rank(), world.size()
    config = params.eval
    encoded = [encode(row, tokenizer, mask_prompt=True) for row in rows]
    batches = make_batches(encoded, params.train.batch_size, every_row=True, rank=rank, ranks=ranks)
    loss = dataset_loss(model, batches, config.loss_batches, world)

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
    texts, generated = generate_batch(model, tokenizer, prompts, budgets, config.batch_size)
    seconds = time.perf_counter() - tic
    predictions = [text.strip() for text in texts]

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
    shares = all_gather_json({"results": results, "tokens": generated, "seconds": seconds}, world)
    if ranks > 1 and rank == 0:
        counts = " + ".join(str(len(share["results"])) for share in shares)
        print(f"eval: {ranks} processes generated {counts} of {len(groups)} prompts", flush=True)
    results = sorted((r for share in shares for r in share["results"]), key=lambda r: r["index"])
    for r in results:
        del r["index"]

    summary: dict[str, float] = {"test_loss": loss, "test_perplexity": math.exp(min(loss, 50))}
    for name in results[0]:
        if name not in ("source", "reference", "references", "prediction"):
            summary[name] = sum(r[name] for r in results) / len(results)
    # The processes generate side by side: their tokens over the slowest one's time.
    wall = max(share["seconds"] for share in shares)
    summary["generation_tokens_per_second"] = sum(s["tokens"] for s in shares) / max(wall, 1e-9)
    return {k: round(v, 5) for k, v in summary.items()}, results


def render_report(
    metrics: dict[str, dict[str, float]],
    generations: dict[str, list[dict[str, Any]]],
    train: dict[str, Any],
    examples: int,
) -> str:
    names = list(metrics)
    prompts = len(next(iter(generations.values())))
    rows = sum(g.get("references", 1) for g in next(iter(generations.values())))
    columns = [c for c in next(iter(metrics.values())) if c != "generation_tokens_per_second"]
    lines = [
        "# Evaluation",
        "",
        f"Held-out test split, {rows} rows"
        + (
            f" ({prompts} distinct prompts: one with several reference answers is scored "
            "against its best-matching one)"
            if prompts != rows
            else ""
        )
        + ", greedy decoding. The numbers are in `metrics/eval.json`, every generation in "
        "`reports/generations.jsonl`.",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for column in columns:
        values = " | ".join(_num(metrics[n][column]) for n in names)
        lines.append(f"| {column} | {values} |")
    if train:
        t = train.get
        lines += [
            "",
            "## Training",
            "",
            f"{t('steps')} steps; validation loss {_num(t('best_val_loss'))} at its best (step "
            f"{t('best_step')}, kept: {t('kept')}), {_num(t('final_val_loss'))} at the end; "
            f"{t('seen_tokens')} tokens at {t('tokens_per_second')} tokens/s; peak memory "
            f"{t('peak_memory_gb')} GB. Curves: `dvc plots show`.",
        ]
    focus = "tuned" if "tuned" in generations else names[-1]
    # Worst first by the strictest score, ties broken by the finer ones (when every exact match
    # is 0, chrF still orders the misses), then by row.
    scores = [s for s in RANKING if s in generations[focus][0]]
    ranked = sorted(range(prompts), key=lambda i: (*(generations[focus][i][s] for s in scores), i))
    lines += ["", f"## Generations, worst {focus} first", ""]
    for i in ranked[:examples]:
        lines.append(f"**{generations[focus][i]['source']}**  ")
        example = generations[focus][i]
        of = f" (best of {example['references']})" if "references" in example else ""
        lines.append(f"- reference{of}: {_code(example['reference'])}")
        for name in names:
            lines.append(f"- {name}: {_code(generations[name][i]['prediction'][:300])}")
        lines.append("")
    return "\n".join(lines) + "\n"


def _num(value: Any) -> str:
    """Four decimals for every float (a loss of 2.0002 is not 2), integers as they are."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _code(text: str) -> str:
    """Inline code that survives any text: newlines shown as \\n, backticks fenced by two."""
    text = text.replace("\n", "\\n")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def main(params: Params) -> None:
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
    metrics: dict[str, dict[str, float]] = {}
    generations: dict[str, list[dict[str, Any]]] = {}
    for name in params.eval.models:
        model, tokenizer = load_model(params.paths, EVALUATED[name].name)
        metrics[name], generations[name] = evaluate_model(model, tokenizer, rows, params, world)
        if speaks:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics[name].items())
            print(f"eval: {name}: {shown}", flush=True)
        del model
    if not speaks:
        return

    metrics_dir, reports = Path(params.paths.metrics), Path(params.paths.reports)
    atomic_write_json(metrics_dir / "eval.json", metrics)
    atomic_write_json(
        reports / "eval_scores.json",
        [{"model": name, **scores} for name, scores in metrics.items()],
    )
    atomic_write_jsonl(
        reports / "generations.jsonl",
        [{"model": name, **r} for name, rs in generations.items() for r in rs],
    )
    train_summary = metrics_dir / "train.json"
    train = json.loads(train_summary.read_text()) if train_summary.is_file() else {}
    atomic_write_text(
        reports / "eval.md", render_report(metrics, generations, train, params.eval.report_examples)
    )
