"""The eval stage's metrics and answer extraction, against numbers worked out by hand and lm-evaluation-harness's
rules. (The stage end to end, against a slow token-by-token computation and across both backends, is in
test_pipeline.py; trials ranked by an eval result in test_tune.py.)"""
import math

import pytest

from pipeline.answers import flexible_answer, strict_answer
from pipeline.evaluate.metrics import gsm8k_metrics, multiple_choice_metrics, pair_metrics
from pipeline.evaluate.tasks import _encode_continuation
from pipeline.engines import cut_at_stop


@pytest.mark.parametrize("text, strict, flexible", [
    ("Ana has 3 + 4 = 7 pens.\n#### 7", "7", "7"),
    ("so the total is $1,234.\n#### 1,234", "1234", "1234"),
    ("It drops by 5.\n#### -5", "-5", "-5"),
    ("The answer is $18.", None, "18"),  # no '####': only the flexible rule finds it
    ("3 + 4 = 7, so 7 pens. #### 7.", "7", "7"),  # a trailing period is not part of the number
    ("I do not know", None, None),
    ("12 and then 15", None, "15"),  # the last number
])
def test_answer_extraction_follows_the_strict_and_flexible_rules(text, strict, flexible):
    assert strict_answer(text) == strict
    assert flexible_answer(text) == flexible


def test_generation_is_cut_at_the_first_stop_string():
    assert cut_at_stop(" 7 pens.\n#### 7\n\nQuestion: next", ["Question:", "\n\n"]) == " 7 pens.\n#### 7"
    assert cut_at_stop("no stop here", ["Question:"]) == "no stop here"


def test_gsm8k_exact_match_counts_items():
    items = [{"origin": f"line {i}", "question": "q", "target": target, "requests": [i]}
             for i, target in enumerate(["7", "12", "5"])]
    answers = {0: {"text": "3 + 4 = 7\n#### 7"}, 1: {"text": "it is 12"}, 2: {"text": "#### 6"}}
    metrics, samples = gsm8k_metrics(items, answers)
    assert metrics == {"exact_match": pytest.approx(1 / 3), "exact_match_flexible": pytest.approx(2 / 3)}
    assert [s["strict"] for s in samples] == ["7", None, "6"]


def test_multiple_choice_acc_and_acc_norm_differ_as_the_harness_defines_them():
    """acc: the highest summed log-likelihood; acc_norm: the highest per character of the choice. A long right
    answer loses on the sum and wins per character."""
    items = [
        # choice 1 (right, 20 characters) has the lower sum but the higher per-character score.
        {"gold": 1, "choice_chars": [2, 20], "requests": [0, 1]},
        # both rules pick choice 0, which is right.
        {"gold": 0, "choice_chars": [5, 5], "requests": [2, 3]},
        # ties: the first of equal maxima, as numpy's argmax.
        {"gold": 1, "choice_chars": [4, 4], "requests": [4, 5]},
    ]
    logps = {0: -3.0, 1: -10.0, 2: -1.0, 3: -2.0, 4: -2.0, 5: -2.0}
    metrics = multiple_choice_metrics(items, {i: {"logp": v} for i, v in logps.items()})
    assert metrics == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3)}


