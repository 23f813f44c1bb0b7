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
    assert ni_metrics.normalize_answer("The  Answer, is: A!") == "the answer is a"
    with pytest.raises(ValueError, match="no references"):
        ni_metrics.best_over_references(ni_metrics.rouge_l, "x", [])
    with pytest.raises(ValueError, match="differ in length"):
        ni_metrics.score(["x"], [], [], [])


def test_exact_match_keeps_articles():
    # The official SNI normalisation does not remove articles (unlike SQuAD's).
    assert ni_metrics.exact_match("the cat", "cat") == 0.0
    assert ni_metrics.exact_match("a", "A.") == 1.0
    assert ni_metrics.exact_match("an apple", "apple") == 0.0
    assert ni_metrics.normalize_answer("A") == "a"


def test_exact_match_punctuation_case_whitespace():
    assert ni_metrics.exact_match("Yes!", "yes") == 1.0
    assert ni_metrics.exact_match("  New\tYork \n City ", "new york city") == 1.0
    # Punctuation is deleted, not replaced by a space.
    assert ni_metrics.normalize_answer("don't stop-now") == "dont stopnow"
    assert ni_metrics.exact_match("stop-now", "stop now") == 0.0
    assert ni_metrics.exact_match("yes", "no") == 0.0


def test_several_references_take_the_max():
    refs = ["London", "Paris.", "the city of Paris"]
    assert ni_metrics.best_over_references(ni_metrics.exact_match, "paris", refs) == 1.0
    # ROUGE-L: "paris" vs "the city of paris": LCS 1, P = 1, R = 1/4, F = 2/5; vs "Paris." F = 1.
    assert ni_metrics.rouge_l("paris", "the city of Paris") == pytest.approx(2 / 5)
    assert ni_metrics.best_over_references(ni_metrics.rouge_l, "paris", refs) == 1.0
    assert ni_metrics.best_over_references(
        ni_metrics.rouge_l, "paris", ["London", "the city of Paris"]
    ) == pytest.approx(2 / 5)


def test_empty_prediction():
    assert ni_metrics.exact_match("", "yes") == 0.0
    assert ni_metrics.rouge_l("", "yes") == 0.0
    assert ni_metrics.best_over_references(ni_metrics.rouge_l, "", ["a b", "c"]) == 0.0
    # Only an empty (after normalisation) reference matches an empty prediction exactly.
    assert ni_metrics.exact_match("", "?!") == 1.0


def test_rouge_l_hand_computed_with_stemming():
    # rouge-score's default tokenizer lower-cases and Porter-stems tokens longer than 3 chars:
    # prediction "the cats are running" -> [the, cat, are, run]  ("are" is too short to stem)
    # reference  "a cat runs"           -> [a, cat, run]
    # LCS = [cat, run] = 2; P = 2/4, R = 2/3, F = 2PR / (P + R) = (2/3) / (7/6) = 4/7.
    assert ni_metrics.rouge_l("the cats are running", "a cat runs") == pytest.approx(4 / 7)
    # Argument order matters for P and R but not for F; check the scorer's P/R roles directly.
    s = ni_metrics._SCORER.score(target="a cat runs", prediction="the cats are running")
    assert s["rougeL"].precision == pytest.approx(1 / 2)
    assert s["rougeL"].recall == pytest.approx(2 / 3)
    # No exact match: articles differ and no stemming is applied for exact match.
    assert ni_metrics.exact_match("the cats are running", "a cat runs") == 0.0


def test_overall_is_mean_over_instances_times_100():
    predictions = ["the cats are running", "Yes!", "", "the cat", "blue"]
    references = [["a cat runs"], ["no", "yes"], ["something"], ["cat"], ["Blue.", "red"]]
    tasks = ["t1", "t1", "t2", "t2", "t3"]
    categories = ["A", "A", "A", "B", "B"]
    result = ni_metrics.score(predictions, references, tasks, categories)
    # rougeL per instance: 4/7, 1, 0, "the cat" vs "cat" -> P 1/2, R 1, F 2/3, 1
    rouge = [4 / 7, 1.0, 0.0, 2 / 3, 1.0]
    em = [0.0, 1.0, 0.0, 0.0, 1.0]
    assert result["overall"]["count"] == 5
    assert result["overall"]["rougeL"] == pytest.approx(100 * sum(rouge) / 5)
    assert result["overall"]["exact_match"] == pytest.approx(40.0)
    assert result["per_task"]["t1"]["rougeL"] == pytest.approx(100 * (4 / 7 + 1) / 2)
    assert result["per_task"]["t1"]["exact_match"] == pytest.approx(50.0)
    assert result["per_task"]["t2"]["exact_match"] == pytest.approx(0.0)
    assert result["per_category"]["A"]["rougeL"] == pytest.approx(100 * sum(rouge[:3]) / 3)
    assert result["per_category"]["B"]["exact_match"] == pytest.approx(100 * sum(em[3:]) / 2)
