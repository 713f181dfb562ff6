"""Config validation: every error names the key and the bad value, before anything runs."""
import pytest

from conftest import write_config
from pipeline.cli import main
from pipeline.config import ConfigError, load_config


@pytest.fixture
def base(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    return {
        "run": {"name": "t", "storage": str(tmp_path / "runs")},
        "model": {"name_or_path": "some/model"},
        "data": {"sources": [{"path": str(data), "format": "pairwise"}]},
        "train": {"batch_size": 8, "micro_batch_size": 2, "num_workers": 2, "max_steps": 20},
    }


def load(tmp_path, raw, overrides=()):
    return load_config(write_config(tmp_path / "c.yaml", raw), list(overrides))


def test_defaults_and_types(tmp_path, base):
    cfg = load(tmp_path, base)
    assert cfg.train.beta == 0.1 and cfg.train.dpop_lambda == 50.0
    assert cfg.reference.backend == "vllm" and cfg.model.trust_remote_code is False
    assert cfg.data.sources[0].format == "pairwise"


def test_exponent_floats_without_a_dot_are_floats(tmp_path, base):
    """PyYAML reads `1e-6` as a string (YAML 1.1 wants `1.0e-6`); in a file or a --set it means the number."""
    path = tmp_path / "c.yaml"
    write_config(path, base)
    cfg = load_config(str(path), ["train.learning_rate=1e-6", "train.beta=2E-1"])
    assert cfg.train.learning_rate == 1e-6 and cfg.train.beta == 0.2
    text = path.read_text().replace("train:\n", "train:\n  weight_decay: 1e-2\n", 1)
    path.write_text(text)
    assert load_config(str(path)).train.weight_decay == 0.01


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["train"].update(betta=0.1), "unknown key train.betta (did you mean train.beta?)"),
    (lambda r: r.update(trainer={}), "unknown key trainer"),
    (lambda r: r["train"].update(beta="high"), "train.beta: expected float, got 'high'"),
    (lambda r: r["train"].update(beta=-1), "train.beta: must be > 0, got -1"),
    (lambda r: r["train"].update(dpop_lambda=-0.5), "train.dpop_lambda: must be >= 0, got -0.5"),
    (lambda r: r["train"].update(max_steps=True), "train.max_steps: expected int, got True"),
    (lambda r: r["train"].update(max_steps="ten"), "train.max_steps: expected int, got 'ten'"),
    (lambda r: r["train"].update(use_gpu=1), "train.use_gpu: expected bool, got 1"),
    (lambda r: r["run"].update(nmae=r["run"].pop("name")), "unknown key run.nmae (did you mean run.name?)"),
    (lambda r: r["reference"].update(backend="tgi") if "reference" in r else r.update(reference={"backend": "tgi"}),
     "reference.backend: 'tgi' is not one of 'vllm', 'hf'"),
    (lambda r: r["data"]["sources"][0].update(format="triples"), "data.sources[0].format: 'triples' is not one of"),
    (lambda r: r["data"]["sources"][0].update(path="/nope.jsonl"), "data.sources[0].path: no such file"),
    (lambda r: r["data"].update(sources=[]), "data.sources: needs at least one source"),
    (lambda r: r["train"].update(batch_size=10), "train.batch_size: 10 is not a multiple of"),
    (lambda r: r["run"].pop("name"), "missing required key run.name"),
    (lambda r: r["data"].update(eval_fraction=1.5), "data.eval_fraction: must be in [0, 1), got 1.5"),
    (lambda r: r["train"].update(dpop_lambda=float("inf")), "train.dpop_lambda: must be a finite number, got inf"),
    (lambda r: r["train"].update(max_grad_norm=float("nan")), "train.max_grad_norm: must be a finite number, got nan"),
    (lambda r: r.update(tune={"beta": [0.1, float("-inf")]}), "tune.beta[1]: must be a finite number, got -inf"),
    (lambda r: r["run"].update(name=".."), "run.name: must be a folder name"),
    (lambda r: r["run"].update(name="/etc/cron.d"), "run.name: must be a folder name"),
    (lambda r: r["run"].update(name="a/../../b"), "run.name: must be a folder name"),
    (lambda r: r["data"]["sources"][0].update(prompt_template="{question} {answer}"),
     "data.sources[0].prompt_template: must use {question} and no other placeholder"),
    (lambda r: r["data"]["sources"][0].update(prompt_template="Q: {question"),
     "data.sources[0].prompt_template: not a valid template"),
    (lambda r: r.update(tune={"metric": "eval/los"}),
     "tune.metric: 'eval/los' is not a metric the trainer reports (did you mean eval/loss?)"),
    (lambda r: (r.update(tune={"metric": "eval/rewards/accuracies", "mode": "max"}),
                r["data"].update(eval_fraction=0)),
     "tune.metric: 'eval/rewards/accuracies' needs an eval split, but data.eval_fraction is 0"),
    (lambda r: r["train"].update(max_failures=-2), "train.max_failures: must be -1 (unlimited) or >= 0, got -2"),
    (lambda r: r["train"].update(early_stopping={"metric": "eval/acc"}),
     "train.early_stopping.metric: 'eval/acc' is not an eval metric the trainer reports"),
    (lambda r: r["train"].update(early_stopping={"patience": 0}), "train.early_stopping.patience: must be > 0, got 0"),
    (lambda r: r["train"].update(early_stopping={}, eval_every=0),
     "train.early_stopping: needs evaluations during the run, but train.eval_every is 0"),
    (lambda r: r.update(eval={"policies": ["tune"]}), "eval.policies: lists tune, but the config has no tune section"),
    (lambda r: (r.update(eval={}), r["data"].update(eval_fraction=0)),
     "eval.pairs: scores the held-out pairs, but data.eval_fraction is 0"),
    (lambda r: r.update(eval={"pairs": False}), "eval: nothing to evaluate"),
    (lambda r: r.update(eval={"sources": [{"path": "/nope.jsonl", "task": "gsm8k"}]}),
     "eval.sources[0].path: no such file or folder: '/nope.jsonl'"),
    (lambda r: r.update(eval={"sources": [{"path": r["data"]["sources"][0]["path"], "task": "mmlu"}]}),
     "eval.sources[0].task: 'mmlu' is not one of 'multiple_choice', 'gsm8k'"),
    (lambda r: r.update(eval={"sources": [{"path": r["data"]["sources"][0]["path"], "task": "gsm8k",
                                           "max_new_tokens": 2048}]}),
     "eval.sources[0].max_new_tokens: 2048 leaves no room for a prompt within eval.max_length 1024"),
    (lambda r: r.update(eval={"sources": [{"path": r["data"]["sources"][0]["path"], "task": "gsm8k", "stop": [""]}]}),
     "eval.sources[0].stop: needs one or more non-empty strings"),
    (lambda r: r.update(eval={"sources": [{"path": r["data"]["sources"][0]["path"], "task": "gsm8k", "name": "a"},
                                          {"path": r["data"]["sources"][0]["path"], "task": "gsm8k", "name": "a"}]}),
     "eval.sources: task name(s) a used twice"),
    (lambda r: r["train"].update(lora={"r": 0}), "train.lora.r: must be > 0, got 0"),
    (lambda r: r["train"].update(lora={"rank": 8}), "unknown key train.lora.rank"),
    (lambda r: r["train"].update(lora={"target_modules": ["all-linear", "q_proj"]}),
     "train.lora.target_modules: module names, or [all-linear] alone"),
    (lambda r: (r["train"].update(lora={"merge": False}), r.update(eval={})),
     "train.lora.merge: false saves the adapters only, and eval scores Hugging Face models"),
    (lambda r: r["run"].update(trackers=["comet"]), "run.trackers[0]: 'comet' is not one of 'mlflow', 'tensorboard'"),
    (lambda r: r["run"].update(trackers=["mlflow"], storage="s3://bucket/runs"),
     "run.mlflow_tracking_uri: needed with mlflow when run.storage is an object store"),
    (lambda r: r.update(eval={"select_by": "pairs/acc"}),
     "eval.select_by: ranks the trials' eval results, but eval.policies does not list tune"),
    (lambda r: r.update(tune={}, eval={"policies": ["tune"], "select_by": "gsm8k/exact_match"}),
     "eval.select_by: 'gsm8k/exact_match' names no eval task; tasks are pairs"),
    (lambda r: r.update(tune={}, eval={"policies": ["tune"], "select_by": "pairs/exact_match"}),
     "eval.select_by: pairs reports acc, rewards/accuracies"),
    (lambda r: r.update(online={}), "missing required key online.prompts"),
    (lambda r: r.update(online={"prompts": [{"path": "/nope.jsonl"}]}),
     "online.prompts[0].path: no such file or folder: '/nope.jsonl'"),
    (lambda r: r.update(online={"prompts": [{"path": r["data"]["sources"][0]["path"]}], "labeller": "reward_model"}),
     "online.reward_model: needed with online.labeller reward_model"),
    (lambda r: r.update(online={"prompts": [{"path": r["data"]["sources"][0]["path"]}], "reward_model": "rm/"}),
     "online.reward_model: 'rm/' is set, but online.labeller is verifier"),
    (lambda r: r.update(online={"prompts": [{"path": r["data"]["sources"][0]["path"]}], "samples_per_prompt": 4,
                                "pairs_per_prompt": 3}),
     "online.pairs_per_prompt: 3 pairs need 6 samples (each in one pair), but online.samples_per_prompt is 4"),
    (lambda r: r.update(online={"prompts": [{"path": r["data"]["sources"][0]["path"]}], "samples_per_prompt": 1}),
     "online.samples_per_prompt: must be >= 2, got 1"),
    (lambda r: r.update(online={"prompts": [{"path": r["data"]["sources"][0]["path"], "prompt_template": "{q}"}]}),
     "online.prompts[0].prompt_template: must use {question} and no other placeholder"),
    (lambda r: r.update(online={"prompts": [{"path": r["data"]["sources"][0]["path"], "task": "multiple_choice",
                                             "prompt_template": "Q: {question}\nA:"}]}),
     "online.prompts[0].prompt_template: must use {question} and {choices} and no other placeholder"),
    (lambda r: r.update(online={"prompts": [{"path": r["data"]["sources"][0]["path"]}], "reference": "first"}),
     "online.reference: 'first' is not one of 'initial', 'previous'"),
])
def test_errors_name_the_key_and_value(tmp_path, base, mutate, message):
    mutate(base)
    with pytest.raises(ConfigError) as error:
        load(tmp_path, base)
    assert message in str(error.value)


