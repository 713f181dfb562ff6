"""The train stage's driver: the reference pairs into the object store, one `TorchTrainer` (also each tune
trial's), the curves, and the manifest's fields."""
from pipeline import plots, storage
from pipeline.config import Config, config_warnings
from pipeline.tracking import run_params
from pipeline.train.data import eval_accounting, load_pairs
from pipeline.train.loop import train_loop
from pipeline.train.metrics import phase_seconds, read_metrics
from pipeline.vocab import LOW_EDIT_DISTANCE, Stage


def low_edit_distance_warning(dpop_lambda: float, median_edit_distance: float | None) -> str | None:
    """Plain DPO on pairs that differ in a few tokens is the failure mode DPOP was made for: say so."""
    if dpop_lambda > 0 or median_edit_distance is None or median_edit_distance >= LOW_EDIT_DISTANCE:
        return None
    return (f"plain DPO (train.dpop_lambda = 0) on pairs with median token edit distance {median_edit_distance:g} "
            f"(< {LOW_EDIT_DISTANCE}): on pairs that differ in a few tokens DPO tends to lower the likelihood of the "
            f"chosen completion too (Smaug, Pal et al. 2024). DPOP keeps it up: set train.dpop_lambda > 0 (the paper "
            f"uses 50).")


def make_trainer(cfg: Config, out: str, run_name: str, pairs: dict, tracking: dict, callbacks: list = (),
                 report_metric: str | None = None):
    """The TorchTrainer of one training run writing to `out`; the train stage and every tune trial use it.
    `pairs` are load_pairs' object refs; `tracking` names the run for run.trackers ({"name", "params"});
    `report_metric` is the metric a sweep ranks by (rows with it are reported to Ray Train, and so to Tune).
    Rerunning with the same `out` and `run_name` resumes from that run's newest checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg, "out": out, "pairs": pairs, "report_metric": report_metric,
                           "tracking": tracking},
        # CPU-offloaded shards take part in collectives (gradient-norm clipping) from host memory: gloo carries
        # those, NCCL the rest.
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl") if t.use_gpu and t.cpu_offload else None,
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker},
                                               # As few nodes as possible; Ray numbers the workers node by node,
                                               # so consecutive ranks (a shard group) share a node.
                                               placement_strategy="PACK"),
        run_config=ray.train.RunConfig(name=run_name, storage_path=out, callbacks=list(callbacks),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
                                       # A lost worker restarts the group from the newest checkpoint.
                                       failure_config=ray.train.FailureConfig(max_failures=t.max_failures)),
    )


def train_policy(cfg: Config, stage) -> dict:
    t = cfg.train
    pairs, info = load_pairs(stage.inputs[Stage.REFERENCE], t)
    warnings = config_warnings(cfg) + [w for w in [low_edit_distance_warning(t.dpop_lambda,
                                                                             info["median_edit_distance"])] if w]
    for warning in warnings:
        print(f"[dpop] WARNING: {warning}", flush=True)
    print(f"[dpop] train: {info['train_rows']} train / {info['eval_rows']} eval pairs, {t.max_steps} steps of "
          f"{t.batch_size} pairs on {t.num_workers} worker(s), beta={t.beta} lambda={t.dpop_lambda}", flush=True)
    # The fingerprint in the run name: a rerun of the same config resumes its checkpoints, another starts anew.
    tracking = {"name": f"{cfg.run.name}/train", "params": run_params(cfg, stage.manifests[Stage.REFERENCE]["fingerprint"])}
    result = make_trainer(cfg, stage.out, f"ray-{stage.fingerprint}", pairs, tracking).fit()
    if result.error:
        raise result.error

    rows = read_metrics(stage.out)
    plots.training_curves(rows, storage.join(stage.out, "curves.png"))
    final = rows[-1]
    median_edit = info["median_edit_distance"]
    train_rows, eval_rows = info["train_rows"], info["eval_rows"]
    resumed = [r["resumed_from_step"] for r in rows if "resumed_from_step" in r]
    # Without evaluations (an eval split smaller than the worker count) early stopping never acts: model/ is final.
    early = {"early_stopping": {"stopped": bool(final.get("early_stopping/stopped")),
                                "model_step": final.get("early_stopping/best_step") or final["step"],
                                "best": final.get("early_stopping/best"), "metric": t.early_stopping.metric}} \
        if t.early_stopping else {}
    if early and early["early_stopping"]["stopped"]:
        print(f"[dpop] train: stopped early at step {final['step']}; model/ is the step "
              f"{early['early_stopping']['model_step']} policy", flush=True)
    return {
        "warnings": warnings,
        "median_edit_distance": median_edit,
        "resumed_from_step": resumed[-1] if resumed else None,
        "rows": train_rows,
        "eval_rows": eval_rows,
        **eval_accounting(train_rows, eval_rows, t.num_workers),
        "steps": final["step"],
        "final_metrics": {k: v for k, v in final.items()
                          if k not in ("step", "resumed_from_step", "time") and not k.startswith("parameters/")},
        "parameters": {k.split("/")[1]: v for k, v in rows[0].items() if k.startswith("parameters/")},
        "model": storage.join(stage.out, "model") if not t.lora or t.lora.merge else None,
        "adapter": storage.join(stage.out, "adapter") if t.lora else None,
        "model_step": early["early_stopping"]["model_step"] if early else final["step"],
        **early,
        "curves": storage.join(stage.out, "curves.png"),
        "timings": phase_seconds(stage.out),
    }
