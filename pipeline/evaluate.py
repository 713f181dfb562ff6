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

Flow: tasks -> one requests table (log-likelihood or generation requests, token ids) -> per model, an actor pool
of that model's engine answers them -> metrics per model x task -> results.json, results.md, eval.png,
generations.parquet, and best.json when eval.select_by ranks the trials.
"""
import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import Config, eval_task_names
from pipeline.sources import Drop

TASK_METRICS = {
    "pairs": ("acc", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
              "logps/chosen_change", "logps/rejected_change", "logps/chosen_below_reference"),
    "multiple_choice": ("acc", "acc_norm"),
    "gsm8k": ("exact_match", "exact_match_flexible"),
}
# A policy's chosen log-prob counts as below the reference only beyond this (float rounding is not a drop).
BELOW_REFERENCE_NATS = 1e-3
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


class EvalScorer:
    """Ray Data actor: answers a batch of requests with its engine: `logp` for log-likelihood requests (summed
    over the completion), `text` for generation requests."""

    def __init__(self, backend: str, engine_kwargs: dict):
        from pipeline.reference import ENGINES

        self.engine = ENGINES[backend](**engine_kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        logp, text = [None] * len(rows), [None] * len(rows)
        loglik = [i for i, r in enumerate(rows) if r["kind"] == "loglik"]
        if loglik:
            values = self.engine.logps([rows[i]["prompt_ids"] for i in loglik],
                                       [rows[i]["completion_ids"] for i in loglik])
            for i, value in zip(loglik, values):
                logp[i] = float(value)
        groups = {}
        for i, r in enumerate(rows):
            if r["kind"] == "generate":
                groups.setdefault((r["max_new_tokens"], tuple(r["stop"])), []).append(i)
        for (max_new_tokens, stop), indices in groups.items():
            answers = self.engine.generate([rows[i]["prompt_ids"] for i in indices], max_new_tokens, list(stop))
            for i, answer in zip(indices, answers):
                text[i] = answer
        return pa.table({"request_id": batch["request_id"], "logp": pa.array(logp, pa.float64()),
                         "text": pa.array(text, pa.string())})


# ---- tasks: raw rows -> items and requests ----

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
    from pipeline.sources import answer_index, multiple_choice_fields

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
STRICT_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_ANSWER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(text: str) -> str:
    """As lm-evaluation-harness's gsm8k filters do: commas, dollar signs and a trailing period removed."""
    text = text.strip().replace(",", "").replace("$", "")
    return text[:-1] if text.endswith(".") else text


def strict_answer(text: str) -> str | None:
    """The number after '#### ', the answer format GSM8K solutions end with."""
    match = STRICT_ANSWER.search(text)
    return normalize_number(match.group(1)) if match else None


def flexible_answer(text: str) -> str | None:
    """The last number anywhere in the answer."""
    matches = FLEXIBLE_ANSWER.findall(text)
    if not matches:
        return None
    return normalize_number(next(group for group in matches[-1] if group))


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
                           "requests": [requests.loglik(row["prompt_ids"], row["chosen_ids"]),
                                        requests.loglik(row["prompt_ids"], row["rejected_ids"])]})


def read_records(source) -> tuple[list[tuple[str, dict]], Counter, dict]:
    """An eval source's rows in file order (few-shot examples are its first rows), with read drops counted."""
    import ray

    from pipeline.pairs import read_source

    context = ray.data.DataContext.get_current()
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        spec = {"path": source.path, "subset": source.subset, "split": source.split,
                "limit": source.limit + source.num_fewshot if source.limit and source.task == "gsm8k" else source.limit}
        raw = read_source(spec).take_all()
    finally:
        context.execution_options.preserve_order = preserve
    records, dropped, examples = [], Counter(), {}
    for r in raw:
        try:
            if r["read_error"]:
                raise Drop(*r["read_error"].split(": ", 1))
            try:
                row = json.loads(r["record"])
            except json.JSONDecodeError as e:
                raise Drop("malformed_row", f"{e}: {r['record'][:200]}") from None
            if not isinstance(row, dict):
                raise Drop("malformed_row", f"not a JSON object: {r['record'][:200]}")
        except Drop as drop:
            dropped[drop.reason] += 1
            examples.setdefault(drop.reason, f"{r['origin']}: {drop.detail}"[:300])
            continue
        records.append((r["origin"], row))
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
              + (f", dropped {dict(task.dropped)}" if task.dropped else ""), flush=True)
        if not task.items:
            raise ValueError(f"eval: task {task.name} has no item to evaluate (read {task.rows_in}, dropped "
                             f"{dict(task.dropped)}; e.g. {next(iter(task.drop_examples.values()), '')})")
    return tasks, requests


