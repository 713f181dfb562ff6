"""`tune` stage (Ray Tune): sweep the method (loss type, β, λ, label smoothing, NLL weight α, learning rate), every
trial a distributed `TorchTrainer` on the one reference pass.

Reference log-probs depend on none of these, so every trial reads the reference stage's Parquet; nothing here
computes them. Each trial is a function trainable that fits its own TorchTrainer (`pipeline.train.make_trainer`)
and forwards its reports to Tune (`TuneReportCallback`), so ASHA can stop trials that trail. A trial that fails is
recorded with its error; the others go on. Rerunning an unfinished stage restores the Tune experiment: finished
trials are kept, unfinished ones resume from their checkpoints.

Outputs in tune/: trials.parquet (one row a trial), best.json, heatmap.png (the metric over β and the rest of each
method), logps_chosen.png (log p(chosen) against the reference over steps, every trial), trials/beta_<β>-lambda_<λ>[-loss_<type>]
[-ls_<ε>][-nll_<α>][-lr_<rate>]-<trial id>/ (each trial's train outputs: metrics.jsonl, checkpoints, model/; the
bracketed parts where the sweep varies them).
"""
import math
import os
import time

import pyarrow as pa

from pipeline import plots, storage
from pipeline.config import Config, sweep_methods, tune_grid
from pipeline.tracking import end_killed_run, run_params
from pipeline.train.data import load_pairs
from pipeline.train.metrics import read_metrics
from pipeline.train.stage import make_trainer
from pipeline.vocab import METHOD_KEYS, Stage, method_label, method_name, one_line, varying_keys

TRIAL_DRIVER_CPUS = 0.1  # a trial's own process only waits on its TorchTrainer; its workers hold the real CPUs


FOLDER_PARTS = {"loss_type": "loss", "label_smoothing": "ls", "nll_weight": "nll", "learning_rate": "lr"}


def trial_folder(params: dict, trial_id: str, varying: list[str]) -> str:
    """Readable and unique: β and λ, each other method key the sweep varies (`varying`), and Tune's trial id, which
    tells repeats of the grid (num_samples) or of a random draw apart."""
    extra = "".join(f"-{part}_{params[key]:g}" if key != "loss_type" else f"-{part}_{params[key]}"
                    for key, part in FOLDER_PARTS.items() if key in varying)
    return f"beta_{params['beta']:g}-lambda_{params['dpop_lambda']:g}{extra}-{trial_id}"


def trial_params(config: dict) -> dict:
    """A trial's METHOD_KEYS from its Tune config: the grid's values, overridden by its tune.methods item."""
    return {key: config.get("method", {}).get(key, config[key]) for key in METHOD_KEYS}


def trial_dir(cfg: Config, out: str, config: dict, trial_id: str) -> str:
    """Where a trial writes: tune/trials/<trial_folder>, from its Tune config."""
    varying = varying_keys(sweep_methods(cfg))
    return storage.join(out, "trials", trial_folder(trial_params(config), trial_id, varying))


def run_trial(params: dict, cfg: Config, out: str, reference_fingerprint: str, pairs: dict) -> None:
    """One Tune trial: the train stage's TorchTrainer with this trial's method (`params`: METHOD_KEYS), reporting to
    Tune.
    `pairs` are the reference pairs' object refs (pipeline.train.data.load_pairs), read once by the sweep and shared
    by every trial."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_out = trial_dir(cfg, out, params, tune.get_context().get_trial_id())
    method = trial_params(params)
    cfg = cfg.copy_with({f"train.{key}": method[key] for key in METHOD_KEYS})
    tracking = {"name": f"{cfg.run.name}/{trial_out.rsplit('/', 1)[-1]}",
                "params": run_params(cfg, reference_fingerprint)}
    result = make_trainer(cfg, trial_out, "ray-train", pairs, tracking, callbacks=[TuneReportCallback()],
                          report_metric=cfg.tune.metric).fit()
    if result.error:
        raise result.error


def release_stopped_trial_resources(cfg: Config, out: str):
    """A Tune callback that frees the train workers' placement group of a trial that has ended, and ends its
    tracked MLflow run if the trial's workers could not (KILLED when ASHA stopped it, FAILED when it failed).

    A trial's TorchTrainer creates its workers' placement group from the Train controller, an actor the trial owns;
    the group itself lives as long as the sweep's driver. When Tune ends the trial's actor (ASHA stopping it, or
    right after it finished) the group can outlive it, and its CPUs are lost to every later trial until the sweep
    hangs waiting for workers (seen here with Ray 2.60; ray-project/ray#54305). The workers report the group's id
    with their metrics (`placement_group`), so the callback removes exactly that one if it is still there.
    """
    from ray import tune
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    class ReleaseStoppedTrialResources(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release(trial)
            self._end_tracked_run(trial, "KILLED")  # a finished trial ended its run itself: only a stopped one

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release(trial)
            self._end_tracked_run(trial, "FAILED")

        def _end_tracked_run(self, trial, status: str):
            if cfg.run.trackers:
                end_killed_run(trial_dir(cfg, out, trial.config, trial.trial_id), status)

        def _release(self, trial):
            group_id = (trial.last_result or {}).get("placement_group")
            if not group_id:
                return
            group = PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))
            if placement_group_table(group).get("state") not in (None, "REMOVED"):
                remove_placement_group(group)

    return ReleaseStoppedTrialResources()


def _search(cfg: Config, param_space: dict):
    """The search algorithm, and the search space's entries: one per METHOD_KEYS (a key the sweep does not vary
    takes train's value)."""
    from ray import tune

    tc = cfg.tune
    space = tune.grid_search if tc.search == "grid" else tune.choice
    param_space.update({key: space(values) for key, values in tune_grid(cfg).items()})
    if tc.methods:
        param_space["method"] = space([m.model_dump(exclude_none=True) for m in tc.methods])
    if tc.search in ("grid", "random"):
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:
        raise ValueError("tune.search: optuna needs the optuna package (pip install optuna)") from e
    return OptunaSearch()


def _concurrency(cfg: Config) -> int:
    """Trials at once: as many as the cluster's CPUs (and GPUs) hold with every trial's workers, within the cap."""
    import ray

    t, resources = cfg.train, ray.cluster_resources()
    fits = math.floor(resources.get("CPU", 0) / (t.num_workers * t.cpus_per_worker + TRIAL_DRIVER_CPUS))
    if t.use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0) / t.num_workers))
    if fits < 1:
        raise ValueError(f"the cluster ({resources}) cannot hold one trial of {t.num_workers} train worker(s)")
    return min(fits, cfg.tune.max_concurrent_trials or fits)


