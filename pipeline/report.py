"""`dpop report CONFIG`: one `report.md` beside the stages, with its PNGs in `report/`, rebuilt from what is on
storage alone (manifests, metrics.jsonl, trials.parquet, eval results), so it can be made at any time, from any
machine, for a run on `s3://` too. `dpop run` writes it at its end.
"""
import functools
import os
import tempfile
from datetime import datetime, timezone

from pipeline import plots, storage
from pipeline.config import Config, online_methods
from pipeline.evaluate.metrics import method_comparison
from pipeline.runner import stage_states
from pipeline.train.metrics import read_metrics
from pipeline.vocab import METHOD_KEYS, METHOD_SYMBOLS, Stage, method_label, method_name, varying_keys


def _table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value).replace("|", "/")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class Report:
    """Collects markdown and figures; `save` uploads them beside the stages."""

    def __init__(self, run_uri: str, folder: str):
        self.run_uri, self.folder = run_uri, folder
        self.lines: list[str] = []
        self.figures: list[str] = []

    def add(self, text: str) -> None:
        self.lines.append(text)

    def figure(self, name: str, caption: str) -> str:
        """A local path to draw `name` into; the markdown links it from report/."""
        self.figures.append(name)
        self.add(f"![{caption}](report/{name})\n")
        return os.path.join(self.folder, name)

    def copy_figure(self, uri: str, name: str, caption: str) -> None:
        """A PNG a stage already drew, copied next to the report."""
        if storage.exists(uri):
            fs, path = storage.resolve(uri)
            with fs.open_input_stream(path) as src, open(self.figure(name, caption), "wb") as dst:
                dst.write(src.read())

    def save(self) -> str:
        for name in self.figures:
            storage.upload_file(os.path.join(self.folder, name), storage.join(self.run_uri, "report", name))
        uri = storage.join(self.run_uri, "report.md")
        storage.write_text(uri, "\n".join(self.lines))
        return uri


def _pairs_section(report: Report, manifest: dict, pairs_uri: str) -> None:
    report.add("## Pairs\n")
    report.add(f"{manifest['records_in']} records read, {manifest['rows']} pairs kept "
               f"({', '.join(f'{k} {v}' for k, v in manifest['splits'].items())}), {manifest['rows_dropped']} "
               f"dropped{' (' + ', '.join(f'{k} {v}' for k, v in manifest['dropped'].items()) + ')' if manifest['dropped'] else ''}.\n")
    sources = manifest["sources"]
    report.add(_table(["source", "records", "train", "eval", "dropped"],
                      [[name, s["records_in"], s["train"], s["eval"],
                        ", ".join(f"{k} {v}" for k, v in s["dropped"].items())] for name, s in sorted(sources.items())]))
    plots.pair_counts(sources, report.figure("pair_counts.png", "pairs kept and dropped per source"))
    examples = manifest.get("drop_examples") or {}
    if examples:
        report.add("Drop examples:\n")
        report.add("\n".join(f"- `{reason}`: {e[0]['source']}: {e[0]['detail'][:160]}" for reason, e in examples.items())
                   + "\n")
    quantiles = manifest.get("edit_distance", {}).get("by_source", {})
    report.add("Token edit distance between chosen and rejected (low distances are where plain DPO lowers the "
               "chosen likelihood too):\n")
    report.add(_table(["source", "split", "pairs", "p10", "median", "p90", "max"],
                      [[src, split, q["count"], q["p10"], q["p50"], q["p90"], q["max"]]
                       for src, splits in sorted(quantiles.items()) for split, q in sorted(splits.items())]))
    report.copy_figure(storage.join(pairs_uri, "_edit_distance.png"), "edit_distance.png", "edit-distance histogram")


def _reference_section(report: Report, manifest: dict, reference_uri: str) -> None:
    report.add("## Reference log-probs\n")
    config = manifest["config"]["reference"]
    report.add(f"Backend {manifest['backend']}, {config['dtype']}; {manifest['rows']} pairs scored"
               + (f", {manifest['rows_dropped']} dropped ({manifest['dropped']})" if manifest['rows_dropped'] else "")
               + (f"; resumed: {manifest['resumed']}" if manifest.get("resumed") else "") + ".\n")
    means = manifest.get("mean_logps_by_split") or {}
    report.add(_table(["split", "mean ref log p(chosen)", "mean ref log p(rejected)"],
                      [[split, m["ref_chosen_logp"], m["ref_rejected_logp"]] for split, m in sorted(means.items())]))


CURVE_KEYS = ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected", "dpop/penalty_active")