# ---- metrics: answers -> numbers ----

def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def pair_metrics(items: list[dict], answers: dict | None, beta: float | None) -> dict:
    """Held-out pair metrics of one model. `answers` None: the reference itself (its log-probs are on storage)."""
    ref = [item["ref"] for item in items]
    if answers is None:
        return {"acc": _mean(c > r for c, r in ref), "logps/chosen": _mean(c for c, _ in ref),
                "logps/rejected": _mean(r for _, r in ref)}
    policy = [(answers[item["requests"][0]]["logp"], answers[item["requests"][1]]["logp"]) for item in items]
    chosen_change = [pc - rc for (pc, _), (rc, _) in zip(policy, ref)]
    rejected_change = [pr - rr for (_, pr), (_, rr) in zip(policy, ref)]
    margins = [beta * (c - r) for c, r in zip(chosen_change, rejected_change)]
    return {
        "acc": _mean(c > r for c, r in policy),
        "rewards/accuracies": _mean(m > 0 for m in margins),
        "rewards/margins": _mean(margins),
        "logps/chosen": _mean(c for c, _ in policy),
        "logps/rejected": _mean(r for _, r in policy),
        "logps/chosen_change": _mean(chosen_change),
        "logps/rejected_change": _mean(rejected_change),
        "logps/chosen_below_reference": _mean(c < -BELOW_REFERENCE_NATS for c in chosen_change),
    }


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as numpy's


def multiple_choice_metrics(items: list[dict], answers: dict) -> dict:
    acc, acc_norm = [], []
    for item in items:
        lls = [answers[r]["logp"] for r in item["requests"]]
        acc.append(_argmax(lls) == item["gold"])
        acc_norm.append(_argmax([ll / n for ll, n in zip(lls, item["choice_chars"])]) == item["gold"])
    return {"acc": _mean(acc), "acc_norm": _mean(acc_norm)}


def gsm8k_metrics(items: list[dict], answers: dict) -> tuple[dict, list[dict]]:
    samples = []
    for item in items:
        text = answers[item["requests"][0]]["text"]
        strict, flexible = strict_answer(text), flexible_answer(text)
        samples.append({"origin": item["origin"], "question": item["question"], "target": item["target"],
                        "answer": text, "strict": strict, "flexible": flexible})
    return {"exact_match": _mean(s["strict"] == s["target"] for s in samples),
            "exact_match_flexible": _mean(s["flexible"] == s["target"] for s in samples)}, samples


# ---- the stage ----

@dataclass
class Model:
    name: str
    """`reference`, `train`, or a trial's folder name."""
    path: str
    beta: float | None = None
    dpop_lambda: float | None = None


def models_to_evaluate(cfg: Config, stage) -> tuple[list[Model], list[dict]]:
    """The reference, then each policy eval.policies names; trials without a final model (stopped early, failed)
    are listed as skipped."""
    models = [Model("reference", cfg.model.name_or_path)]
    skipped = []
    if "train" in stage.inputs:
        models.append(Model("train", stage.manifests["train"]["model"], cfg.train.beta, cfg.train.dpop_lambda))
    if "tune" in stage.inputs:
        trials = storage.read_parquet(storage.join(stage.inputs["tune"], "trials.parquet"))
        for trial in sorted(trials.to_pylist(), key=lambda t: (t["dpop_lambda"], t["beta"], t["trial_id"])):
            if trial["model"]:
                models.append(Model(trial["model"].rstrip("/").split("/")[-2], trial["model"], trial["beta"],
                                    trial["dpop_lambda"]))
            else:
                skipped.append({"trial_id": trial["trial_id"], "beta": trial["beta"],
                                "dpop_lambda": trial["dpop_lambda"], "status": trial["status"]})
    return models, skipped