def _latest_checkpoint(trial_out: str) -> str | None:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(storage.join(trial_out, "ray-train"))
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    steps = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.base_name.startswith("step_"))
    return storage.join(trial_out, "ray-train", steps[-1]) if steps else None


def trial_table(results, cfg: Config, out: str) -> tuple[list[dict], dict[str, list[dict]]]:
    """One row per trial (its method and METHOD_KEYS, status, error, final and best metric, paths) and each
    trial's metric rows, by trial id."""
    tc, max_steps = cfg.tune, cfg.train.max_steps
    rows, curves = [], {}
    for result in results:
        params = trial_params(result.config)
        trial_id = result.metrics["trial_id"]  # Tune sets it even for a trial that failed before reporting
        trial_out = trial_dir(cfg, out, result.config, trial_id)
        metrics = read_metrics(trial_out)
        curves[trial_id] = metrics
        final = metrics[-1] if metrics else {}
        values = [m[tc.metric] for m in metrics if tc.metric in m]
        model_step, kept = kept_value(metrics, tc.metric)
        if result.error:
            status = "failed"
        elif final.get("step", 0) >= max_steps or final.get("early_stopping/stopped"):
            status = "finished"  # all its steps, or ended by train.early_stopping with its best model saved
        else:
            status = "stopped_early"
        model = storage.join(trial_out, "model")
        rows.append({
            "trial_id": trial_id,
            "method": method_name(params),
            **params,
            "status": status,
            "error": one_line(result.error, limit=2000) if result.error else None,
            "steps": final.get("step", 0),
            "metric": tc.metric,
            "final_metric": values[-1] if values else None,
            "best_metric": (min(values) if tc.mode == "min" else max(values)) if values else None,
            "model_step": model_step,
            "kept_metric": kept,
            **{key: final.get(key) for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen",
                                               "logps/rejected", "dpop/penalty_active", "eval/loss",
                                               "eval/rewards/accuracies", "eval/rewards/margins",
                                               "eval/logps/chosen")},
            "out": trial_out,
            "checkpoint": _latest_checkpoint(trial_out),
            "model": model if status == "finished" and storage.exists(storage.join(model, "config.json")) else None,
        })
    return rows, curves


def kept_value(metrics: list[dict], metric: str) -> tuple[int | None, float | None]:
    """The step whose weights a trial's model/ holds, and `metric` there: with train.early_stopping the best
    evaluation's step (early_stopping/best_step), else the last row that carries the metric."""
    best_step = next((m["early_stopping/best_step"] for m in reversed(metrics)
                      if m.get("early_stopping/best_step") is not None), None)
    rows = [m for m in metrics if metric in m and best_step in (None, m["step"])]
    return (rows[-1]["step"], rows[-1][metric]) if rows else (best_step, None)


def best_trial(rows: list[dict], mode: str) -> dict | None:
    """The trial whose kept weights score best (kept_metric: the metric at the step its model/ holds) among those
    that did not fail. Ranking by the last value instead would, with early stopping, describe weights that were
    not saved."""
    scored = [r for r in rows if r["status"] != "failed" and r["kept_metric"] is not None]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r["kept_metric"])


