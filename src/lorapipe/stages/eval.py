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


def evaluate_model(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], params: Params
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from mlx_lm.generate import batch_generate

    config = params.eval
    examples = [encode(row, tokenizer, mask_prompt=True) for row in rows]
    batches = make_batches(examples, params.train.batch_size, every_row=True)
    loss = dataset_loss(model, batches, config.loss_batches)

    prompts = [chat_prompt(tokenizer, row["messages"][:-1]) for row in rows]
    references = [row["messages"][-1]["content"] for row in rows]
    sources = [
        "\n".join(m["content"] for m in row["messages"] if m["role"] == "user") for row in rows
    ]
    budgets = [
        math.ceil(config.max_tokens_factor * len(tokenizer.encode(ref))) + config.max_tokens_extra
        for ref in references
    ]
    tic = time.perf_counter()
    response = batch_generate(
        model, tokenizer, prompts, max_tokens=budgets, completion_batch_size=config.batch_size
    )
    seconds = time.perf_counter() - tic
    predictions = [text.strip() for text in response.texts]

    results = []
    for row, prediction, reference, source in zip(
        rows, predictions, references, sources, strict=True
    ):
        scores: dict[str, float] = {
            name: SCORERS[name](prediction, reference) for name in config.metrics if name in SCORERS
        }
        if "compression_ratio" in config.metrics:
            scores["compression_ratio"] = compression_ratio(prediction, source)
        record: dict[str, Any] = {
            "source": row["meta"]["source"],
            "reference": reference,
            "prediction": prediction,
        }
        results.append({**record, **scores})
    summary: dict[str, float] = {"test_loss": loss, "test_perplexity": math.exp(min(loss, 50))}
    for name in results[0]:
        if name not in ("source", "reference", "prediction"):
            summary[name] = sum(r[name] for r in results) / len(results)
    generated = response.stats.generation_tokens
    summary["generation_tokens_per_second"] = generated / max(seconds, 1e-9)
    return {k: round(v, 5) for k, v in summary.items()}, results


def render_report(
    metrics: dict[str, dict[str, float]],
    generations: dict[str, list[dict[str, Any]]],
    train: dict[str, Any],
    examples: int,
) -> str:
    names = list(metrics)
    rows = len(next(iter(generations.values())))
    columns = [c for c in next(iter(metrics.values())) if c != "generation_tokens_per_second"]
    lines = [
        "# Evaluation",
        "",
        f"Held-out test split, {rows} rows, greedy decoding. The numbers are in "
        "`metrics/eval.json`, every generation in `reports/generations.jsonl`.",
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
    ranked = sorted(range(rows), key=lambda i: (*(generations[focus][i][s] for s in scores), i))
    lines += ["", f"## Generations, worst {focus} first", ""]
    for i in ranked[:examples]:
        lines.append(f"**{generations[focus][i]['source']}**  ")
        lines.append(f"- reference: {_code(generations[focus][i]['reference'])}")
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
    rows = test_rows(params)
    references = [row["messages"][-1]["content"] for row in rows]
    if "field_f1" in params.eval.metrics and not any(FIELD_SEPARATOR in r for r in references):
        print(
            f"eval: field_f1 scores `kind | key: value` records (the demo's); no reference here "
            f"has a {FIELD_SEPARATOR.strip()!r} field, so it only repeats exact_match: drop it "
            "from eval.metrics"
        )
    metrics: dict[str, dict[str, float]] = {}
    generations: dict[str, list[dict[str, Any]]] = {}
    for name in params.eval.models:
        model, tokenizer = load_model(params.paths, EVALUATED[name].name)
        metrics[name], generations[name] = evaluate_model(model, tokenizer, rows, params)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics[name].items())
        print(f"eval: {name}: {shown}", flush=True)
        del model

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
