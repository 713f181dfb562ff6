"""Experiment tracking (`run.trackers`): each train run and each sweep trial is one tracked run.

Rank 0 of the run's workers opens the trackers (`Trackers`) and logs every row it writes to metrics.jsonl, so a
tracker holds exactly the file's rows, step by step (Ray Train reports only some steps: see pipeline/train.py):
- mlflow: Ray's `ray.air.integrations.mlflow.setup_mlflow` (parameters at start, then `log_metrics` per row);
- wandb: Ray's `ray.air.integrations.wandb.setup_wandb`;
- tensorboard: a tensorboardX `SummaryWriter` (what Ray Tune's TBXLoggerCallback writes with) into the run's
  `tensorboard/` folder.
The MLflow run's id is kept in the run folder's `tracking.json`, so that a resumed run logs into the same MLflow run
and the eval stage can attach its results and the report to it (`attach_eval`). Credentials (MLFLOW_TRACKING_TOKEN,
MLFLOW_TRACKING_USERNAME/PASSWORD, WANDB_API_KEY) come from the environment only, never from the config.
"""
import json
import numbers
import os
import shutil
import tempfile

from pipeline import storage
from pipeline.config import Config
from pipeline.vocab import METHOD_KEYS, Stage, method_name

TRACKING_FILE = "tracking.json"


def mlflow_uri(cfg: Config) -> str:
    """run.mlflow_tracking_uri, or the run folder's `mlruns` (local storage only: config validation says so)."""
    if cfg.run.mlflow_tracking_uri:
        return cfg.run.mlflow_tracking_uri
    # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked: a folder beside the run's
    # outputs is still what a one-machine run wants (`mlflow ui --backend-store-uri` reads it).
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return "file://" + os.path.abspath(os.path.join(cfg.run.storage, cfg.run.name, "mlruns"))


def run_params(cfg: Config, reference_fingerprint: str) -> dict:
    """What a tracked run is filed under: the knobs a person compares runs by, and the pairs it trained on."""
    t = cfg.train
    params = {**{key: getattr(t, key) for key in METHOD_KEYS}, "method": method_name(vars(t)),
              "batch_size": t.batch_size, "max_steps": t.max_steps, "model": cfg.model.name_or_path,
              "pair_fingerprint": reference_fingerprint, "seed": cfg.run.seed,
              "mixed_precision": t.mixed_precision, "lora": bool(t.lora)}
    if t.lora:
        params.update({f"lora_{k}": v for k, v in t.lora.model_dump().items() if k != "target_modules"},
                      lora_target_modules=",".join(t.lora.target_modules))
    return params


def scalars(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, numbers.Number) and not isinstance(v, bool)}


class Trackers:
    """The trackers of one train run or trial, opened on rank 0. `log` takes each metrics.jsonl row."""

    def __init__(self, cfg: Config, out: str, name: str, params: dict):
        self.out, self.mlflow, self.wandb, self.tensorboard = out, None, None, None
        self.tensorboard_dir = None
        state = json.loads(storage.read_text(storage.join(out, TRACKING_FILE)) or "{}")
        if "mlflow" in cfg.run.trackers:
            from ray.air.integrations.mlflow import setup_mlflow

            if state.get("mlflow_run_id"):  # a resumed run: the same MLflow run (mlflow.start_run reads this)
                os.environ["MLFLOW_RUN_ID"] = state["mlflow_run_id"]
            uri = mlflow_uri(cfg)
            self.mlflow = setup_mlflow(config=params, tracking_uri=uri,
                                       experiment_name=cfg.run.mlflow_experiment or cfg.run.name, run_name=name,
                                       create_experiment_if_not_exists=True, tags={"dpop.run": cfg.run.name})
            os.environ.pop("MLFLOW_RUN_ID", None)
            state.update(mlflow_run_id=self.mlflow.active_run().info.run_id, mlflow_tracking_uri=uri)
        if "wandb" in cfg.run.trackers:
            from ray.air.integrations.wandb import setup_wandb

            self.wandb = setup_wandb(config=params, project=cfg.run.wandb_project or cfg.run.name, name=name)
        if "tensorboard" in cfg.run.trackers:
            from tensorboardX import SummaryWriter

            # Local storage: straight into the run folder; an object store: a local folder uploaded at the end.
            local = not storage.is_remote(out)
            self.tensorboard_dir = storage.join(out, "tensorboard") if local else tempfile.mkdtemp()
            self.tensorboard = SummaryWriter(self.tensorboard_dir)
            state["tensorboard"] = storage.join(out, "tensorboard")
        storage.write_text(storage.join(out, TRACKING_FILE), json.dumps(state))

    def log(self, row: dict) -> None:
        values, step = scalars(row), row["step"]
        if self.mlflow:
            self.mlflow.log_metrics(values, step=step)
        if self.wandb:
            self.wandb.log(values, step=step)
        if self.tensorboard:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
            if storage.is_remote(self.out):  # a trial that Tune ends has its files up to its last row
                storage.upload_dir(self.tensorboard_dir, storage.join(self.out, "tensorboard"))

    def close(self, status: str = "FINISHED") -> None:
        """End the tracked run as FINISHED, or FAILED when the run raised (train_loop's `except`); a run that Tune
        ends is marked KILLED from the driver (end_killed_run)."""
        if self.mlflow:
            self.mlflow.end_run(status=status)
        if self.wandb:
            self.wandb.finish(exit_code=0 if status == "FINISHED" else 1)
        if self.tensorboard:
            self.tensorboard.close()
            if storage.is_remote(self.out):
                storage.upload_dir(self.tensorboard_dir, storage.join(self.out, "tensorboard"))
                shutil.rmtree(self.tensorboard_dir, ignore_errors=True)