def sweep(cfg: Config, stage) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    tc = cfg.tune
    # Early evaluation rows carry the metric, the steps between them do not; ASHA passes over those.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    param_space = {}
    search_alg = _search(cfg, param_space)
    scheduler = None
    if tc.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="step", max_t=cfg.train.max_steps,
                                  grace_period=min(tc.grace_period, cfg.train.max_steps), reduction_factor=2)
    concurrency = _concurrency(cfg)
    # The reference pass, read once and held in the object store for every trial: a trial's trainer starts no
    # read tasks, so when a trial ends mid-epoch no half-read pipeline keeps its CPUs.
    pairs, info = load_pairs(stage.inputs[Stage.REFERENCE], cfg.train)
    if tc.metric.startswith("eval/") and "eval" not in pairs:
        # Checked before any trial starts: otherwise every trial runs and the sweep ends with no winner.
        raise ValueError(f"tune.metric: {tc.metric!r} needs an eval split of at least train.num_workers = "
                         f"{cfg.train.num_workers} pairs, and the reference stage has {info['eval_rows']}; raise "
                         f"data.eval_fraction or rank by a train metric")
    print(f"[dpop] tune: {info['train_rows']} train / {info['eval_rows']} eval pairs from "
          f"{stage.inputs[Stage.REFERENCE]}, "
          f"shared by every trial", flush=True)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, cfg=cfg, out=stage.out,
                             reference_fingerprint=stage.manifests[Stage.REFERENCE]["fingerprint"], pairs=pairs),
        {"CPU": TRIAL_DRIVER_CPUS})
    experiment = storage.join(stage.out, f"ray-{stage.fingerprint}")
    if tune.Tuner.can_restore(experiment):
        print(f"[dpop] tune: resuming the sweep in {experiment}: finished trials are kept", flush=True)
        # A restored experiment keeps its RunConfig, and with it the callback that frees stopped trials' workers.
        tuner = tune.Tuner.restore(experiment, trainable=trainable, param_space=param_space,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=tc.metric, mode=tc.mode, search_alg=search_alg, scheduler=scheduler,
                                        num_samples=tc.num_samples, max_concurrent_trials=concurrency),
            # verbose=0: no trial tables on stdout; the workers' [dpop] lines show each step, ours each result.
            run_config=tune.RunConfig(name=f"ray-{stage.fingerprint}", storage_path=stage.out, verbose=0,
                                      callbacks=[release_stopped_trial_resources(cfg, stage.out)],
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
        )
    methods = sweep_methods(cfg)
    varying = varying_keys(methods)
    print(f"[dpop] tune: {len(methods)} method(s): {'; '.join(method_label(m, varying) for m in methods)} "
          f"({tc.search}, {tc.num_samples} sample(s)), up to "
          f"{concurrency} trial(s) at once, each with {cfg.train.num_workers} train worker(s)", flush=True)
    started = time.time()
    results = tuner.fit()
    seconds = round(time.time() - started, 1)

    rows, curves = trial_table(results, cfg, stage.out)
    best = best_trial(rows, tc.mode)
    storage.write_parquet(pa.Table.from_pylist(rows), storage.join(stage.out, "trials.parquet"))
    plots.sweep_heatmap(rows, tc.metric, tc.mode, storage.join(stage.out, "heatmap.png"))
    plots.logps_chosen_curves([{"name": r["trial_id"], "params": {key: r[key] for key in METHOD_KEYS}} for r in rows],
                              curves, plots.run_methods(cfg), storage.join(stage.out, "logps_chosen.png"))
    best_json = None
    if best:
        best_json = {"method": best["method"], **{key: best[key] for key in METHOD_KEYS},
                     "metric": tc.metric, "mode": tc.mode,
                     "value": best["kept_metric"], "model_step": best["model_step"], "trial_id": best["trial_id"],
                     "status": best["status"],
                     "model": best["model"], "checkpoint": best["checkpoint"],
                     "metrics": {k: v for k, v in best.items() if "/" in k or k == "loss"}}
        storage.write_json(storage.join(stage.out, "best.json"), best_json)
    statuses = {s: sum(r["status"] == s for r in rows) for s in ("finished", "stopped_early", "failed")}
    varying = varying_keys(rows) or ["beta", "dpop_lambda"]
    for r in sorted(rows, key=lambda r: [r[key] for key in METHOD_KEYS]):
        shown = "" if r["final_metric"] is None else f" {tc.metric} {r['final_metric']:.4g}"
        print(f"[dpop] tune: {method_label(r, varying)} {r['status']} at step {r['steps']}{shown}"
              + (f" ({r['error'][-200:]})" if r["error"] else ""), flush=True)
    if best_json:
        print(f"[dpop] tune: best {method_label(best, varying)} {tc.metric} {best['kept_metric']:.4g} "
              f"(its model/: step {best['model_step']})", flush=True)
    return {"rows": len(rows), "trials": statuses, "sweep_seconds": seconds, "max_concurrent_trials": concurrency,
            "best": best_json}
