"""The GPU benchmark's code runs here too (a 2-layer model on CPU), so it is ready the day a GPU is."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_every_variant_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, "jobs/bench_gpu.py", "--tiny", "--device", "cpu", "--steps", "1",
                          "--warmup", "0", "--pairs-per-step", "8", "--micro-batch", "4", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert [v["variant"] for v in figures["variants"]] == ["full_logits", "padded", "packed"]
    assert all(v["seconds_per_step"] > 0 and v["pair_tokens_per_second_per_gpu"] > 0 for v in figures["variants"])
    assert "packed" in run.stdout


def test_demo_benchmark_gives_each_second_to_one_category():
    """jobs/bench_demo.py's split of a stage's wall time, against a hand count: overlapping phases (two trials at
    once) count once, as the most work-like phase active, and the categories add up to the window."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_demo", REPO / "jobs" / "bench_demo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    intervals = [(1, 4, "process start"), (2, 6, "model load"),  # trial A: start 1-4, load 2-6
                 (5, 7, "work"), (3, 5.5, "work"),                # trial B's steps overlap A's load
                 (8, 12, "save"), (11, 20, "first batch")]        # the last runs past the window
    seconds = bench.partition((0, 15), intervals)
    # Hand count, instant by instant: 0-1 other, 1-2 process start, 2-3 model load (beats process start),
    # 3-7 work, 7-8 other, 8-11 save, 11-15 first batch (beats save).
    assert seconds == {"work": 4.0, "first batch": 4.0, "model load": 1.0, "process start": 1.0, "save": 3.0,
                       "other": 2.0}
    assert sum(seconds.values()) == 15


BARE_GPU_MACHINE = """
import runpy, sys
# What the GPU machine lacks (it has only torch, transformers and their dependencies): a None entry makes an import
# fail and importlib.util.find_spec answer None, as for a module that is not installed.
sys.modules.update(dict.fromkeys(["pyarrow", "ray", "vllm", "pydantic", "pandas"]))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_gpu_check_runs_with_only_torch_and_transformers(tmp_path):
    """jobs/gpu_check.py on tiny shapes on CPU, with Ray, vLLM, pyarrow, pydantic and pandas unimportable: every part
    runs, the bf16 parity compares both references, and the sharded save gives back every tensor exactly."""
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, "-c", BARE_GPU_MACHINE, "jobs/gpu_check.py", "--tiny", "--device", "cpu",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert [v["variant"] for v in parts["step"]["variants"]] == ["full_logits", "padded", "packed"]
    assert set(parts["bf16_parity"]["references"]) == {"fp32 transformers", "bf16 transformers"}
    assert all(r["pairs"] == 64 for r in parts["bf16_parity"]["references"].values())
    saved = parts["sharded_load_save"]
    assert saved["save"]["files"] > 1 and saved["compare"]["all_equal"], saved
