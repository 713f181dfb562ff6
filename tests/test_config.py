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


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["train"].update(betta=0.1), "unknown key train.betta (did you mean train.beta?)"),
    (lambda r: r.update(trainer={}), "unknown key trainer"),
    (lambda r: r["train"].update(beta="high"), "train.beta: expected float, got 'high'"),
    (lambda r: r["train"].update(beta=-1), "train.beta: must be > 0, got -1"),
    (lambda r: r["train"].update(dpop_lambda=-0.5), "train.dpop_lambda: must be >= 0, got -0.5"),
    (lambda r: r["train"].update(max_steps=True), "train.max_steps: expected int, got True"),
    (lambda r: r["reference"].update(backend="tgi") if "reference" in r else r.update(reference={"backend": "tgi"}),
     "reference.backend: 'tgi' is not one of 'vllm', 'hf'"),
    (lambda r: r["data"]["sources"][0].update(format="triples"), "data.sources[0].format: 'triples' is not one of"),
    (lambda r: r["data"]["sources"][0].update(path="/nope.jsonl"), "data.sources[0].path: no such file"),
    (lambda r: r["data"].update(sources=[]), "data.sources: needs at least one source"),
    (lambda r: r["train"].update(batch_size=10), "train.batch_size: 10 is not a multiple of"),
    (lambda r: r["run"].pop("name"), "missing required key run.name"),
    (lambda r: r["data"].update(eval_fraction=1.5), "data.eval_fraction: must be in [0, 1), got 1.5"),
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


def test_readme_config_reference_matches_the_code():
    """The README's table is `python -m pipeline.config`'s output, so it lists every key with its current default."""
    from conftest import REPO
    from pipeline.config import reference_markdown

    assert reference_markdown() in (REPO / "README.md").read_text(), "regenerate it: python -m pipeline.config"
