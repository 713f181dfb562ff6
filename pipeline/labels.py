"""Labelling the policy's own samples (online rounds): a score for each of a prompt's k completions, from the
verifier (its final answer against the gold one) or a reward model, and the preference pairs the scores give.

Every prompt ends in pairs or in a drop with its reason, and every completion that cannot be scored is counted."""
from collections import Counter

from pipeline.answers import choice_answer, normalize_number, strict_answer


def verifier_scores(completions: list[str], gold: str, task: str = "gsm8k") -> tuple[list[float | None], Counter]:
    """1.0 for a completion whose final answer is the gold answer, 0.0 for another answer, None (counted as
    `no_final_answer`) for none: a completion that never finished its solution says nothing about whether its
    reasoning was right. The final answer of `gsm8k` is '#### N', read as eval's GSM8K exact match reads it; of
    `multiple_choice`, a letter (answers.choice_answer)."""
    read = choice_answer if task == "multiple_choice" else strict_answer
    gold = gold if task == "multiple_choice" else normalize_number(gold)
    scores, counts = [], Counter()
    for completion in completions:
        answer = read(completion)
        if answer is None:
            counts["no_final_answer"] += 1
        scores.append(None if answer is None else float(answer == gold))
    return scores, counts


def ranked_pairs(completions: list[str], scores: list[float | None], pairs_per_prompt: int
                 ) -> tuple[list[tuple[str, str]], str | None]:
    """Up to `pairs_per_prompt` (chosen, rejected) pairs: the best-scored completion against the worst, the second
    best against the second worst, and so on, each pair strictly better than worse, no completion in two pairs.
    Repeated texts count once (the first). With none, the reason: `all_correct` or `all_wrong` (the verifier's
    scores, all 1 or all 0), `all_tied` (any other equal scores), `too_few_scored` (fewer than two distinct
    completions with a score)."""
    scored = {}
    for completion, score in zip(completions, scores):
        if score is not None and completion not in scored:
            scored[completion] = score
    if len(scored) < 2:
        return [], "too_few_scored"
    ranked = sorted(scored, key=scored.__getitem__, reverse=True)  # stable: sample order breaks ties
    pairs = []
    for i in range(min(pairs_per_prompt, len(ranked) // 2)):
        chosen, rejected = ranked[i], ranked[-1 - i]
        if scored[chosen] <= scored[rejected]:
            break
        pairs.append((chosen, rejected))
    if pairs:
        return pairs, None
    tied = set(scored.values())
    return [], "all_correct" if tied == {1.0} else "all_wrong" if tied == {0.0} else "all_tied"
