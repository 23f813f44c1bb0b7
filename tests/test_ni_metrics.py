"""SNI metrics on a known prediction set give known scores."""

import pytest

from tagi_jax.evaluation import ni_metrics


def test_known_scores():
    predictions = ["The cat sat", "paris", "running fast", "no"]
    references = [["the cat sat"], ["Paris.", "London"], ["runs fast"], ["yes"]]
    tasks = ["t1", "t2", "t2", "t3"]
    categories = ["A", "B", "B", "B"]
    result = ni_metrics.score(predictions, references, tasks, categories)
    # exact match: 1, 1 (normalised "paris"), 0, 0
    assert result["overall"]["exact_match"] == pytest.approx(50.0)
    # ROUGE-L with stemming: 1.0, 1.0, "running fast" vs "runs fast" -> run/fast both match = 1.0, 0
    assert result["overall"]["rougeL"] == pytest.approx(75.0)
    assert result["per_task"]["t2"]["count"] == 2
    assert result["per_category"]["A"]["rougeL"] == pytest.approx(100.0)
    assert result["per_category"]["B"]["exact_match"] == pytest.approx(100 / 3)
    table = ni_metrics.markdown_table(result, "demo")
    assert "| **overall** | 4 | 75.0 | 50.0 |" in table


def test_partial_overlap_and_errors():
    assert ni_metrics.rouge_l("a b c d", "a b x y") == pytest.approx(0.5)
    assert ni_metrics.normalize_answer("The  Answer, is: A!") == "answer is"
    with pytest.raises(ValueError, match="no references"):
        ni_metrics.best_over_references(ni_metrics.rouge_l, "x", [])
    with pytest.raises(ValueError, match="differ in length"):
        ni_metrics.score(["x"], [], [], [])
