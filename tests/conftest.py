import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The demo's 2-layer Llama and BPE tokenizer, built once per session (no download)."""
    from pipeline.demo import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session. 8 logical CPUs on 2 cores: train workers and data tasks all fit."""
    import ray

    from pipeline.runner import init_ray

    init_ray(num_cpus=8)
    yield
    ray.shutdown()


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"needs ../shared (real models and data) beside the repository; not found at {SHARED}")
    return SHARED


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def write_config(path, raw: dict) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return str(path)


def read_manifest(run_dir, stage) -> dict:
    with open(run_dir / stage / "_manifest.json") as f:
        return json.load(f)


def demo_config(tmp, model: str, name: str = "demo", n_pairs: int = 240, **train) -> str:
    """jobs/demo.yaml with its data (`n_pairs` pairs) written to `tmp`, its storage in `tmp/runs`, `model` as the
    model and some train keys overridden; returns the config file's path."""
    import yaml

    from pipeline.demo import write_demo_data

    data = write_demo_data(str(tmp / "data"), n_pairs=n_pairs)
    with open(REPO / "jobs" / "demo.yaml") as f:
        raw = yaml.safe_load(f)
    raw["run"].update(storage=str(tmp / "runs"), name=name)
    raw["run"].pop("num_cpus")  # the session's cluster is already up
    raw["model"]["name_or_path"] = model
    raw["data"]["sources"][0]["path"] = data["pairwise"]
    raw["data"]["sources"][1]["path"] = data["conversations"]
    raw["train"].update(train)
    return write_config(tmp / f"{name}.yaml", raw)


def saved_weights(folder) -> dict:
    """Every tensor of a saved policy folder, from all its safetensors files (each train worker writes its own)."""
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"{folder} holds no safetensors file"
    return {name: tensor for file in files for name, tensor in load_file(file).items()}


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
