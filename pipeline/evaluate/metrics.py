"""Answers -> numbers: each task kind's metrics for one model, the results table, the best trial, and the
comparison of the methods evaluated that the stage prints and the report shows."""
from dataclasses import dataclass

from pipeline.answers import flexible_answer, strict_answer
from pipeline.vocab import TASK_METRICS, method_label, varying_keys


@dataclass
class Model:
    name: str
    """`reference`, `train`, or a trial's folder name."""
    path: str
    params: dict | None = None
    """The method that trained it (vocab.METHOD_KEYS: loss type, λ, β, ε, α, learning rate); None: the reference."""


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def pair_metrics(items: list[dict], answers: dict | None, beta: float | None,
                 below_reference_per_token: float) -> dict:
    """Held-out pair metrics of one model. `answers` None: the reference itself (its log-probs are on storage).
    A chosen log-prob counts as below the reference beyond `below_reference_per_token` nats per chosen token
    (config.below_reference_nats_per_token)."""
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
        "logps/chosen_below_reference": _mean(change < -below_reference_per_token * item["chosen_tokens"]
                                               for change, item in zip(chosen_change, items)),
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


def select_trial(rows: list[dict], models: list[Model], select_by: str, mode: str) -> dict | None:
    """The trial with the best `select_by` (task/metric) result."""
    task, _, metric = select_by.partition("/")
    trials = {m.name: m for m in models if m.name not in ("reference", "train")}
    scored = [r for r in rows if r["task"] == task and r["metric"] == metric and r["model"] in trials]
    if not scored:
        return None
    best = (max if mode == "max" else min)(scored, key=lambda r: r["value"])
    model = trials[best["model"]]
    return {"trial": model.name, **model.params, "model": model.path, "select_by": select_by, "mode": mode,
            "value": best["value"], "n": best["n"]}


# The columns of the method comparison: what each method did to the chosen completions, and the benchmarks.
COMPARED = ("logps/chosen_change", "logps/chosen_below_reference", "rewards/accuracies", "acc", "acc_norm",
            "exact_match")


def method_comparison(results: list[dict], models: list[dict]) -> tuple[list[str], list[list]] | None:
    """A table of every evaluated model (the reference first, then each method by its label) against the metrics
    users compare methods by (COMPARED): `header, rows`. None when fewer than two trained methods were evaluated."""
    trained = [m for m in models if m.get("params") is not None]
    if len(trained) < 2:
        return None
    varying = varying_keys([m["params"] for m in trained])
    columns = sorted(dict.fromkeys((r["task"], r["metric"]) for r in results if r["metric"] in COMPARED),
                     key=lambda column: COMPARED.index(column[1]))  # stable: tasks keep their order
    value = {(r["model"], r["task"], r["metric"]): r["value"] for r in results}
    header = ["model", *(f"{task} {metric}" for task, metric in columns)]
    rows = [[m["name"] if m.get("params") is None else method_label(m["params"], varying),
             *(value.get((m["name"], task, metric)) for task, metric in columns)] for m in models]
    return header, rows