def test_set_overrides_by_dotted_path(tmp_path, base):
    cfg = load(tmp_path, base, ["train.beta=0.25", "train.use_gpu=false", "data.sources.0.limit=5",
                                "reference.backend=hf"])
    assert cfg.train.beta == 0.25 and cfg.train.use_gpu is False
    assert cfg.data.sources[0].limit == 5 and cfg.reference.backend == "hf"
    with pytest.raises(ConfigError, match="unknown key train.bta"):
        load(tmp_path, base, ["train.bta=1"])
    with pytest.raises(ConfigError, match="data.sources has no item '3'"):
        load(tmp_path, base, ["data.sources.3.path=x"])


def test_cli_reports_config_errors_without_starting_ray(tmp_path, base, capsys, monkeypatch):
    from pipeline import runner

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run that cannot go ahead")

    monkeypatch.setattr(runner, "init_ray", no_ray)
    path = write_config(tmp_path / "c.yaml", base)
    assert main(["run", path, "--set", "train.beta=0"]) == 2
    assert "config error: train.beta: must be > 0, got 0" in capsys.readouterr().err
    assert main(["run", path, "--stages", "pairs,trian"]) == 2
    assert "unknown stage 'trian'; stages are pairs, reference, train, tune" in capsys.readouterr().err
    assert main(["run", path, "--stages", "tune"]) == 2
    assert "stage tune needs a `tune` section in the config" in capsys.readouterr().err


