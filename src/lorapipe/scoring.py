"""Task metrics for generations against references: each a pure function returning [0, 1]
(compression_ratio excepted: output length over input length, lower is terser)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

FIELD_SEPARATOR = " | "

# The scores that order the report's examples, strictest first.
RANKING = ("exact_match", "field_f1", "chrf", "token_f1")


def evaluation_files(metrics_dir: str, reports_dir: str, model: str) -> tuple[Path, Path]:
    """Where the `eval@<model>` stage writes its scores and its generations (dvc.yaml's outs)."""
    return (
        Path(metrics_dir) / "eval" / f"{model}.json",
        Path(reports_dir) / "generations" / f"{model}.jsonl",
    )


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def _f1(predicted: Counter[str], expected: Counter[str]) -> float:
    if not predicted and not expected:
        return 1.0
    overlap = sum((predicted & expected).values())
    if overlap == 0:
        return 0.0
    precision = overlap / sum(predicted.values())
    recall = overlap / sum(expected.values())
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over whitespace-separated tokens."""
    return _f1(Counter(prediction.split()), Counter(reference.split()))


def field_f1(prediction: str, reference: str) -> float:
    """F1 over `kind | key: value | ...` fields: a field counts only if it is exactly right."""
    fields = lambda text: Counter(f.strip() for f in text.strip().split(FIELD_SEPARATOR))  # noqa: E731
    return _f1(fields(prediction), fields(reference))


def chrf(prediction: str, reference: str, max_order: int = 6, beta: float = 2.0) -> float:
    """chrF (Popović, 2015) as sacrebleu computes it by default: character n-grams of order
    1..6 with whitespace removed, averaged precision and recall, F-beta with beta = 2."""
    hyp, ref = "".join(prediction.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, max_order + 1):
        hyp_grams = Counter(hyp[i : i + n] for i in range(len(hyp) - n + 1))
        ref_grams = Counter(ref[i : i + n] for i in range(len(ref) - n + 1))
        if not hyp_grams or not ref_grams:
            continue
        overlap = sum((hyp_grams & ref_grams).values())
        precisions.append(overlap / sum(hyp_grams.values()))
        recalls.append(overlap / sum(ref_grams.values()))
    if not precisions:
        return float(hyp == ref)
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p + r == 0:
        return 0.0
    return (1 + beta**2) * p * r / (beta**2 * p + r)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "field_f1": field_f1,
    "token_f1": token_f1,
    "chrf": chrf,
}


def compression_ratio(output: str, source: str) -> float:
    return len(output.strip()) / max(len(source.strip()), 1)
