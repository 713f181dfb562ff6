"""Labelling the policy's samples: the verifier reads final answers as eval does, and every prompt ends in pairs or a
named drop."""
from collections import Counter

from pipeline.labels import ranked_pairs, verifier_scores


def test_the_verifier_scores_final_answers_and_counts_completions_without_one():
    completions = ["2 + 2 = 4\n#### 4", "#### 1,000", "2 + 2 = 5\n#### 5", "I think it is 4", "#### 4.", ""]
    scores, counts = verifier_scores(completions, "4")
    assert scores == [1.0, 0.0, 0.0, None, 1.0, None]
    assert counts == Counter(no_final_answer=2)
    assert verifier_scores(["#### 1,000"], "1000")[0] == [1.0]  # gold and answer normalised alike


def test_pairs_put_the_best_against_the_worst_and_each_completion_in_one_pair():
    completions = ["a", "b", "c", "d", "e"]
    assert ranked_pairs(completions, [0.1, 0.9, 0.5, None, 0.3], 1) == ([("b", "a")], None)
    assert ranked_pairs(completions, [0.1, 0.9, 0.5, None, 0.3], 5) == ([("b", "a"), ("c", "e")], None)
    # Correct against incorrect, never correct against correct.
    assert ranked_pairs(completions, [1.0, 1.0, 1.0, 0.0, None], 3) == ([("a", "d")], None)


def test_a_prompt_without_a_pair_is_dropped_with_its_reason():
    assert ranked_pairs(["a", "b", "c"], [1.0, 1.0, 1.0], 2) == ([], "all_correct")
    assert ranked_pairs(["a", "b", "c"], [0.0, 0.0, None], 2) == ([], "all_wrong")
    assert ranked_pairs(["a", "b"], [0.4, 0.4], 2) == ([], "all_tied")
    assert ranked_pairs(["a", "a", "b"], [1.0, 0.0, None], 2) == ([], "too_few_scored")  # one distinct text
    assert ranked_pairs(["a", "b"], [None, None], 2) == ([], "too_few_scored")
