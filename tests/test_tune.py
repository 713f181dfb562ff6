"""The tune stage: a β × λ sweep of distributed TorchTrainers on the one reference pass."""
import json

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import demo_config, read_manifest, write_config
from pipeline import storage
from pipeline.cli import main


@pytest.fixture(scope="module")
def sweep_config(tmp_path_factory, tiny_model, ray_cluster):
    """The demo config with a 2 x 2 tune section; pairs and reference run once, before any sweep."""
    tmp = tmp_path_factory.mktemp("tune")
    # Every step logged, so each trial's metrics.jsonl spans its steps: two trials that ran at once overlap even
    # when ASHA stops one at its first rung.
    config = demo_config(tmp, tiny_model, name="sweep", max_steps=8, eval_every=4, checkpoint_every=0, log_every=1,
                         warmup_steps=1)
    tune = {"beta": [0.1, 0.5], "dpop_lambda": [0.0, 50.0], "metric": "eval/loss", "mode": "min", "grace_period": 4,
            "max_concurrent_trials": 2}
    with open(config) as f:
        raw = yaml.safe_load(f)
    # transformers for the reference pass: vLLM's (its engine's start) is covered by test_reference and the demo.
    raw["reference"]["backend"] = "hf"
    raw["run"]["trackers"] = ["mlflow"]  # every trial's run must end FINISHED, KILLED or FAILED, never RUNNING
    write_config(config, {**raw, "tune": tune})
    assert main(["run", config, "--stages", "pairs,reference"]) == 0
    return config, tmp / "runs" / "sweep"


@pytest.fixture(scope="module")
def sweep(sweep_config):
    config, run_dir = sweep_config
    reference_before = read_manifest(run_dir, "reference")["finished_at"]
    assert main(["run", config, "--stages", "tune"]) == 0
    return config, run_dir, reference_before


def test_two_by_two_sweep_shares_one_reference_pass(sweep):
    config, run_dir, reference_before = sweep
    assert read_manifest(run_dir, "reference")["finished_at"] == reference_before  # no trial recomputed it
    tune = read_manifest(run_dir, "tune")
    reference = read_manifest(run_dir, "reference")
    assert tune["inputs"] == {"reference": {"fingerprint": reference["fingerprint"], "run_id": reference["run_id"]}}
    assert tune["max_concurrent_trials"] == 2 and tune["trials"]["failed"] == 0
    trials = pq.read_table(run_dir / "tune" / "trials.parquet").to_pandas()
    assert sorted(zip(trials.beta, trials.dpop_lambda)) == [(0.1, 0.0), (0.1, 50.0), (0.5, 0.0), (0.5, 50.0)]
    assert set(trials.status) <= {"finished", "stopped_early"} and (trials.status == "finished").any()
    assert trials.final_metric.notna().all()
    # Two trials ran at once: some two trials' lives overlap, each from its workers' start (timings.json, written
    # by a trial that ran to its end; else its first step) to its last step. (Step times alone need not overlap on
    # a loaded machine: one trial's workers can take longer to start than the other's steps.)
    spans = []
    for folder in (run_dir / "tune" / "trials").iterdir():
        times = [json.loads(line)["time"] for line in open(folder / "metrics.jsonl")]
        timings = folder / "timings.json"
        started = json.loads(timings.read_text())["process_started"] if timings.exists() else min(times)
        spans.append((started, max(times)))
    assert any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans) for b0, b1 in spans[i + 1:])
    for name in ("heatmap.png", "logps_chosen.png"):
        assert (run_dir / "tune" / name).stat().st_size > 10_000


def mlflow_status(run_dir, trial: dict) -> str:
    """The MLflow status of a trials.parquet row's tracked run."""
    import os

    from mlflow.tracking import MlflowClient

    state = json.loads(storage.read_text(storage.join(trial["out"], "tracking.json")))
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=state["mlflow_tracking_uri"]).get_run(state["mlflow_run_id"]).info.status


