"""`generate` stage of an online round (Ray Data actor pool): `online.samples_per_prompt` completions of each problem
from the round's policy, on the engines `reference` and `eval` use.

Reads `online.prompts` (a question and a gold answer a row: a number, or a multiple-choice letter) and writes one
row a problem: `prompt_id` (stable hash), `source`, `task`, `question`, `gold`, `prompt`, `prompt_ids`, `completions`
(k strings). A row without a question or a readable gold answer, or whose prompt leaves no room for
`max_new_tokens` within `data.max_length`, is dropped and counted. The sampling settings, the seed and the
generation throughput go in the manifest.
"""
import hashlib
import time
from collections import Counter

from pipeline import storage
from pipeline.answers import normalize_number, strict_answer
from pipeline.config import Config, PromptSourceSection, source_name
from pipeline.engines import EngineActor, engine_actor
from pipeline.pairs import checked_tokenizer, read_source
from pipeline.sources import QA_TEMPLATE, Drop, answer_index, multiple_choice_fields, parse_record
from pipeline.vocab import StageFailed

DROP_EXAMPLES_KEPT = 3


def gold_answer(answer) -> str:
    """The gold final answer of a row: the number after '####' of a worked solution, or the answer itself when it
    is a number."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return normalize_number(f"{answer:g}")
    if isinstance(answer, str):
        final = strict_answer(answer) or strict_answer(f"#### {answer.strip()}")
        if final and final.lstrip("-").replace(".", "", 1).isdigit():
            return final
    raise Drop("no_gold_answer", f"answer {str(answer)[:80]!r} is neither a number nor a solution ending '#### N'")


MULTIPLE_CHOICE_TEMPLATE = "Question: {question}\n{choices}\nAnswer:"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def problem_prompt(row: dict, source: PromptSourceSection) -> tuple[str, str, str]:
    """(question, prompt, gold answer) of one row: a math problem and its final number, or a multiple-choice question
    with its choices lettered A, B, ... and the right one's letter."""
    if source.task == "multiple_choice":
        question, choices, answer, labels, _ = multiple_choice_fields(row, source.fields)
        if not isinstance(question, str) or not question.strip():
            raise Drop("missing_field", "no question text")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or \
                not 2 <= len(choices) <= len(LETTERS):
            raise Drop("too_few_choices", f"need 2 to {len(LETTERS)} text choices, got {choices!r}"[:200])
        try:
            gold = LETTERS[answer_index(answer, choices, labels)]
        except Drop as drop:
            raise Drop("no_gold_answer", drop.detail) from None
        lettered = "\n".join(f"{letter}. {choice.strip()}" for letter, choice in zip(LETTERS, choices))
        template = source.prompt_template or MULTIPLE_CHOICE_TEMPLATE
        return question.strip(), template.format(question=question.strip(), choices=lettered), gold
    question_key = source.fields.get("question", "question")
    question = row.get(question_key)
    if not isinstance(question, str) or not question.strip():
        raise Drop("missing_field", f"no {question_key!r} text")
    gold = gold_answer(row.get(source.fields.get("answer", "answer")))
    return question.strip(), (source.prompt_template or QA_TEMPLATE).format(question=question.strip()), gold


def read_problems(cfg: Config, tokenizer) -> tuple[list[dict], Counter, dict]:
    """Every online.prompts row as a problem to sample, or a counted drop with an example of each reason."""
    online, rows, dropped, examples = cfg.online, [], Counter(), {}
    for source in online.prompts:
        name = source_name(source)
        for raw in read_source(source, source.limit).take_all():
            try:
                question, prompt, gold = problem_prompt(parse_record(raw["record"], raw["read_error"]), source)
                prompt_ids = tokenizer(prompt)["input_ids"]
                if len(prompt_ids) + online.max_new_tokens > cfg.data.max_length:
                    raise Drop("too_long", f"{len(prompt_ids)} prompt tokens + online.max_new_tokens "
                                           f"{online.max_new_tokens} > data.max_length {cfg.data.max_length}")
            except Drop as drop:
                dropped[drop.reason] += 1
                examples.setdefault(drop.reason, []).append(f"{raw['origin']}: {drop.detail}"[:300])
                continue
            rows.append({"prompt_id": hashlib.sha256(f"{name}\x00{prompt}".encode()).hexdigest()[:16],
                         "source": name, "task": source.task, "question": question, "gold": gold, "prompt": prompt,
                         "prompt_ids": prompt_ids})
    return rows, dropped, {reason: found[:DROP_EXAMPLES_KEPT] for reason, found in examples.items()}


class ProblemSampler(EngineActor):
    """Ray Data actor: the completions of a batch of problems."""

    def __init__(self, backend: str, engine_kwargs: dict, sampling: dict):
        super().__init__(backend, engine_kwargs)
        self.sampling = sampling

    def __call__(self, batch):
        import pyarrow as pa

        completions = self.engine.generate(batch["prompt_ids"].to_pylist(), **self.sampling)
        return batch.append_column("completions", pa.array(completions, pa.list_(pa.string())))


def generate_samples(cfg: Config, stage) -> dict:
    import ray

    online = cfg.online
    tokenizer = checked_tokenizer(cfg)
    problems, dropped, examples = read_problems(cfg, tokenizer)
    if not problems:
        raise StageFailed(f"generate: no usable problem in online.prompts (dropped: {dict(dropped)})",
                          {"rows": 0, "dropped": dict(dropped), "drop_examples": examples})
    sampling = {"max_new_tokens": online.max_new_tokens, "stop": online.stop, "n": online.samples_per_prompt,
                "temperature": online.temperature, "top_p": online.top_p, "seed": online.seed}
    backend = cfg.reference.backend
    actor = engine_actor(cfg, cfg.model.name_or_path, cfg.data.max_length, backend)
    actor["fn_constructor_kwargs"]["sampling"] = sampling
    print(f"[dpop] generate: {len(problems)} problems x {online.samples_per_prompt} samples from "
          f"{cfg.model.name_or_path} ({backend}, temperature {online.temperature:g}, top_p {online.top_p:g}, seed "
          f"{online.seed})", flush=True)
    started = time.time()
    ray.data.from_items(problems).map_batches(ProblemSampler, batch_size=cfg.reference.batch_size, **actor) \
        .write_parquet(stage.out)
    seconds = time.time() - started
    written = storage.read_parquet(stage.out, ["completions"]).column(0).to_pylist()
    tokens = sum(len(ids) for completions in written for ids in tokenizer(completions)["input_ids"])
    print(f"[dpop] generate: {tokens:,} tokens in {seconds:.0f} s ({tokens / seconds:,.0f} tokens/s)", flush=True)
    return {"rows": len(written), "rows_in": len(problems) + dropped.total(), "dropped": dict(dropped),
            "drop_examples": examples, "sampling": {**sampling, "backend": backend, "model": cfg.model.name_or_path},
            "completion_tokens": tokens, "generation_seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1)}
