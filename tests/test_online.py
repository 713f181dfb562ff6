"""Online rounds: the generate stage samples k completions of each problem, seeded, and counts every problem it
cannot use."""
import json

import pyarrow.parquet as pq

from conftest import write_config, write_jsonl
from pipeline.config import load_config

PROBLEMS = [
    {"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "What is 4 plus 4?", "answer": 8},
    {"question": "What is 10 minus 1?", "answer": "9"},
    {"question": "What is 1 plus 1?", "answer": "two, I think"},
    {"question": "What is 7 plus 1?"},
    {"question": "  ", "answer": "#### 3"},
]


def online_config(tmp_path, tiny_model, **online):
    return load_config(write_config(tmp_path / "online.yaml", {
        "run": {"name": "online", "storage": str(tmp_path / "runs")},
        "model": {"name_or_path": tiny_model},
        "data": {"sources": [{"path": str(write_jsonl(tmp_path / "pairs.jsonl", [
            {"prompt": "a", "chosen": "b", "rejected": "c"}])), "format": "pairwise"}],
                 "max_prompt_length": 32, "max_length": 64},
        "reference": {"backend": "hf", "dtype": "float32", "use_gpu": False},
        "online": {"prompts": [{"path": str(write_jsonl(tmp_path / "problems.jsonl", PROBLEMS))}],
                   "samples_per_prompt": 4, "max_new_tokens": 12, "temperature": 1.0, **online},
    }))


def test_generate_samples_k_completions_per_problem_seeded_and_counts_the_rest(tmp_path, tiny_model, ray_cluster):
    from pipeline.generate import generate_samples
    from pipeline.runner import StageContext

    cfg = online_config(tmp_path, tiny_model)
    outputs = []
    for attempt in ("first", "again"):
        out = tmp_path / attempt
        manifest = generate_samples(cfg, StageContext(out=str(out), inputs={}, fingerprint=""))
        outputs.append(sorted(pq.read_table(out).to_pylist(), key=lambda row: row["prompt_id"]))
    assert manifest["rows"] == 3 and manifest["rows_in"] == 6
    assert manifest["dropped"] == {"no_gold_answer": 2, "missing_field": 1}
    assert "two, I think" in json.dumps(manifest["drop_examples"])
    assert manifest["sampling"]["n"] == 4 and manifest["sampling"]["temperature"] == 1.0
    assert manifest["sampling"]["seed"] == 0 and manifest["completion_tokens"] > 0
    first, again = outputs
    assert first == again  # seeded: the same samples twice
    assert sorted(row["gold"] for row in first) == ["5", "8", "9"]
    assert all(len(row["completions"]) == 4 for row in first)
    assert any(len(set(row["completions"])) > 1 for row in first)
    other = generate_samples(online_config(tmp_path, tiny_model, seed=1),
                             StageContext(out=str(tmp_path / "other"), inputs={}, fingerprint=""))
    assert other["rows"] == 3
    assert sorted(pq.read_table(tmp_path / "other").to_pylist(), key=lambda row: row["prompt_id"]) != first