def test_every_trials_tracked_run_ends_as_the_trial_did(sweep):
    """A finished trial's MLflow run is FINISHED; one that ASHA stopped (its workers killed before they could end
    it) is marked KILLED by the sweep's driver: none stays RUNNING."""
    _, run_dir, _ = sweep
    trials = pq.read_table(run_dir / "tune" / "trials.parquet").to_pylist()
    expected = {"finished": "FINISHED", "stopped_early": "KILLED"}
    assert [mlflow_status(run_dir, t) for t in trials] == [expected[t["status"]] for t in trials]


def test_best_json_is_the_best_trial_in_trials_parquet(sweep):
    _, run_dir, _ = sweep
    trials = pq.read_table(run_dir / "tune" / "trials.parquet").to_pandas()
    best = json.loads((run_dir / "tune" / "best.json").read_text())
    candidates = trials[trials.status != "failed"]
    top = candidates.loc[candidates.kept_metric.idxmin()]
    assert (best["beta"], best["dpop_lambda"], best["value"]) == (top.beta, top.dpop_lambda, top.kept_metric)
    assert best["metric"] == "eval/loss" and best["value"] == candidates.kept_metric.min()
    # No early stopping here: each trial's model/ is its last step's, ranked by the last value.
    assert (candidates.kept_metric == candidates.final_metric).all()
    # A trial ASHA stops may run a few steps past its last evaluation before the stop reaches it; it saves no model.
    finished = candidates[candidates.model.notna()]
    assert (finished.model_step == finished.steps).all()
    if best["status"] == "finished":
        assert (run_dir / "tune" / best["model"].split("/tune/", 1)[1] / "config.json").exists()


def test_eval_scores_every_finished_trial_and_picks_the_best_by_a_benchmark(sweep):
    """eval.policies [tune]: the reference and every trial that finished with a model (ASHA's stopped trials have
    none and are listed as skipped), ranked by eval.select_by; the report compares DPO (λ 0) with DPOP (λ 50)."""
    config, run_dir, _ = sweep
    with open(config) as f:
        raw = yaml.safe_load(f)
    raw["eval"] = {"policies": ["tune"], "backend": "hf", "max_length": 256,
                   "select_by": "pairs/logps/chosen_change", "select_mode": "max"}
    eval_config = write_config(run_dir.parent / "sweep_eval.yaml", raw)
    assert main(["run", eval_config, "--stages", "eval"]) == 0
    trials = pq.read_table(run_dir / "tune" / "trials.parquet").to_pandas()
    finished = trials[trials.model.notna()]
    manifest = read_manifest(run_dir, "eval")
    assert set(manifest["inputs"]) == {"reference", "tune"}
    assert [m["name"] for m in manifest["models"]][0] == "reference"
    evaluated = {m["path"]: m for m in manifest["models"][1:]}
    assert set(evaluated) == set(finished.model)
    assert len(manifest["skipped_trials"]) == len(trials) - len(finished)
    for trial in finished.itertuples():
        params = evaluated[trial.model]["params"]
        assert (params["beta"], params["dpop_lambda"]) == (trial.beta, trial.dpop_lambda)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    change = {r["model"]: r["value"] for r in results if r["metric"] == "logps/chosen_change"}
    assert set(change) == {m["name"] for m in manifest["models"][1:]}
    best = json.loads((run_dir / "eval" / "best.json").read_text())
    assert best["value"] == max(change.values()) and change[best["trial"]] == best["value"]
    assert manifest["best"] == best

    report = (run_dir / "report.md").read_text()
    assert "## Sweep" in report and "## Evaluation" in report and "tune_heatmap.png" in report
    lambdas = set(finished.dpop_lambda)
    assert ("DPO (β" in report) == (lambdas >= {0.0, 50.0})