def _train_section(report: Report, manifest: dict, train_uri: str) -> None:
    report.add("## Training\n")
    config = manifest["config"]["train"]
    varying = [key for key in METHOD_KEYS if key != "learning_rate" and config.get(key)]  # the non-zero ones
    report.add(f"{method_label(config, varying)}, {manifest['steps']} steps of "
               f"{config['batch_size']} pairs, learning rate {config['learning_rate']:g}; {manifest['rows']} train "
               f"pairs, {manifest['eval_rows']} eval pairs"
               + (f"; resumed from step {manifest['resumed_from_step']}" if manifest.get("resumed_from_step") else "")
               + ".\n")
    for warning in manifest.get("warnings") or []:
        report.add(f"> **Warning:** {warning}\n")
    final = manifest["final_metrics"]
    report.add(_table(["metric", "train (last step)", "eval (last evaluation)"],
                      [[key, final.get(key), final.get(f"eval/{key}")] for key in CURVE_KEYS]))
    rows = read_metrics(train_uri)
    if rows:
        plots.training_curves(rows, report.figure("train_curves.png", "training curves"))


def _tune_section(report: Report, manifest: dict, tune_uri: str) -> None:
    report.add("## Sweep\n")
    trials = storage.read_parquet(storage.join(tune_uri, "trials.parquet")).to_pylist()
    metric = trials[0]["metric"] if trials else ""
    report.add(f"{len(trials)} trials ({', '.join(f'{k} {v}' for k, v in manifest['trials'].items() if v)}), ranked "
               f"by {metric}; {manifest['sweep_seconds']:.0f} s.\n")
    # The ranking metric first, then what the paper watches; a metric that is both is shown once.
    shown = [m for m in ("logps/chosen", "eval/logps/chosen", "eval/rewards/accuracies") if m != metric]
    varying = varying_keys(trials) or ["beta", "dpop_lambda"]
    report.add(_table(["method", *(METHOD_SYMBOLS.get(key, key) for key in varying), "status", "steps", metric,
                       *shown],
                      [[method_name(t), *(t[key] for key in varying), t["status"], t["steps"], t["final_metric"],
                        *(t.get(m) for m in shown)]
                       for t in sorted(trials, key=lambda t: [t[key] for key in METHOD_KEYS])]))
    best = manifest.get("best")
    if best:
        report.add(f"Best by {best['metric']}: {method_label(best, varying)} ({best['value']:.4g}).\n")
    report.copy_figure(storage.join(tune_uri, "heatmap.png"), "tune_heatmap.png", "sweep heatmap")
    report.copy_figure(storage.join(tune_uri, "logps_chosen.png"), "tune_logps_chosen.png",
                       "log p(chosen) against the reference, per trial")


def _eval_section(report: Report, manifest: dict, eval_uri: str, methods: list) -> None:
    """`methods`: plots.run_methods, so each method has the colour it has in the run's other figures."""
    import json

    report.add("## Evaluation: policy against reference\n")
    results = json.loads(storage.read_text(storage.join(eval_uri, "results.json")))
    tasks = manifest["tasks"]
    report.add(_table(["task", "kind", "items", "dropped"],
                      [[name, t["kind"], t["items"], ", ".join(f"{k} {v}" for k, v in t["dropped"].items())]
                       for name, t in tasks.items()]))
    report.add(storage.read_text(storage.join(eval_uri, "results.md")))
    models = manifest["models"]
    varying = varying_keys([m["params"] for m in models if m.get("params")])
    report.add("Models: " + "; ".join(f"`{m['name']}`" + (f" {method_label(m['params'], varying)}"
                                                          if m.get("params") else "") for m in models) + ".\n")
    comparison = method_comparison(results, models)
    if comparison:
        report.add("### Methods compared\n")
        report.add("`logps/chosen_change` is the change in log p(chosen) against the reference on held-out pairs, and "
                   "`logps/chosen_below_reference` the share of pairs whose chosen log-prob fell below it: Smaug's "
                   "finding is that DPO lowers it on low-edit-distance pairs and DPOP does not.\n")
        report.add(_table(*comparison))
        trained = [m for m in models if m.get("params")]
        # Each policy's training curve is the metrics.jsonl beside its model/ folder (train/ or a trial's folder).
        curves = {m["name"]: read_metrics(m["path"].rstrip("/").rsplit("/", 1)[0]) for m in trained}
        if any(curves.values()):  # (a policy whose folder a later run replaced has none)
            plots.logps_chosen_curves(trained, curves, methods,
                                      report.figure("methods_logps_chosen.png", "log p(chosen) against the reference per step, each method"))
    if manifest.get("best"):
        best = manifest["best"]
        report.add(f"Best trial by {best['select_by']}: `{best['trial']}` ({best['value']:.4g}).\n")
    report.copy_figure(storage.join(eval_uri, "eval.png"), "eval.png", "eval results per model")


