"""`pairs` stage of an online round: the generate stage's samples, labelled (pipeline.labels: the verifier in the
driver, or a reward model on a Ray Data actor pool), ranked into preference pairs and written in the pairs layout
(pipeline.pairs.PAIR_SCHEMA), so the reference and train stages read them as any other pairs.

Every problem ends in pairs or in a drop with its reason (all_correct, all_wrong, all_tied, too_few_scored), and
every pair that cannot be used (identical tokens, too long) is counted as the pairs stage counts it."""
from collections import Counter

import pyarrow as pa

from pipeline import storage
from pipeline.config import Config
from pipeline.engines import EngineActor, engine_actor
from pipeline.labels import ranked_pairs, verifier_scores
from pipeline.pairs import (PAIR_SCHEMA, checked_tokenizer, split_of, stable_hash, token_edit_distance,
                            tokenize_pair)
from pipeline.sources import Drop, RawPair
from pipeline.vocab import StageFailed, counts_text


class CompletionScorer(EngineActor):
    """Ray Data actor: a reward model's score of each (prompt, completion) of a batch."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        rewards = self.engine.rewards(batch["prompt_ids"].to_pylist(), batch["completion_ids"].to_pylist())
        return batch.append_column("reward", pa.array(rewards, pa.float64()))


def reward_scores(cfg: Config, problems: list[dict], tokenizer) -> list[list[float]]:
    """Each problem's completions scored by online.reward_model, each completion ended by EOS as in a pair."""
    import ray

    items = [{"problem": i, "sample": j, "prompt_ids": problem["prompt_ids"],
              "completion_ids": tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]}
             for i, problem in enumerate(problems) for j, text in enumerate(problem["completions"])]
    scored = ray.data.from_items(items).map_batches(
        CompletionScorer, batch_size=cfg.reference.batch_size,
        **engine_actor(cfg, cfg.online.reward_model, cfg.data.max_length, "reward")).take_all()
    scores = [[None] * len(problem["completions"]) for problem in problems]
    for row in scored:
        scores[row["problem"]][row["sample"]] = row["reward"]
    return scores


def pair_samples(cfg: Config, stage) -> dict:
    online, data = cfg.online, cfg.data
    tokenizer = checked_tokenizer(cfg)
    problems = storage.read_parquet(stage.inputs["generate"]).to_pylist()
    if online.labeller == "verifier":
        labelled = [verifier_scores(problem["completions"], problem["gold"], problem["task"]) for problem in problems]
        scores = [found for found, _ in labelled]
        completions_unscored = sum((counts for _, counts in labelled), Counter())
    else:
        scores, completions_unscored = reward_scores(cfg, problems, tokenizer), Counter()
    rows, dropped, problems_paired = [], Counter(), 0
    for problem, problem_scores in zip(problems, scores):
        pairs, reason = ranked_pairs(problem["completions"], problem_scores, online.pairs_per_prompt)
        if reason:
            dropped[reason] += 1
            continue
        problems_paired += 1
        for chosen, rejected in pairs:
            try:
                pair = tokenize_pair(RawPair(problem["prompt"], chosen, rejected), tokenizer, data.max_prompt_length,
                                     data.max_length)
            except Drop as drop:
                dropped[drop.reason] += 1
                continue
            rows.append({**pair, "pair_id": stable_hash(pair["prompt"], pair["chosen"], pair["rejected"]),
                         "edit_distance": token_edit_distance(pair["chosen_ids"], pair["rejected_ids"]),
                         "source": problem["source"], "split": split_of(pair["prompt"], data.eval_fraction)})
    splits = Counter(row["split"] for row in rows)
    print(f"[dpop] pairs: {problems_paired} of {len(problems)} problems gave pairs ({len(rows)} pairs: "
          f"{counts_text(splits)}); dropped {counts_text(dropped)}; completions without a score: "
          f"{counts_text(completions_unscored)}", flush=True)
    fields = {"rows": len(rows), "problems_in": len(problems), "problems_paired": problems_paired,
              "usable_share": problems_paired / len(problems) if problems else 0.0, "splits": dict(splits),
              "dropped": dict(dropped), "completions_unscored": dict(completions_unscored),
              "labeller": online.labeller}
    if not rows:
        raise StageFailed(f"pairs: none of {len(problems)} problems gave a pair (dropped: {counts_text(dropped)})",
                          fields)
    storage.write_parquet(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), storage.join(stage.out, "pairs.parquet"))
    return fields