def test_pair_metrics_against_the_closed_form():
    # Two pairs: (policy chosen, policy rejected) against (reference chosen, reference rejected).
    ref = [(-10.0, -12.0), (-5.0, -5.5)]
    policy = [(-9.0, -14.0), (-6.0, -5.0)]
    items = [{"ref": r, "chosen_tokens": 10, "requests": [2 * i, 2 * i + 1]} for i, r in enumerate(ref)]
    answers = {2 * i + j: {"logp": policy[i][j]} for i in range(2) for j in range(2)}
    beta = 0.5
    metrics = pair_metrics(items, answers, beta, below_reference_per_token=1e-4)
    # pair 0: chosen +1, rejected -2 -> margin 0.5 * 3 = 1.5; pair 1: chosen -1, rejected +0.5 -> -0.75.
    assert metrics["logps/chosen_change"] == pytest.approx((1 - 1) / 2)
    assert metrics["logps/rejected_change"] == pytest.approx((-2 + 0.5) / 2)
    assert metrics["rewards/margins"] == pytest.approx((1.5 - 0.75) / 2)
    assert metrics["rewards/accuracies"] == 0.5
    assert metrics["acc"] == 0.5  # pair 0 prefers chosen, pair 1 does not
    assert metrics["logps/chosen_below_reference"] == 0.5
    # Pair 1's chosen is 1 nat below its reference over 10 tokens: "below" at 0.09 nats a token, not at 0.1.
    assert pair_metrics(items, answers, beta, below_reference_per_token=0.09)["logps/chosen_below_reference"] == 0.5
    assert pair_metrics(items, answers, beta, below_reference_per_token=0.1)["logps/chosen_below_reference"] == 0.0
    assert metrics["logps/chosen"] == pytest.approx(-7.5)
    reference = pair_metrics(items, None, None, below_reference_per_token=1e-4)
    assert reference == {"acc": 1.0, "logps/chosen": -7.5, "logps/rejected": pytest.approx(-8.75)}
    assert all(math.isfinite(v) for v in metrics.values())


def test_continuation_tokens_follow_the_harness(tokenizer):
    """A trailing space of the context moves into the continuation, and the continuation is what follows the
    context's tokens in the whole string's encoding."""
    context_ids, continuation_ids = _encode_continuation(tokenizer, "Question: What is 2 plus 3?\nAnswer: ", "5")
    whole = tokenizer("Question: What is 2 plus 3?\nAnswer: 5", add_special_tokens=False)["input_ids"]
    assert context_ids + continuation_ids == whole
    assert tokenizer.decode(continuation_ids) == " 5"
    assert tokenizer.decode(context_ids) == "Question: What is 2 plus 3?\nAnswer:"


def test_demo_problems_make_low_edit_distance_pairs_and_the_demo_model_learns_them(tokenizer):
    """The main demo's data: every word problem is a GSM8K-layout item whose corruption changes one number, and
    a few pretraining steps lower the language-model loss."""
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.demo import pretrain, problem_text, word_problems
    from pipeline.sources import corrupt_solution

    problems = list(word_problems(50, seed=0))
    for question, solution in problems:
        target = strict_answer(solution)
        assert target is not None and int(target) >= 0
        rejected, old, new = corrupt_solution(solution, random.Random(question))
        assert rejected != solution and old != new
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=1, head_dim=64))
    losses = pretrain(model, tokenizer, [problem_text(q, s) for q, s in problems], steps=30, seed=0, batch_size=8)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_the_methods_table_puts_each_method_beside_the_reference():
    from pipeline.evaluate.metrics import method_comparison

    def params(loss_type="sigmoid", dpop_lambda=0.0, nll_weight=0.0):
        return {"loss_type": loss_type, "dpop_lambda": dpop_lambda, "beta": 0.1, "label_smoothing": 0.0,
                "nll_weight": nll_weight, "learning_rate": 1e-5}

    models = [{"name": "reference", "params": None}, {"name": "a", "params": params()},
              {"name": "b", "params": params(dpop_lambda=50.0)}, {"name": "c", "params": params("ipo")},
              {"name": "d", "params": params(nll_weight=1.0)}]
    results = [{"model": "reference", "task": "arc", "metric": "acc_norm", "value": 0.3}]
    for i, name in enumerate("abcd"):
        results += [{"model": name, "task": "arc", "metric": "acc_norm", "value": [0.3, 0.31, 0.32, 0.33][i]},
                    {"model": name, "task": "pairs", "metric": "logps/chosen_change", "value": -1.0 + i},
                    {"model": name, "task": "pairs", "metric": "logps/rejected", "value": -9.0}]
    header, rows = method_comparison(results, models)
    assert header == ["model", "pairs logps/chosen_change", "arc acc_norm"]
    assert rows == [["reference", None, 0.3], ["DPO (λ 0, α 0)", -1.0, 0.3], ["DPOP (λ 50, α 0)", 0.0, 0.31],
                    ["IPO (λ 0, α 0)", 1.0, 0.32], ["DPO + NLL (λ 0, α 1)", 2.0, 0.33]]
    assert method_comparison(results, models[:2]) is None  # one method: nothing to compare