def test_copy_with_applies_dotted_changes_and_checks_them(tmp_path, base):
    cfg = load(tmp_path, base)
    trial = cfg.copy_with({"train.beta": 0.2, "train.dpop_lambda": 0.0, "data.sources.0.limit": 5})
    assert (trial.train.beta, trial.train.dpop_lambda, trial.data.sources[0].limit) == (0.2, 0.0, 5)
    assert (cfg.train.beta, cfg.train.dpop_lambda, cfg.data.sources[0].limit) == (0.1, 50.0, None)
    assert trial.run == cfg.run and trial.data.sources[0].path == cfg.data.sources[0].path
    with pytest.raises(ConfigError, match=r"^train.beta: must be > 0, got -1.0$"):
        cfg.copy_with({"train.beta": -1})
    with pytest.raises(ConfigError, match=r"^unknown key train.bta \(did you mean train.beta\?\)$"):
        cfg.copy_with({"train.bta": 0.2})
    with pytest.raises(ConfigError, match=r"^train.warmup_steps: 10 must be below train.max_steps 10$"):
        cfg.copy_with({"train.max_steps": 10})
    assert cfg.train.max_steps == 20
    # A sweep trial makes its config on any node, where the driver's input files need not exist.
    (tmp_path / "pairs.jsonl").unlink()
    assert cfg.copy_with({"train.beta": 0.3}).train.beta == 0.3


