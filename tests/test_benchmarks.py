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