def answer_requests(cfg: Config, model: Model, table: pa.Table) -> dict[int, dict]:
    """One actor pool of `model`'s engine answers `table`; returns request_id -> {logp, text}."""
    import ray

    from pipeline.reference import engine_actor

    # Longest first: the hf backend pads each micro-batch to its longest sequence, and a long tail last would
    # keep one actor busy alone.
    lengths = pa.compute.add(pa.compute.list_value_length(table["prompt_ids"]),
                             pa.compute.list_value_length(table["completion_ids"]))
    table = table.take(pa.compute.array_sort_indices(lengths, order="descending"))
    ds = ray.data.from_arrow(table).repartition(target_num_rows_per_block=cfg.eval.batch_size)
    answered = ds.map_batches(EvalScorer, batch_size=cfg.eval.batch_size,
                              **engine_actor(cfg, model.path, cfg.eval.max_length,
                                             cfg.eval.backend or cfg.reference.backend))
    return {row["request_id"]: row for row in answered.take_all()}


def results_table(rows: list[dict], models: list[Model]) -> str:
    """Markdown: one row per task and metric, one column per model."""
    names = [m.name for m in models]
    header = "| task | metric | n | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (3 + len(names))]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    keys = sorted(dict.fromkeys((r["task"], r["metric"], r["kind"]) for r in rows),
                  key=lambda k: (tasks.index(k[0]), TASK_METRICS[k[2]].index(k[1])))
    keys = [(task, metric) for task, metric, _ in keys]
    for task, metric in keys:
        cells = {r["model"]: r for r in rows if (r["task"], r["metric"]) == (task, metric)}
        n = next(iter(cells.values()))["n"]
        lines.append(f"| {task} | {metric} | {n} | " + " | ".join(
            f"{cells[name]['value']:.4g}" if name in cells else "" for name in names) + " |")
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict], models: list[Model], path: str) -> None:
    """One panel per task's headline metric, a bar per model: the picture of 'did it get better'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = {"pairs": "logps/chosen_change", "multiple_choice": "acc_norm", "gsm8k": "exact_match"}
    panels = list(dict.fromkeys((r["task"], r["kind"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (task, kind) in zip(axes[0], panels):
        metric = headline[kind]
        values = {r["model"]: r["value"] for r in rows if r["task"] == task and r["metric"] == metric}
        names = [m.name for m in models if m.name in values]
        ax.bar(range(len(names)), [values[n] for n in names],
               color=["gray" if n == "reference" else f"C{i}" for i, n in enumerate(names)])
        ax.set_xticks(range(len(names)), [_short(m) for m in models if m.name in values], rotation=20, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{task}: {metric}")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _short(model: Model) -> str:
    if model.beta is None:
        return model.name
    # A trial's folder name starts with its β; "train" has no '-' and stays whole.
    return f"{model.name.split('-')[0]}\nβ={model.beta:g} λ={model.dpop_lambda:g}"


def select_trial(rows: list[dict], models: list[Model], select_by: str, mode: str) -> dict | None:
    """The trial with the best `select_by` (task/metric) result."""
    task, _, metric = select_by.partition("/")
    trials = {m.name: m for m in models if m.name not in ("reference", "train")}
    scored = [r for r in rows if r["task"] == task and r["metric"] == metric and r["model"] in trials]
    if not scored:
        return None
    best = (max if mode == "max" else min)(scored, key=lambda r: r["value"])
    model = trials[best["model"]]
    return {"trial": model.name, "beta": model.beta, "dpop_lambda": model.dpop_lambda, "model": model.path,
            "select_by": select_by, "mode": mode, "value": best["value"], "n": best["n"]}


def evaluate_policies(cfg: Config, stage) -> dict:
    from pipeline.pairs import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.trust_remote_code)
    tasks, requests = build_tasks(cfg, stage.inputs["reference"], tokenizer)
    models, skipped = models_to_evaluate(cfg, stage)
    if len(models) == 1:
        raise ValueError("eval: no policy to evaluate: " + (f"no trial of tune finished with a model ({skipped})"
                                                            if skipped else "eval.policies found no model"))
    pair_request_ids = {r for t in tasks if t.kind == "pairs" for item in t.items for r in item["requests"]}
    rows, samples = [], []
    for model in models:
        # The reference's pair log-probs are on storage already: it answers only the benchmark requests.
        table = requests.table(None if model.name != "reference" else
                               {r["request_id"] for r in requests.rows} - pair_request_ids)
        print(f"[dpop] eval: {model.name}: {table.num_rows} requests ({model.path})", flush=True)
        answers = answer_requests(cfg, model, table) if table.num_rows else {}
        for task in tasks:
            if task.kind == "pairs":
                metrics = pair_metrics(task.items, None if model.name == "reference" else answers, model.beta)
            elif task.kind == "multiple_choice":
                metrics = multiple_choice_metrics(task.items, answers)
            else:
                metrics, generated = gsm8k_metrics(task.items, answers)
                samples += [{"model": model.name, "task": task.name, **s} for s in generated]
            for metric, value in metrics.items():
                if not math.isfinite(value):
                    raise ValueError(f"eval: {model.name} {task.name} {metric} is {value}")
                rows.append({"model": model.name, "task": task.name, "kind": task.kind, "metric": metric,
                             "value": value, "n": len(task.items)})
        shown = ", ".join(f"{r['task']}/{r['metric']} {r['value']:.4g}" for r in rows if r["model"] == model.name
                          and r["metric"] in ("acc_norm", "exact_match", "logps/chosen_change", "acc"))
        print(f"[dpop] eval: {model.name}: {shown}", flush=True)

    best = select_trial(rows, models, cfg.eval.select_by, cfg.eval.select_mode) if cfg.eval.select_by else None
    results = [{k: r[k] for k in ("model", "task", "metric", "value", "n")} for r in rows]
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(folder, "results.md"), "w") as f:
            f.write(results_table(rows, models))
        plot_results(rows, models, os.path.join(folder, "eval.png"))
        names = ["results.json", "results.md", "eval.png"]
        if samples:
            pq.write_table(pa.Table.from_pylist(samples), os.path.join(folder, "generations.parquet"))
            names.append("generations.parquet")
        if best:
            with open(os.path.join(folder, "best.json"), "w") as f:
                json.dump(best, f, indent=1)
            names.append("best.json")
        for name in names:
            storage.upload_file(os.path.join(folder, name), storage.join(stage.out, name))
    print(results_table(rows, models), flush=True)
    from pipeline.report import dpo_against_dpop

    for line in dpo_against_dpop(results, [vars(m) for m in models]):
        print(f"[dpop] eval: {line[2:]}", flush=True)
    if best:
        print(f"[dpop] eval: best trial by {best['select_by']}: {best['trial']} ({best['value']:.4g})", flush=True)

    rows_in = sum(t.rows_in for t in tasks)
    rows_out = sum(len(t.items) for t in tasks)
    dropped = sum((t.dropped for t in tasks), Counter())
    assert rows_in == rows_out + dropped.total()
    return {
        "rows": rows_out, "rows_in": rows_in, "rows_out": rows_out, "rows_dropped": dropped.total(),
        "dropped": dict(dropped),
        "tasks": {t.name: {"kind": t.kind, "items": len(t.items), "rows_in": t.rows_in, "dropped": dict(t.dropped),
                           "drop_examples": t.drop_examples} for t in tasks},
        "models": [vars(m) for m in models],
        "skipped_trials": skipped,
        "results": storage.join(stage.out, "results.json"),
        "best": best,
    }
