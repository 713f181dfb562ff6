"""Sampling k completions per prompt on both engines (the generation step of online rounds): vLLM's greedy samples
are transformers' greedy generation, and a seeded sample at temperature > 0 is the same twice, in any order or
batch, on either engine."""
import pytest
import ray

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17], [18, 19]]
SAMPLING = dict(max_new_tokens=12, stop=[], n=3, temperature=1.0, top_p=0.9, seed=7)


@ray.remote(num_cpus=1, max_calls=1, runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}})
def vllm_samples(model: str) -> dict:
    """In a Ray task: a clean interpreter, as in the reference and eval actors. max_calls=1: the worker exits
    after it, so no later vLLM engine lands in a process that already ran one (vLLM keeps process-wide state)."""
    from pipeline.engines import VLLMEngine

    engine = VLLMEngine(model=model, tokenizer=None, dtype="float32", tensor_parallel_size=1,
                        gpu_memory_utilization=0.2, max_model_len=64, max_num_batched_tokens=8192,
                        enforce_eager=True, trust_remote_code=False, seed=0)
    return {"greedy": engine.generate(PROMPTS, max_new_tokens=12, stop=[], n=2),
            "sampled": engine.generate(PROMPTS, **SAMPLING),
            "again_reversed": engine.generate(PROMPTS[::-1], **SAMPLING)[::-1],
            "other_seed": engine.generate(PROMPTS, **{**SAMPLING, "seed": 8})}


@pytest.fixture(scope="module")
def engines(tiny_model, ray_cluster):
    from pipeline.engines import HFEngine

    return ray.get(vllm_samples.remote(tiny_model)), HFEngine(tiny_model, "float32", False, 2, False)


def test_vllm_greedy_samples_are_transformers_greedy_generation(engines):
    vllm, hf = engines
    assert vllm["greedy"] == hf.generate(PROMPTS, max_new_tokens=12, stop=[], n=2)
    assert all(a == b and a for a, b in vllm["greedy"])  # n greedy samples of a prompt are one answer n times


def test_a_seeded_sample_is_the_same_twice_in_any_order_on_either_engine(engines):
    vllm, hf = engines
    assert vllm["sampled"] == vllm["again_reversed"]
    assert vllm["other_seed"] != vllm["sampled"]
    assert all(len(samples) == 3 for samples in vllm["sampled"])
    assert any(len(set(samples)) > 1 for samples in vllm["sampled"]), "temperature 1 gave no different samples"
    sampled = hf.generate(PROMPTS, **SAMPLING)
    assert sampled == hf.generate(PROMPTS[::-1], **SAMPLING)[::-1]
    assert sampled != hf.generate(PROMPTS, **{**SAMPLING, "seed": 8})
    assert any(len(set(samples)) > 1 for samples in sampled)
