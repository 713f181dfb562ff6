"""Time the pairs stage on jobs/bench_pairs.yaml and write the figures to jobs/benchmarks/pairs.json.

    .venv/bin/python jobs/bench_pairs.py

Runs `dpop run --stages pairs --force pairs` in this process on a new local Ray cluster, so the wall time includes
Ray's start, reading, tokenizing, edit distances, writing Parquet and the histograms.
"""
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    os.chdir(os.path.dirname(HERE))
    from pipeline.config import load_config
    from pipeline.runner import run_stages

    cfg = load_config(os.path.join(HERE, "bench_pairs.yaml"))
    started = time.time()
    manifest = run_stages(cfg, ["pairs"], force=["pairs"])["pairs"]
    wall = time.time() - started
    figures = {
        "pairs": manifest["rows"],
        "records_in": manifest["records_in"],
        "dropped": manifest["dropped"],
        "wall_seconds": round(wall, 1),
        "stage_seconds": manifest["seconds"],
        "pairs_per_second": round(manifest["rows"] / wall, 1),
        "median_edit_distance": {s: {split: q["p50"] for split, q in v.items()}
                                 for s, v in manifest["edit_distance"]["by_source"].items()},
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        "versions": manifest["versions"],
    }
    os.makedirs(os.path.join(HERE, "benchmarks"), exist_ok=True)
    with open(os.path.join(HERE, "benchmarks", "pairs.json"), "w") as f:
        json.dump(figures, f, indent=2)
    json.dump(figures, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