def test_train_beta_and_lambda_leave_the_sweep_current(sweep, capsys):
    """Every trial takes its β and λ from tune.beta and tune.dpop_lambda: train.beta and train.dpop_lambda are not
    what the tune stage reads, and other train keys are."""
    config, _, _ = sweep
    assert main(["status", config, "--set", "train.beta=0.3", "--set", "train.dpop_lambda=5"]) == 0
    assert "tune       done" in capsys.readouterr().out
    assert main(["status", config, "--set", "train.learning_rate=0.5"]) == 0
    assert "tune       stale" in capsys.readouterr().out


def test_unfinished_sweep_keeps_its_finished_trials(sweep):
    """Without its manifest (as after a crash) the stage restores the Tune experiment instead of starting over."""
    config, run_dir, _ = sweep
    before = {p.parent.name: p.stat().st_mtime for p in (run_dir / "tune" / "trials").glob("*/metrics.jsonl")}
    (run_dir / "tune" / "_manifest.json").unlink()
    assert main(["run", config, "--stages", "tune"]) == 0
    after = {p.parent.name: p.stat().st_mtime for p in (run_dir / "tune" / "trials").glob("*/metrics.jsonl")}
    assert after == before
    assert len(pq.read_table(run_dir / "tune" / "trials.parquet")) == 4


def test_a_failing_trial_is_recorded_and_the_others_finish(sweep_config):
    """β = 1e38 overflows the gradients: that trial fails (non-finite gradient norm); the other one finishes."""
    config, run_dir = sweep_config
    assert main(["run", config, "--stages", "tune", "--set", "tune.beta=[0.1, 1.0e+38]",
                 "--set", "tune.dpop_lambda=[50.0]", "--set", "tune.scheduler=none",
                 # A non-finite loss repeats on every attempt: no retry of the failing trial's workers.
                 "--set", "train.max_failures=0"]) == 0
    trials = pq.read_table(run_dir / "tune" / "trials.parquet").to_pandas().set_index("beta")
    assert trials.loc[1e38, "status"] == "failed" and "non-finite gradient norm" in trials.loc[1e38, "error"]
    assert trials.loc[0.1, "status"] == "finished" and trials.loc[0.1, "steps"] == 8
    best = json.loads((run_dir / "tune" / "best.json").read_text())
    assert best["beta"] == 0.1
    assert read_manifest(run_dir, "tune")["trials"] == {"finished": 1, "stopped_early": 0, "failed": 1}
    rows = {t["beta"]: t for t in pq.read_table(run_dir / "tune" / "trials.parquet").to_pylist()}
    assert mlflow_status(run_dir, rows[1e38]) == "FAILED" and mlflow_status(run_dir, rows[0.1]) == "FINISHED"


def test_trials_rank_by_the_weights_they_kept():
    """With early stopping a trial's model/ holds its best evaluation's weights, so the trial is ranked (and
    best.json's value given) by the metric at that step, not by its last value: here the trial whose last
    evaluation is highest kept weights that score lower than the other trial's."""
    from pipeline.tune import best_trial, kept_value

    metric = "eval/rewards/accuracies"
    stopped = [{"step": 10, metric: 0.5}, {"step": 20, metric: 0.9, "early_stopping/best_step": 10},
               {"step": 30, metric: 0.9, "early_stopping/best_step": 10, "early_stopping/stopped": True}]
    # Early stopping watched eval/loss (best at step 10); the sweep ranks by reward accuracy, which kept rising.
    plain = [{"step": 10, metric: 0.6}, {"step": 30, metric: 0.7}]
    assert kept_value(stopped, metric) == (10, 0.5) and kept_value(plain, metric) == (30, 0.7)
    rows = [{"trial_id": name, "status": "finished", "final_metric": curve[-1][metric],
             "model_step": kept_value(curve, metric)[0], "kept_metric": kept_value(curve, metric)[1]}
            for name, curve in (("stopped", stopped), ("plain", plain))]
    assert best_trial(rows, "max")["trial_id"] == "plain"
    assert max(rows, key=lambda r: r["final_metric"])["trial_id"] == "stopped"  # what ranking by the last value picks