def write_report(cfg: Config) -> str:
    """Build report.md and its figures from storage; returns its URI."""
    run_uri = storage.join(cfg.run.storage, cfg.run.name)
    states = stage_states(cfg)
    with tempfile.TemporaryDirectory() as folder:
        report = Report(run_uri, folder)
        report.add(f"# Run report: {cfg.run.name}\n")
        report.add(f"Built {datetime.now(timezone.utc).isoformat(timespec='seconds')} from `{run_uri}` "
                   f"(`dpop report CONFIG` rebuilds it).\n")
        report.add(_table(["stage", "state", "rows", "seconds", "finished", "reads"],
                          [[s["stage"], s["state"] + (f" ({s['why']})" if s["why"] else ""), s["rows"],
                            (s["manifest"] or {}).get("seconds"), (s["manifest"] or {}).get("finished_at"),
                            ", ".join(s["reads"])] for s in states]))
        sections = {Stage.PAIRS: _pairs_section, Stage.REFERENCE: _reference_section, Stage.TRAIN: _train_section,
                    Stage.TUNE: _tune_section,
                    Stage.EVAL: functools.partial(_eval_section, methods=plots.run_methods(cfg))}
        for state in states:
            manifest = state["manifest"]
            if state["state"] == "failed":
                report.add(f"## {state['stage']}: failed\n\n{state['why']}\n")
            elif manifest and state["stage"] in sections:  # an online round's stages: in their own section
                sections[state["stage"]](report, manifest, state["path"])
        if cfg.online is not None:
            _online_section(report, cfg, {state["stage"]: state for state in states})
        return report.save()


def starting_exact_match(rows: list[dict]) -> str:
    """The starting model's exact match on each benchmark, from the online section's round-0 rows."""
    return ", ".join(sorted({f"{r['task']} exact match {r['exact_match']:.4g}" for r in rows if r["round"] == 0})) \
        or "not evaluated"


def _online_section(report: Report, cfg: Config, states: dict[str, dict]) -> None:
    """Per method and round: exact match on each benchmark, the share of problems that gave a pair, pairs kept,
    generation throughput, and log p(chosen) against the round's reference over the rounds' training."""
    import json

    report.add("## Online rounds\n")
    rows, table, curves, methods, start = [], [], {}, [], {}
    for folder, changes in online_methods(cfg):
        name = folder or "train"
        params = {key: changes.get(f"train.{key}", getattr(cfg.train, key)) for key in METHOD_KEYS}
        methods.append({"name": name, "params": params})
        curves[name], offset = [], 0
        for r in range(1, cfg.online.rounds + 1):
            prefix = f"{folder}/round{r}" if folder else f"round{r}"
            shared = "round1" if r == 1 else prefix  # round 1's samples and pairs are every method's
            manifest = lambda kind: (states.get(f"{prefix}/{kind}") or states.get(f"{shared}/{kind}") or {}) \
                .get("manifest") or {}
            results_text = storage.read_text(storage.join(states.get(f"{prefix}/eval", {}).get("path", ""),
                                                          "results.json")) if f"{prefix}/eval" in states else None
            exact = {}
            for result in json.loads(results_text or "[]"):
                if result["metric"] != "exact_match":
                    continue
                if result["model"] == "train":
                    rows.append({"method": name, "round": r, "task": result["task"], "exact_match": result["value"]})
                    exact[result["task"]] = result["value"]
                else:  # the starting model, scored by the first method's round-1 eval (eval.reference)
                    start[result["task"]] = result["value"]
            pairs, generate = manifest(Stage.PAIRS), manifest("generate")
            train_uri = states.get(f"{prefix}/{Stage.TRAIN}", {}).get("path")
            metrics = [m for m in read_metrics(train_uri) if "rewards/chosen" in m] if train_uri and \
                states[f"{prefix}/{Stage.TRAIN}"]["manifest"] else []
            curves[name] += [(offset + m["step"], m["rewards/chosen"] / params["beta"]) for m in metrics]
            offset += metrics[-1]["step"] if metrics else 0
            table.append({"method": name, "round": r, "exact": exact, "usable": pairs.get("usable_share"),
                          "pairs": pairs.get("rows"), "tokens_per_second": generate.get("tokens_per_second"),
                          "chosen": curves[name][-1][1] if metrics else None})
    # Every method's line starts at the starting model: round 0.
    rows = [{"method": m["name"], "round": 0, "task": task, "exact_match": value} for m in methods
            for task, value in start.items()] + rows
    tasks = sorted({x["task"] for x in rows})
    labels = {m["name"]: method_label(m["params"], varying_keys([x["params"] for x in methods])) for m in methods}
    text = _table(["method", "round", *(f"{task} exact match" for task in tasks), "problems with a pair",
                   "pairs kept", "generated tokens/s", "last step: log p(chosen) − reference"],
                  [[labels[t["method"]], t["round"], *(t["exact"].get(task) for task in tasks), t["usable"],
                    t["pairs"], t["tokens_per_second"], t["chosen"]] for t in table])
    report.add(text)
    print(f"[dpop] online rounds (round 0 is the start: {starting_exact_match(rows)}):\n{text}", flush=True)
    if rows or any(curves.values()):
        plots.online_rounds(rows, curves, methods, report.figure("online_rounds.png", "online rounds per method"))
