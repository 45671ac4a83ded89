"""reports/eval.md: numbers shown as measured, and the worst examples first even when the
strictest score ties (every exact match 0)."""

from __future__ import annotations

from lorapipe.stages.report import render_report


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


def test_a_prompt_with_several_references_is_scored_against_its_best_match() -> None:
    from lorapipe.stages.eval import group_by_prompt, score

    scores, best = score("meet | Bob", ["meet | Alice", "meet | Bob"], ["exact_match", "chrf"])
    assert best == 1 and scores["exact_match"] == 1.0 and scores["chrf"] == 1.0
    scores, best = score("meet | Al", ["see | Bo", "meet | Alice"], ["exact_match", "chrf"])
    assert best == 1 and scores["exact_match"] == 0.0 and 0 < scores["chrf"] < 1

    def row(prompt: str, answer: str) -> dict[str, object]:
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ]
        }

    rows = [row("p", "a"), row("q", "b"), row("p", "c"), row("P", "d")]
    assert group_by_prompt(rows) == [[0, 2], [1], [3]]  # equal prompts only, first seen first


def test_the_report_counts_rows_and_distinct_prompts() -> None:
    several = {**generation("a", 1.0, 1.0), "references": 3}
    metrics = {"tuned": {"test_loss": 1.0, "exact_match": 0.5, "chrf": 0.5}}
    report = render_report(metrics, {"tuned": [several, generation("b", 0.0, 0.1)]}, {}, 2)
    assert "Held-out test split, 4 rows (2 distinct prompts" in report
    assert "- reference (best of 3): `ref`" in report