def end_killed_run(out: str, status: str) -> None:
    """Mark the MLflow run of the train run or trial at `out` as `status` (KILLED, FAILED) if it is still RUNNING:
    for a trial that Tune ended, whose workers were stopped before they could end it themselves."""
    state = json.loads(storage.read_text(storage.join(out, TRACKING_FILE)) or "{}")
    if not state.get("mlflow_run_id"):
        return
    from mlflow.tracking import MlflowClient

    if state["mlflow_tracking_uri"].startswith("file://"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=state["mlflow_tracking_uri"])
    if client.get_run(state["mlflow_run_id"]).info.status == "RUNNING":
        client.set_terminated(state["mlflow_run_id"], status=status)


def attach_eval(cfg: Config, report_uri: str) -> None:
    """After a run with trackers and an eval stage: each evaluated policy's eval results and the run report go to
    the tracked run that trained it (MLflow metrics `eval_stage/<task>/<metric>` and artifacts; TensorBoard
    scalars). Results are added once per eval run; the report is uploaded again whenever it is rebuilt."""
    run_uri = storage.join(cfg.run.storage, cfg.run.name)
    manifest = storage.read_json(storage.join(run_uri, Stage.EVAL, "_manifest.json"))
    if not cfg.run.trackers or not manifest or manifest.get("status") == "failed":
        return
    results = json.loads(storage.read_text(manifest["results"]))
    # report.md and its figures as local files (storage.local_copy copies an object-store folder, or is the folder).
    with storage.local_copy(storage.join(run_uri, "report")) as figures, tempfile.TemporaryDirectory() as folder:
        report = os.path.join(folder, "report.md")
        with open(report, "w") as f:
            f.write(storage.read_text(report_uri))
        files = [report] + ([os.path.join(figures, name) for name in sorted(os.listdir(figures))]
                            if os.path.isdir(figures) else [])
        for model in manifest["models"]:
            if model["name"] != "reference":
                _attach(model["path"].rstrip("/").rsplit("/", 1)[0], manifest["run_id"],
                        [r for r in results if r["model"] == model["name"]], files)


def _attach(run_out: str, eval_run_id: str, results: list[dict], files: list[str]) -> None:
    state = json.loads(storage.read_text(storage.join(run_out, TRACKING_FILE)) or "{}")
    if state.get("mlflow_tracking_uri", "").startswith("file://"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    values = {f"eval_stage/{r['task']}/{r['metric']}": float(r["value"]) for r in results}
    new_results = state.get("eval_attached") != eval_run_id
    if state.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=state["mlflow_tracking_uri"])
        if new_results:
            for key, value in values.items():
                client.log_metric(state["mlflow_run_id"], key, value)
        for path in files:
            client.log_artifact(state["mlflow_run_id"], path, artifact_path="report")
    if state.get("tensorboard") and new_results and not storage.is_remote(run_out):
        from tensorboardX import SummaryWriter

        with SummaryWriter(state["tensorboard"]) as writer:
            for key, value in values.items():
                writer.add_scalar(key, value, 0)
    state["eval_attached"] = eval_run_id
    storage.write_text(storage.join(run_out, TRACKING_FILE), json.dumps(state))
