"""The eval tasks: benchmark rows (and the held-out pairs) -> items and the requests they make, drops counted."""
import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from pipeline import storage
from pipeline.answers import strict_answer
from pipeline.config import Config, EvalSourceSection, eval_task_names
from pipeline.pairs import check_source_files, checked_tokenizer, read_source
from pipeline.sources import Drop, answer_index, multiple_choice_fields, parse_record
from pipeline.vocab import counts_text

REQUEST_SCHEMA = pa.schema([
    ("request_id", pa.int64()), ("kind", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.int32())), ("max_new_tokens", pa.int32()), ("stop", pa.list_(pa.string())),
])


@dataclass
class Task:
    """One eval task: its items, the requests they make, and what was dropped on the way."""
    name: str
    kind: str
    """pairs, multiple_choice or gsm8k."""
    items: list[dict] = field(default_factory=list)
    rows_in: int = 0
    dropped: Counter = field(default_factory=Counter)
    drop_examples: dict = field(default_factory=dict)

    def drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        self.drop_examples.setdefault(reason, detail[:300])


class Requests:
    """The requests of every task, numbered; each item keeps the ids of its own."""

    def __init__(self):
        self.rows = []

    def loglik(self, prompt_ids: list[int], completion_ids: list[int]) -> int:
        self.rows.append({"request_id": len(self.rows), "kind": "loglik", "prompt_ids": prompt_ids,
                          "completion_ids": completion_ids, "max_new_tokens": 0, "stop": []})
        return len(self.rows) - 1

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop: list[str]) -> int:
        self.rows.append({"request_id": len(self.rows), "kind": "generate", "prompt_ids": prompt_ids,
                          "completion_ids": [], "max_new_tokens": max_new_tokens, "stop": stop})
        return len(self.rows) - 1

    def table(self, ids: set[int] | None = None) -> pa.Table:
        rows = self.rows if ids is None else [r for r in self.rows if r["request_id"] in ids]
        return pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA)


def _encode_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split of context and continuation into tokens: trailing spaces of the context move
    into the continuation, the whole string is encoded once and the continuation is what follows the context's
    tokens (so a merge across the boundary is scored as the model would see it). An empty context is the
    end-of-sequence token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not context_ids:
        return [tokenizer.bos_token_id or tokenizer.eos_token_id], whole
    return context_ids, whole[len(context_ids):]


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleanup: WikiHow's "[title]" markers and bracketed tags removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def multiple_choice_task(task: Task, records: list[dict], source, tokenizer, requests: Requests,
                         max_length: int) -> None:
    """One item per question: every choice is a log-likelihood request of " choice" after the context."""
    for origin, row in records:
        try:
            question, choices, answer, labels, template = multiple_choice_fields(row, source.fields)
            if not isinstance(question, str) or not question.strip():
                raise Drop("empty_field", "empty question")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise Drop("too_few_choices", f"need two or more text choices, got {choices!r}")
            gold = answer_index(answer, choices, labels)
            if "endings" in row:
                if row.get("ctx_a") is not None and row.get("ctx_b") is not None:  # as the harness builds it
                    question = f"{row.get('activity_label', '')}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
                question, choices = hellaswag_preprocess(question), [hellaswag_preprocess(c) for c in choices]
            else:
                question, choices = question.strip(), [c.strip() for c in choices]
            context = (source.prompt_template or template).format(question=question)
            encoded = [_encode_continuation(tokenizer, context, " " + choice) for choice in choices]
            longest = max(len(c) + len(x) for c, x in encoded)
            if longest > max_length:
                raise Drop("too_long", f"{longest} tokens > eval.max_length {max_length}")
        except Drop as drop:
            task.drop(drop.reason, f"{origin}: {drop.detail}")
            continue
        task.items.append({"origin": origin, "gold": gold, "choice_chars": [len(c) for c in choices],
                           "requests": [requests.loglik(c, x) for c, x in encoded]})


GSM8K_TEMPLATE = "Question: {question}\nAnswer:"


