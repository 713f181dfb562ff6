"""What a new user meets after the config loads: mistakes the driver can see are caught before Ray starts, with the
key named; a stage that fails is on record (one line, a log, `_failed.json`, `dpop status` failed); flags do what
they say; `status` says which key made a stage stale; the figures read well; the logs are words."""
import json
import logging
import shutil

import pytest

from conftest import write_config, write_jsonl
from pipeline.cli import main
from pipeline.vocab import METHOD_KEYS


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if anything starts or joins a Ray cluster (another test's may be up already, so the
    runner's own entry to Ray refuses too)."""
    import ray

    from pipeline import runner

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a run that cannot go ahead")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(runner, "init_ray", refuse)


@pytest.fixture
def raw(tmp_path, tiny_model) -> dict:
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}] * 4)
    return {"run": {"name": "t", "storage": str(tmp_path / "runs")},
            "model": {"name_or_path": tiny_model},
            "data": {"sources": [{"path": data, "format": "pairwise"}], "max_length": 128, "max_prompt_length": 64},
            "reference": {"backend": "hf", "use_gpu": False, "dtype": "float32"},
            "train": {"batch_size": 2, "micro_batch_size": 1, "num_workers": 2, "max_steps": 2, "warmup_steps": 0,
                      "use_gpu": False}}


