"""reports/eval.md: numbers shown as measured, and the worst examples first even when the
strictest score ties (every exact match 0)."""

from __future__ import annotations

from lorapipe.stages.eval import render_report


def generation(source: str, exact: float, chrf: float) -> dict[str, object]:
    return {
        "source": source,
        "reference": "ref",
        "prediction": f"pred {source}",
        "exact_match": exact,
        "chrf": chrf,
    }


def test_ties_on_exact_match_are_ordered_by_chrf_and_losses_keep_their_decimals() -> None:
    tuned = [generation("a", 0.0, 0.9), generation("b", 0.0, 0.2), generation("c", 0.0, 0.5)]
    metrics = {"tuned": {"test_loss": 2.0002, "exact_match": 0.0, "chrf": 0.5333333}}
    report = render_report(metrics, {"tuned": tuned}, {}, examples=3)
    assert "| test_loss | 2.0002 |" in report
    assert "| chrf | 0.5333 |" in report
    order = [line for line in report.splitlines() if line.startswith("**")]
    assert order == ["**b**  ", "**c**  ", "**a**  "]