def test_config_docs_match_the_code():
    """docs/config.md and docs/config.schema.json are generated from pipeline/config.py, so they list every key with
    its current default, type and docstring."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("write_config_docs", REPO / "jobs" / "write_config_docs.py")
    docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs)
    undocumented = [f"{prefix}.{name}" for prefix, cls, _ in docs.sections() for name, field in cls.model_fields.items()
                    if not field.description]
    assert not undocumented, f"document these keys with a docstring under their declaration: {undocumented}"
    regenerate = "out of date: regenerate docs/ with .venv/bin/python jobs/write_config_docs.py"
    assert (REPO / "docs" / "config.md").read_text(encoding="utf-8") == docs.config_markdown(), regenerate
    assert (REPO / "docs" / "config.schema.json").read_text(encoding="utf-8") == docs.config_schema(), regenerate


def test_max_length_must_fit_the_models_context(tmp_path, base):
    import json

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 512}))
    base["model"]["name_or_path"] = str(model)
    base["data"].update(max_length=512, max_prompt_length=64)
    with pytest.raises(ConfigError, match="data.max_length: 512 does not fit the context length 512 of .* .the vllm "
                                          "backend needs one more position"):
        load(tmp_path, base)
    assert load(tmp_path, base, ["reference.backend=hf"]).data.max_length == 512  # hf scores exactly 512
    assert load(tmp_path, base, ["data.max_length=511"]).data.max_length == 511


def test_precision_warnings(tmp_path, base):
    from pipeline.config import config_warnings

    # The defaults: a bf16 reference for bf16 training on GPUs, nothing to say.
    assert config_warnings(load(tmp_path, base)) == []
    assert config_warnings(load(tmp_path, base, ["reference.dtype=float32", "train.use_gpu=false"])) == []
    overflow, mismatch = config_warnings(load(tmp_path, base, ["reference.dtype=float16"]))
    assert "float16 overflows" in overflow and "nonfinite_reference" in overflow
    assert "reference.dtype: float16 differs from the training precision bfloat16" in mismatch
    (mismatch,) = config_warnings(load(tmp_path, base, ["train.use_gpu=false"]))
    assert "bfloat16 differs from the training precision float32" in mismatch and "penalty" in mismatch


def test_concurrent_methods_without_methods_is_a_warning(tmp_path, base):
    from pipeline.config import config_warnings

    precision = ["reference.dtype=float32", "train.use_gpu=false"]  # (no precision warning)
    base["online"] = {"prompts": [{"path": base["data"]["sources"][0]["path"]}], "concurrent_methods": 3}
    (warning,) = config_warnings(load(tmp_path, base, precision))
    assert "online.concurrent_methods: 3, but online.methods lists 0 method(s)" in warning
    base["online"]["methods"] = [{"dpop_lambda": 0}, {"dpop_lambda": 50}]
    assert config_warnings(load(tmp_path, base, precision)) == []


def test_a_tracker_without_its_package_is_a_config_error(tmp_path, base):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=r"run.trackers: wandb needs the wandb package: pip install wandb"):
        load(tmp_path, base, ["run.trackers=[mlflow, wandb]"])