def test_a_source_file_of_the_wrong_kind_fails_before_ray_naming_the_key(tmp_path, raw, no_ray, capsys):
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\n2+2?,4,5\n")
    raw["data"]["sources"].append({"path": str(tmp_path / "pairs.csv"), "format": "pairwise"})
    assert main(["run", write_config(tmp_path / "c.yaml", raw)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpop: config error: data.sources[1].path: ") and "pairs.csv" in err
    assert "expected data files of one kind among .jsonl, .json, .parquet, .txt" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_model_folder_without_a_tokenizer_fails_before_ray(tmp_path, raw, tiny_model, no_ray, capsys):
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{tiny_model}/{name}", weights_only / name)
    raw["model"]["name_or_path"] = str(weights_only)
    assert main(["run", write_config(tmp_path / "c.yaml", raw)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dpop: config error: model.name_or_path: {weights_only} holds no tokenizer")
    assert "set model.tokenizer" in err and "sentencepiece" not in err


def test_a_model_folder_without_a_config_fails_before_ray(tmp_path, raw, tiny_model, no_ray, capsys):
    tokenizer_only = tmp_path / "tokenizer_only"
    shutil.copytree(tiny_model, tokenizer_only)
    (tokenizer_only / "config.json").unlink()
    raw["model"]["name_or_path"] = str(tokenizer_only)
    assert main(["run", write_config(tmp_path / "c.yaml", raw), "--stages", "pairs,reference"]) == 2
    assert capsys.readouterr().err.startswith(
        f"dpop: config error: model.name_or_path: cannot load a model config from '{tokenizer_only}'")


def test_a_missing_model_folder_names_the_key_and_the_folder(tmp_path, raw, monkeypatch, no_ray, capsys):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    raw["model"]["name_or_path"] = "models/no_model"
    config = write_config(tmp_path / "c.yaml", raw)
    assert main(["status", config]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no table header before the error
    assert captured.err == (f"dpop: config error: model.name_or_path: 'models/no_model' is no folder "
                            f"({tmp_path}/models/no_model; a relative path is relative to the current directory, "
                            f"{tmp_path})\n")
    assert "hf download" not in captured.err and "Error]" not in captured.err


def test_force_outside_stages_and_empty_stages_are_errors(tmp_path, raw, no_ray, capsys):
    config = write_config(tmp_path / "c.yaml", raw)
    assert main(["run", config, "--stages", "pairs", "--force", "reference"]) == 2
    assert capsys.readouterr().err == ("dpop: --force reference: not among --stages pairs; add it to --stages or "
                                       "leave --force reference out\n")
    assert main(["run", config, "--stages", ""]) == 2
    assert "dpop: --stages: names no stage; give one or more of pairs, reference, train" in capsys.readouterr().err


def test_a_stage_error_is_one_line_with_its_traceback_on_record(tmp_path, raw, ray_cluster, monkeypatch, capsys):
    """An error inside a Ray task (here: a failing pairs stage): one line naming the stage, the error and the log;
    `_failed.json` and `_error.log` in the stage's folder; `dpop status` says failed and exits 1."""
    import ray

    from pipeline import pairs

    @ray.remote
    def tokenize(_):
        raise ValueError("data.sources[0]: row 3 has no 'chosen' text")

    def build_pairs(cfg, stage):
        return ray.get(tokenize.remote(stage.out))

    monkeypatch.setattr(pairs, "build_pairs", build_pairs)
    config = write_config(tmp_path / "c.yaml", raw)
    assert main(["run", config, "--stages", "pairs"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    log = tmp_path / "runs" / "t" / "pairs" / "_error.log"
    assert err == [f"dpop: stage pairs failed: ValueError: data.sources[0]: row 3 has no 'chosen' text; the "
                   f"traceback is in {log}"]
    assert "Traceback (most recent call last)" in log.read_text() and "def tokenize" not in err[0]
    failed = json.loads((tmp_path / "runs" / "t" / "pairs" / "_failed.json").read_text())
    assert failed["error"] == "ValueError: data.sources[0]: row 3 has no 'chosen' text" and failed["failed_at"]
    assert main(["status", config]) == 1
    line = next(li for li in capsys.readouterr().out.splitlines() if li.startswith("pairs"))
    assert line.split()[1] == "failed" and str(log) in line


def test_a_resumable_stage_that_failed_keeps_what_it_finished(tmp_path, raw, ray_cluster, monkeypatch):
    """A reference pass that fails on an error hours in (an actor out of memory) keeps its finished files: the
    rerun resumes, as after a kill, and clears the failure record."""
    from pipeline import reference

    config = write_config(tmp_path / "c.yaml", raw)
    assert main(["run", config, "--stages", "pairs"]) == 0
    out = tmp_path / "runs" / "t" / "reference"

    def fails_after_one_file(cfg, stage):
        (out / "part-0.parquet").write_text("a finished file")
        raise MemoryError("the actor ran out of memory")

    seen = {}

    def resumes(cfg, stage):
        seen.update(resuming=stage.resuming, kept=(out / "part-0.parquet").exists(),
                    failure_record=(out / "_failed.json").exists() or (out / "_error.log").exists())
        return {"rows": 0}

    monkeypatch.setattr(reference, "compute_reference", fails_after_one_file)
    assert main(["run", config, "--stages", "reference"]) == 1
    assert (out / "_failed.json").exists()
    monkeypatch.setattr(reference, "compute_reference", resumes)
    assert main(["run", config, "--stages", "reference"]) == 0
    assert seen == {"resuming": True, "kept": True, "failure_record": False}


def test_engine_pools_use_rays_current_api(tmp_path, raw, ray_cluster, monkeypatch):
    """`map_batches(concurrency=...)` is deprecated in Ray 2.51: the pools ask for an ActorPoolStrategy, and no
    logger reports a deprecation for our call."""
    import ray

    from pipeline.config import load_config
    from pipeline.engines import engine_actor

    cfg = load_config(write_config(tmp_path / "c.yaml", raw))
    arguments = engine_actor(cfg, cfg.model.name_or_path, 64, "hf")
    assert "concurrency" not in arguments and isinstance(arguments["compute"], ray.data.ActorPoolStrategy)
    logged, handle = [], logging.Logger.handle
    monkeypatch.setattr(logging.Logger, "handle", lambda logger, record: (logged.append(record.getMessage()),
                                                                        handle(logger, record)))
    ray.data.range(2).map_batches(Identity, **{**arguments, "batch_format": "numpy", "fn_constructor_kwargs": {}})
    assert not [message for message in logged if "deprecated" in message]


class Identity:
    def __call__(self, batch):
        return batch


def test_progress_lines_are_words():
    from pipeline.vocab import counts_text

    assert counts_text({"train": 433, "eval": 47}) == "train 433, eval 47"
    assert counts_text({}) == "none"


def test_one_colour_and_label_per_method_in_every_figure(tmp_path, raw):
    """Each figure numbers the run's methods from one list: DPOP keeps its colour where DPO is missing (a trial
    ASHA stopped has no model to evaluate), and the labels are the method's name and the keys the run's methods
    differ in (β where the run varies it, the loss type by its name)."""
    from pipeline.config import load_config
    from pipeline.plots import method_styles, run_methods

    lr = 5e-7  # train.learning_rate's default

    def model(name, loss_type="sigmoid", dpop_lambda=0.0, beta=0.1, nll_weight=0.0):
        return {"name": name, "params": {"loss_type": loss_type, "dpop_lambda": dpop_lambda, "beta": beta,
                                         "label_smoothing": 0.0, "nll_weight": nll_weight, "learning_rate": lr}}

    raw["tune"] = {"beta": [0.1], "dpop_lambda": [0.0, 50.0]}
    raw["eval"] = {"policies": ["tune"], "max_length": 256}
    methods = run_methods(load_config(write_config(tmp_path / "c.yaml", raw)))
    assert methods == [("sigmoid", 0.0, 0.1, 0.0, 0.0, lr), ("sigmoid", 50.0, 0.1, 0.0, 0.0, lr)]
    dpo, dpop = model("beta_0.1-lambda_0-a_00000"), model("beta_0.1-lambda_50-a_00001", dpop_lambda=50.0)
    sweep = method_styles([dpop, dpo], methods)  # tune's curves: every trial
    evaluated = method_styles([{"name": "reference", "params": None}, dpop], methods)
    assert sweep[dpo["name"]][:2] == ("DPO (λ 0)", "C0")
    assert sweep[dpop["name"]][:2] == evaluated[dpop["name"]][:2] == ("DPOP (λ 50)", "C1")
    assert evaluated["reference"][:2] == ("reference", "gray")
    raw["tune"]["beta"] = [0.1, 0.5]
    raw["eval"]["policies"] = ["train", "tune"]
    raw["train"]["beta"] = 0.3
    methods = run_methods(load_config(write_config(tmp_path / "c.yaml", raw)))
    assert [(m[1], m[2]) for m in methods] == [(0.0, 0.1), (0.0, 0.5), (50.0, 0.1), (50.0, 0.3), (50.0, 0.5)]
    styles = method_styles([dpo, model("train", dpop_lambda=50.0, beta=0.3)], methods)
    assert styles[dpo["name"]].label == "DPO (β 0.1, λ 0)"
    assert styles["train"][:2] == ("train: DPOP (β 0.3, λ 50)", "C3")
    # The loss menu: loss type × λ × α, every method named.
    raw["tune"] = {"beta": [0.1], "dpop_lambda": [0.0, 50.0], "loss_type": ["sigmoid", "ipo"], "nll_weight": [0.0, 1.0],
                   "metric": "eval/rewards/accuracies", "mode": "max"}
    raw["eval"]["policies"] = ["tune"]
    methods = run_methods(load_config(write_config(tmp_path / "c.yaml", raw)))
    assert len(methods) == 8
    names = [model(f"m{i}", *m[:2], nll_weight=m[4]) for i, m in enumerate(methods)]
    labels = [style.label for style in method_styles(names, methods).values()]
    assert labels == ["IPO (λ 0, α 0)", "IPO + NLL (λ 0, α 1)", "IPO + penalty (λ 50, α 0)",
                      "IPO + penalty + NLL (λ 50, α 1)", "DPO (λ 0, α 0)", "DPO + NLL (λ 0, α 1)",
                      "DPOP (λ 50, α 0)", "DPOP + NLL (λ 50, α 1)"]


def test_the_sweep_table_shows_each_metric_once(tmp_path):
    """The ranking metric is also one of the columns the report always shows (the demo ranks by
    eval/rewards/accuracies): it appears once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.report import Report, _tune_section

    metric = "eval/rewards/accuracies"
    trial = {"trial_id": "a_00000", "method": "DPO", "loss_type": "sigmoid", "beta": 0.1, "dpop_lambda": 0.0,
             "label_smoothing": 0.0, "nll_weight": 0.0, "learning_rate": 1e-3, "status": "finished", "steps": 4,
             "metric": metric, "final_metric": 0.75, "logps/chosen": -2.0, "eval/logps/chosen": -2.1, metric: 0.75}
    (tmp_path / "tune").mkdir()
    pq.write_table(pa.Table.from_pylist([trial]), tmp_path / "tune" / "trials.parquet")
    report = Report(str(tmp_path), str(tmp_path))
    _tune_section(report, {"trials": {"finished": 1}, "sweep_seconds": 10.0, "best": None}, str(tmp_path / "tune"))
    header = next(line for line in report.lines if line.startswith("| method")).splitlines()[0]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["method", "β", "λ", "status", "steps", metric, "logps/chosen", "eval/logps/chosen"]


@pytest.fixture
def drawn(monkeypatch):
    """The figures pipeline.plots draws, kept open for a look (plots closes each one when it is saved)."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    yield figures
    for fig in figures:
        fig.clf()


def test_two_dropped_rows_beside_four_hundred_pairs_are_seen(tmp_path, drawn):
    from pipeline import plots

    plots.pair_counts({"problems": {"train": 433, "eval": 47, "dropped": {"missing_field": 1, "no_final_answer": 1}}},
                      str(tmp_path / "counts.png"))
    kept, dropped = drawn[0].axes
    assert kept.get_xscale() == dropped.get_xscale() == "linear"
    # The drops have an axis of their own: each drop reason is a bar as wide as its count, half the axis or more.
    widths = [bar.get_width() for bar in dropped.patches]
    assert widths == [1, 1] and dropped.get_xlim()[1] <= 2.2
    assert dropped.get_title() == "dropped: 2" and kept.get_title() == "kept: 480"


def test_titles_fit_and_steps_are_whole(tmp_path, drawn):
    from pipeline import plots

    rows = [{"trial_id": f"x_0000{i}", "loss_type": "sigmoid", "beta": 0.1, "dpop_lambda": lam,
             "label_smoothing": 0.0, "nll_weight": 0.0, "learning_rate": 1e-3, "status": "finished",
             "final_metric": 0.5, "kept_metric": 0.5}
            for i, lam in enumerate((0.0, 50.0))]
    plots.sweep_heatmap(rows, "eval/rewards/accuracies", "max", str(tmp_path / "heatmap.png"))
    fig = drawn[-1]
    renderer = fig.canvas.get_renderer()
    title = fig.axes[0].title.get_window_extent(renderer)
    assert title.x0 >= 0 and title.x1 <= fig.bbox.x1 and title.y1 <= fig.bbox.y1
    metrics = [{"step": step, "loss": 0.7, "rewards/accuracies": 0.5, "rewards/margins": 0.0, "logps/chosen": -2.0,
                "logps/rejected": -3.0, "dpop/penalty_active": 0.0, "rewards/chosen": -0.1 * step}
               for step in (1, 2, 3)]
    plots.training_curves(metrics, str(tmp_path / "curves.png"))
    curves = {"x_00000": metrics, "x_00001": metrics}
    models = [{"name": r["trial_id"], "params": {k: r[k] for k in METHOD_KEYS}} for r in rows]
    plots.logps_chosen_curves(models, curves, [("sigmoid", lam, 0.1, 0.0, 0.0, 1e-3) for lam in (0.0, 50.0)],
                              str(tmp_path / "logps.png"))
    for fig in drawn[-2:]:
        for ax in fig.axes:
            assert all(float(tick).is_integer() for tick in ax.get_xticks()), ax.get_title()
    assert [t.get_text() for t in drawn[-1].axes[0].get_legend().get_texts()] == ["reference", "DPO (λ 0)",
                                                                                 "DPOP (λ 50)"]
    # Drawn in nats against the reference: rewards/chosen / β.
    assert list(drawn[-1].axes[0].get_lines()[1].get_ydata()) == pytest.approx([-1.0, -2.0, -3.0])