def gsm8k_task(task: Task, records: list[dict], source, tokenizer, requests: Requests, max_length: int) -> None:
    """The first `num_fewshot` rows are the worked examples of every prompt; each later row is one item."""
    fields = source.fields
    question_key, answer_key = fields.get("question", "question"), fields.get("answer", "answer")
    examples, shots = [], []
    for origin, row in records:
        try:
            question, solution = row.get(question_key), row.get(answer_key)
            if not isinstance(question, str) or not question.strip():
                raise Drop("missing_field", f"no {question_key!r} text")
            if not isinstance(solution, str) or strict_answer(solution) is None:
                raise Drop("no_final_answer", f"{answer_key!r} has no '#### N' final answer")
        except Drop as drop:
            task.drop(drop.reason, f"{origin}: {drop.detail}")
            continue
        if len(shots) < source.num_fewshot:
            shots.append(GSM8K_TEMPLATE.format(question=question.strip()) + " " + solution.strip())
            task.drop("fewshot_example", f"{origin}: used as a worked example in every prompt")
            continue
        examples.append((origin, question.strip(), solution))
    prefix = "".join(shot + "\n\n" for shot in shots)
    for origin, question, solution in examples:
        prompt_ids = tokenizer(prefix + GSM8K_TEMPLATE.format(question=question))["input_ids"]
        if len(prompt_ids) + source.max_new_tokens > max_length:
            task.drop("too_long", f"{origin}: {len(prompt_ids)} prompt tokens + max_new_tokens "
                                  f"{source.max_new_tokens} > eval.max_length {max_length}")
            continue
        task.items.append({"origin": origin, "question": question, "target": strict_answer(solution),
                           "requests": [requests.generate(prompt_ids, source.max_new_tokens, source.stop)]})


def pairs_task(task: Task, pairs: pa.Table, requests: Requests, max_length: int) -> None:
    """The reference stage's held-out pairs: chosen and rejected scored by each policy."""
    for row in pairs.to_pylist():
        longest = len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        if longest > max_length:
            task.drop("too_long", f"pair {row['pair_id']}: {longest} tokens > eval.max_length {max_length}")
            continue
        task.items.append({"pair_id": row["pair_id"], "ref": (row["ref_chosen_logp"], row["ref_rejected_logp"]),
                           "chosen_tokens": len(row["chosen_ids"]),
                           "requests": [requests.loglik(row["prompt_ids"], row["chosen_ids"]),
                                        requests.loglik(row["prompt_ids"], row["rejected_ids"])]})


def check_inputs(cfg: Config) -> None:
    """The eval stage's checks before Ray starts (StageSpec.check): its benchmark files and the tokenizer."""
    check_source_files(cfg.eval.sources, "eval.sources")
    checked_tokenizer(cfg)


def read_records(source: EvalSourceSection) -> tuple[list[tuple[str, dict]], Counter, dict]:
    """An eval source's rows in file order (few-shot examples are its first rows), with read drops counted."""
    import ray

    context = ray.data.DataContext.get_current()
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        limit = source.limit + source.num_fewshot if source.limit and source.task == "gsm8k" else source.limit
        raw = read_source(source, limit).take_all()
    finally:
        context.execution_options.preserve_order = preserve
    records, dropped, examples = [], Counter(), {}
    for r in raw:
        try:
            records.append((r["origin"], parse_record(r["record"], r["read_error"])))
        except Drop as drop:
            dropped[drop.reason] += 1
            examples.setdefault(drop.reason, f"{r['origin']}: {drop.detail}"[:300])
    return records, dropped, examples


def build_tasks(cfg: Config, reference_uri: str, tokenizer) -> tuple[list[Task], Requests]:
    requests = Requests()
    tasks = []
    names = eval_task_names(cfg)
    if cfg.eval.pairs:
        pairs = storage.read_parquet(reference_uri)
        pairs = pairs.filter(pa.compute.equal(pairs["split"], "eval"))
        task = Task(names.pop(0), "pairs", rows_in=pairs.num_rows)
        pairs_task(task, pairs, requests, cfg.eval.max_length)
        tasks.append(task)
    for name, source in zip(names, cfg.eval.sources):
        records, dropped, examples = read_records(source)
        task = Task(name, source.task, rows_in=len(records) + dropped.total(), dropped=dropped,
                    drop_examples=examples)
        build = multiple_choice_task if source.task == "multiple_choice" else gsm8k_task
        build(task, records, source, tokenizer, requests, cfg.eval.max_length)
        tasks.append(task)
    for task in tasks:
        assert task.rows_in == len(task.items) + task.dropped.total(), (task.name, task.rows_in)
        print(f"[dpop] eval: {task.name} ({task.kind}): {len(task.items)} items"
              + (f", dropped {counts_text(task.dropped)}" if task.dropped else ""), flush=True)
        if not task.items:
            raise ValueError(f"eval: task {task.name} has no item to evaluate (read {task.rows_in}, dropped "
                             f"{counts_text(task.dropped)}; e.g. {next(iter(task.drop_examples.values()), '')})")
    return tasks, requests