def test_a_sweep_over_the_loss_menu(sweep_config):
    """Loss types crossed with DPOP's penalty and RPO's NLL term, every trial on the one reference pass: each trial
    trains its own loss. At step 1 the policy is the reference, so the margin is 0 and each logged loss is its closed
    form plus α times the logged NLL: IPO (0 − 1/(2β))² = 25 at β 0.1, SLiC's hinge max(0, 1 − 0) = 1."""
    config, run_dir = sweep_config
    assert main(["run", config, "--stages", "tune", "--set", "tune.loss_type=[ipo, hinge]",
                 "--set", "tune.beta=[0.1]", "--set", "tune.dpop_lambda=[50.0]", "--set", "tune.nll_weight=[1.0]",
                 "--set", "tune.scheduler=none", "--set", "tune.metric=logps/chosen", "--set", "tune.mode=max",
                 "--set", "train.max_steps=2", "--set", "train.log_every=1", "--set", "train.eval_every=0"]) == 0
    trials = {t["loss_type"]: t for t in pq.read_table(run_dir / "tune" / "trials.parquet").to_pylist()}
    assert {t["method"] for t in trials.values()} == {"IPO + penalty + NLL", "SLiC + penalty + NLL"}
    for loss_type, at_zero_margin in (("ipo", 25.0), ("hinge", 1.0)):
        trial = trials[loss_type]
        assert trial["status"] == "finished" and f"-loss_{loss_type}-" in trial["out"]
        first = json.loads(storage.read_text(storage.join(trial["out"], "metrics.jsonl")).splitlines()[0])
        assert first["step"] == 1 and first["nll"] > 0
        assert first["loss"] - 1.0 * first["nll"] == pytest.approx(at_zero_margin, abs=1e-3)


def test_ranking_a_sweep_of_several_losses_by_their_loss_is_refused(sweep_config):
    """Losses of different types (or with and without the NLL term) are on different scales: ranking trials, or
    letting ASHA stop them, by `loss` would compare the scales, not the methods."""
    from pipeline.config import ConfigError, load_config

    config, _ = sweep_config
    for swept in ("tune.loss_type=[sigmoid, ipo]", "tune.nll_weight=[0.0, 1.0]"):
        with pytest.raises(ConfigError, match="tune.metric: eval/loss compares losses on different scales"):
            load_config(config, [swept])


def test_named_methods_cross_only_the_keys_they_leave_free(tmp_path, tiny_model):
    """tune.methods: DPO, DPOP, IPO and DPO + NLL are 4 trials (the lists would cross into 8), each crossed with the
    grid of the keys it does not set (β here); a key set by a method and swept by a list is refused."""
    from pipeline.config import ConfigError, load_config, sweep_methods
    from pipeline.vocab import method_name

    config = demo_config(tmp_path, tiny_model)
    raw = yaml.safe_load(open(config))
    raw["tune"] = {"beta": [0.1, 0.5], "metric": "eval/rewards/accuracies", "mode": "max",
                   "methods": [{"dpop_lambda": 0}, {"dpop_lambda": 50}, {"loss_type": "ipo", "dpop_lambda": 0},
                               {"dpop_lambda": 0, "nll_weight": 1.0}]}
    methods = sweep_methods(load_config(write_config(tmp_path / "m.yaml", raw)))
    assert [(method_name(m), m["beta"]) for m in methods] == [
        ("DPO", 0.1), ("DPO", 0.5), ("DPOP", 0.1), ("DPOP", 0.5), ("IPO", 0.1), ("IPO", 0.5),
        ("DPO + NLL", 0.1), ("DPO + NLL", 0.5)]
    raw["tune"]["dpop_lambda"] = [0.0, 50.0]
    with pytest.raises(ConfigError, match=r"tune.methods\[0\].dpop_lambda: set to 0 here and swept as tune.dpop_la"):
        load_config(write_config(tmp_path / "m.yaml", raw))
