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


def test_the_verifier_reads_a_multiple_choice_letter_marked_or_leading():
    completions = [" B", " (B) since whales breathe air", " B. whale", " #### B", " it is #### C", " A lot of water",
                   "I'm not sure", " B because"]
    scores, counts = verifier_scores(completions, "B", "multiple_choice")
    assert scores == [1.0, 1.0, 1.0, 1.0, 0.0, None, None, None]
    assert counts == Counter(no_final_answer=3)


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


def tiny_reward_model(folder, tiny_model: str, num_labels: int = 1) -> str:
    """A 2-layer Llama with a score head, on the tiny model's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_model)
    config.num_labels = num_labels
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return str(folder)


def test_reward_model_scores_equal_a_direct_transformers_computation(tmp_path, tiny_model):
    """Left-padded micro-batches of mixed lengths score each sequence as one unpadded forward pass does."""
    import pytest
    import torch
    from transformers import AutoModelForSequenceClassification

    from pipeline.engines import RewardEngine

    folder = tiny_reward_model(tmp_path / "rm", tiny_model)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15]]
    completions = [[20, 21], [22, 23, 24, 25, 26], [27], [28, 29, 30]]
    rewards = RewardEngine(folder, "float32", False, 3, False).rewards(prompts, completions)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([p + c])).logits[0, 0].item() for p, c in zip(prompts, completions)]
    assert rewards == pytest.approx(expected, abs=1e-5)
    assert len(set(rewards)) == 4


def test_a_reward_model_with_more_than_one_label_is_refused_by_name(tmp_path, tiny_model):
    import pytest

    from pipeline.engines import RewardEngine
    from pipeline.vocab import ConfigError

    folder = tiny_reward_model(tmp_path / "classifier", tiny_model, num_labels=2)
    with pytest.raises(ConfigError, match=r"reward_model: .*classifier has 2 output labels \(LABEL_0, LABEL_1\)"):
        RewardEngine(folder, "float32", False, 3, False)
