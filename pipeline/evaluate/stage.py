"""The eval stage's driver: the models to score, one actor pool per model answering the requests, results on
storage."""
import json
import math
from collections import Counter

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from pipeline import plots, storage
from pipeline.config import Config, below_reference_nats_per_token
from pipeline.engines import EngineActor, engine_actor
from pipeline.evaluate.metrics import (Model, gsm8k_metrics, method_comparison, multiple_choice_metrics,
                                       pair_metrics, results_table, select_trial)
from pipeline.evaluate.tasks import build_tasks
from pipeline.pairs import load_tokenizer
from pipeline.vocab import METHOD_KEYS, Stage


class EvalScorer(EngineActor):
    """Ray Data actor: answers a batch of requests with its engine: `logp` for log-likelihood requests (summed
    over the completion), `text` for generation requests."""

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
            for i, (answer,) in zip(indices, answers):  # one greedy answer each
                text[i] = answer
        return pa.table({"request_id": batch["request_id"], "logp": pa.array(logp, pa.float64()),
                         "text": pa.array(text, pa.string())})


def models_to_evaluate(cfg: Config, stage) -> tuple[list[Model], list[dict]]:
    """The reference (unless eval.reference is off), then each policy eval.policies names; trials without a final
    model (stopped early, failed) are listed as skipped."""
    models = [Model("reference", cfg.model.name_or_path)] if cfg.eval.reference else []
    skipped = []
    if Stage.TRAIN in stage.inputs:
        models.append(Model("train", stage.manifests[Stage.TRAIN]["model"],
                            {key: getattr(cfg.train, key) for key in METHOD_KEYS}))
    if Stage.TUNE in stage.inputs:
        trials = storage.read_parquet(storage.join(stage.inputs[Stage.TUNE], "trials.parquet"))
        for trial in sorted(trials.to_pylist(), key=lambda t: [t[key] for key in METHOD_KEYS] + [t["trial_id"]]):
            params = {key: trial[key] for key in METHOD_KEYS}
            if trial["model"]:
                models.append(Model(trial["model"].rstrip("/").split("/")[-2], trial["model"], params))
            else:
                skipped.append({"trial_id": trial["trial_id"], **params, "status": trial["status"]})
    return models, skipped


def answer_requests(cfg: Config, model: Model, table: pa.Table) -> dict[int, dict]:
    """One actor pool of `model`'s engine answers `table`; returns request_id -> {logp, text}."""
    import ray

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


def evaluate_policies(cfg: Config, stage) -> dict:
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.trust_remote_code)
    tasks, requests = build_tasks(cfg, stage.inputs[Stage.REFERENCE], tokenizer)
    models, skipped = models_to_evaluate(cfg, stage)
    if all(model.params is None for model in models):
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
                metrics = pair_metrics(task.items, None if model.params is None else answers,
                                       model.params and model.params["beta"],
                                       below_reference_nats_per_token(cfg))
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
    storage.write_text(storage.join(stage.out, "results.json"), json.dumps(results, indent=1))
    storage.write_text(storage.join(stage.out, "results.md"), results_table(rows, models))
    plots.eval_results(rows, models, plots.run_methods(cfg), storage.join(stage.out, "eval.png"))
    if samples:
        storage.write_parquet(pa.Table.from_pylist(samples), storage.join(stage.out, "generations.parquet"))
    if best:
        storage.write_text(storage.join(stage.out, "best.json"), json.dumps(best, indent=1))
    print(results_table(rows, models), flush=True)
    comparison = method_comparison(results, [vars(m) for m in models])
    if comparison:
        header, table = comparison
        for label, *values in table:
            shown = ", ".join(f"{name} {value:.4g}" for name, value in zip(header[1:], values) if value is not None)
            print(f"[dpop] eval: {label}: {shown}", flush=True)
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
