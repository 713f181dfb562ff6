"""A driver killed (SIGKILL) in the middle of `pairs` and of `reference`: nothing half-done is taken as done, the
next run takes over the dead run's lock, and the reference pass scores only the pairs it had not written. The
transformers reference it ends with then gives step-1 parity in training."""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pyarrow.parquet as pq

from conftest import REPO, demo_config, read_manifest
from pipeline.cli import main


class Driver:
    """`dpop run` in its own process group, joined to the session's Ray cluster, its output collected."""

    def __init__(self, config: str, *args: str):
        import ray

        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        self.process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", config, *args], cwd=REPO, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    def kill_when(self, condition, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert self.process.poll() is None, "the run ended before it could be killed:\n" + "".join(self.lines)
            assert time.time() < deadline, "".join(self.lines)
            time.sleep(0.1)
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def finish(self, timeout: float = 600) -> None:
        assert self.process.wait(timeout) == 0, "".join(self.lines)


def test_killed_driver_during_pairs_and_reference(tmp_path, tiny_model, ray_cluster, capsys):
    # 480 pairs scored one sequence per forward: a reference pass of many seconds, written 40 pairs a file.
    config = demo_config(tmp_path, tiny_model, n_pairs=480, max_steps=1, warmup_steps=0, eval_every=0,
                         checkpoint_every=0)
    overrides = ["--stages", "pairs,reference", "--set", "reference.backend=hf", "--set", "reference.batch_size=40",
                 "--set", "reference.micro_batch_size=1", "--set", "reference.rows_per_file=40"]
    run = tmp_path / "runs" / "demo"

    def states() -> dict:
        capsys.readouterr()
        assert main(["status", config, *overrides[2:]]) == 0
        return {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]
                if line.split()[1] != "off"}

    first = Driver(config, *overrides)
    first.kill_when(lambda: any("pairs: running" in line for line in first.lines))
    assert states()["pairs"] == "missing"  # whatever it had written, it is not done

    second = Driver(config, *overrides)
    reference_files = lambda: list((run / "reference").glob("*.parquet")) if (run / "reference").exists() else []
    second.kill_when(lambda: len(reference_files()) >= 3)
    assert any("taking over the lock of a dead run" in line for line in second.lines)
    assert states() == {"pairs": "done", "reference": "missing", "train": "missing"}
    interrupted = len(reference_files())

    third = Driver(config, *overrides)
    third.finish()
    pairs, reference = read_manifest(run, "pairs"), read_manifest(run, "reference")
    # The same rows and drop counts as a clean run of the demo data.
    lines = sum(1 for name in ("pairwise.jsonl", "conversations.jsonl") for _ in open(tmp_path / "data" / name))
    assert pairs["records_in"] == lines and pairs["rows"] == lines - 4
    assert pairs["dropped"] == {"malformed_row": 1, "missing_field": 1, "identical": 1, "too_long": 1}
    # Fewer pairs scored the second time: the finished files of the killed run were kept.
    assert reference["resumed"]["pairs_kept"] >= 40 * (interrupted - 1)
    assert reference["resumed"]["pairs_scored"] == pairs["rows"] - reference["resumed"]["pairs_kept"] < pairs["rows"]
    assert any("resuming" in line for line in third.lines)
    scored = pq.read_table(run / "reference", columns=["pair_id"]).column(0).to_pylist()
    assert Counter(scored) == Counter(pq.read_table(run / "pairs", columns=["pair_id"]).column(0).to_pylist())
    assert reference["rows"] == pairs["rows"] and reference["dropped"] == {}
    assert not (run / "_lock.json").exists()
    assert json.loads((run / "reference" / "_manifest.json").read_text())["rows_in"] == pairs["rows"]

    # Step-1 parity with this transformers fp32 reference, as with vLLM's (tests/test_pipeline.py): the policy is
    # the reference, so the loss is log 2 (for any λ) and no pair is below the reference.
    assert main(["run", config, *overrides[2:], "--stages", "train", "--set", "train.dpop_lambda=0"]) == 0
    (first,) = [json.loads(line) for line in open(run / "train" / "metrics.jsonl")]
    assert abs(first["loss"] - math.log(2)) < 1e-3
    assert first["dpop/penalty_active"] == 0 and first["logps/ref_gap"] < 1e-3
    # Plain DPO (λ = 0) on pairs one number apart (median edit distance 1): the manifest warns and names DPOP.
    from pipeline.train.stage import low_edit_distance_warning

    assert low_edit_distance_warning(50.0, 1.0) is None and low_edit_distance_warning(0.0, 40.0) is None
    train = read_manifest(run, "train")
    assert train["median_edit_distance"] == 1.0
    (warning,) = train["warnings"]
    assert "plain DPO" in warning and "DPOP" in warning and "train.dpop_lambda" in warning
