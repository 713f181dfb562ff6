"""`eval` stage (Ray Data actor pools, the reference stage's engines): did the policy get better than the reference?

Every model (the reference, train's policy, each finished trial of tune) answers the same requests:
- `pairs`: the reference stage's held-out pairs (split `eval`, never trained on). Each policy scores chosen and
  rejected; against the reference log-probs already on storage this gives reward accuracy and margin (with the
  policy's own β) and the paper's quantity, the change in log p(chosen) and log p(rejected).
- `multiple_choice` sources: every choice scored by its log-likelihood after the context, as lm-evaluation-harness
  does (continuation " choice", a trailing space of the context moved into it); `acc` picks the highest sum,
  `acc_norm` the highest sum per character of the choice. Grouped by question.
- `gsm8k` sources: greedy answers after a k-shot prompt, the final number taken by the strict `#### N` rule
  (`exact_match`) and by the last number in the answer (`exact_match_flexible`), numbers normalised.

Flow: tasks (`tasks.py`: rows -> items and one requests table of log-likelihood or generation requests, token ids)
-> per model, an actor pool of that model's engine answers them (`stage.py`) -> metrics per model x task
(`metrics.py`) -> results.json, results.md, eval.png, generations.parquet, and best.json when eval.select_by ranks
the trials.
"""
