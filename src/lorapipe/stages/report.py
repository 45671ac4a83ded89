"""`report` stage: the evaluated models side by side.

Reads each `eval@<name>` stage's metrics and generations (in `eval.models` order) and the
training summary, and writes reports/eval.md (the headline table, the training summary and
generations beside their references, worst first) and reports/eval_scores.json, the bar chart's
data for `dvc plots`. A small stage of its own, so that what only the report reads (training's
timings, `eval.report_examples`) never re-runs an evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorapipe.errors import LorapipeError
from lorapipe.io import atomic_write_json, atomic_write_text, read_jsonl
from lorapipe.params import Params
from lorapipe.scoring import RANKING, evaluation_files

PARAMS = ("eval.models", "eval.report_examples")


COLUMN_ORDER = ("test_loss", "test_perplexity", *RANKING, "compression_ratio")


class ReportError(LorapipeError):
    """A model's evaluation is missing."""


def render_report(
    metrics: dict[str, dict[str, float]],
    generations: dict[str, list[dict[str, Any]]],
    train: dict[str, Any],
    examples: int,
) -> str:
    names = list(metrics)
    prompts = len(next(iter(generations.values())))
    rows = sum(g.get("references", 1) for g in next(iter(generations.values())))
    # The losses first, then the task scores strictest first (the metrics files sort their keys).
    scored = [c for c in next(iter(metrics.values())) if c != "generation_tokens_per_second"]
    columns = sorted(scored, key=lambda c: (COLUMN_ORDER.index(c) if c in COLUMN_ORDER else 99, c))
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
        + ", greedy decoding. The numbers are in `metrics/eval/<model>.json`, every generation in "
        "`reports/generations/<model>.jsonl`.",
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
    metrics: dict[str, dict[str, float]] = {}
    generations: dict[str, list[dict[str, Any]]] = {}
    for name in params.eval.models:
        metrics_file, generations_file = evaluation_files(
            params.paths.metrics, params.paths.reports, name
        )
        if not metrics_file.is_file() or not generations_file.is_file():
            raise ReportError(
                f"{metrics_file}: not found; run `dvc repro eval@{name}` (it evaluates {name})"
            )
        metrics[name] = json.loads(metrics_file.read_text())[name]
        generations[name] = [line.value for line in read_jsonl(generations_file) if line.value]
    reports = Path(params.paths.reports)
    atomic_write_json(
        reports / "eval_scores.json",
        [{"model": name, **scores} for name, scores in metrics.items()],
    )
    train_summary = Path(params.paths.metrics) / "train.json"
    train = json.loads(train_summary.read_text()) if train_summary.is_file() else {}
    atomic_write_text(
        reports / "eval.md", render_report(metrics, generations, train, params.eval.report_examples)
    )
