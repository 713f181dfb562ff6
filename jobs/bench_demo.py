"""The README's demo end to end, stage by stage, with its fixed costs apart from its work, against the same demo at
the commit before the performance work (issue 11), both measured here in one run.

    .venv/bin/python jobs/bench_demo.py [--before 78f1bda] [--no-before]

Each side builds the demo's models and data from scratch in a folder of its own (`python -m pipeline.demo`, timed)
and runs `jobs/dpo_vs_dpop.yaml`'s stages pairs, reference, tune, eval on a new local Ray cluster:
- now: in this process (`init_ray`, then `run_stages`), so that `ray.timeline()` (Ray's own task profiler) and the
  state API give each Ray Data task's and engine actor's spans, and each trial's `timings.json` (rank 0: process
  start, setup done, first step done, steps done, policy saved) its phases;
- before: `git worktree add` of that commit, its own `pipeline.demo` and `dpop run` as its jobs/demo.sh ran them
  (install aside), timed from outside; the stage times from its manifests.

Every second of a stage's wall time is given to one category, the most work-like one active at that moment:
- work: a Ray Data task; an engine's calls after its first (an engine's only call is work); a trial's steps
  after its first;
- first batch;
- model load: an engine actor's constructor (imports, weights, warm-up); a train worker's setup (model load and
  broadcast, data);
- process start: from the raylet launching the process to its constructor or train loop;
- save: a trial writing its policy;
- other: the driver (planning, Ray Data's scheduling, writes, plots).
Everything but work is a fixed cost: a run with more data or steps does not pay it again. Writes
jobs/benchmarks/demo.json.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
STAGES = ["pairs", "reference", "tune", "eval"]
CONFIG = os.path.join(REPO, "jobs", "dpo_vs_dpop.yaml")
# Most work-like first: an instant where several are active counts as the first of them.
CATEGORIES = ["work", "first batch", "model load", "process start", "save", "other"]


def build_demo(python: str, cwd: str, env: dict | None = None) -> float:
    """`python -m pipeline.demo .demo` in `cwd`; its seconds."""
    started = time.time()
    subprocess.run([python, "-m", "pipeline.demo", ".demo"], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.time() - started


def partition(window: tuple[float, float], intervals: list[tuple[float, float, str]]) -> dict[str, float]:
    """Seconds of `window` per category: each instant goes to the first category of CATEGORIES active then
    (an instant with none is `other`)."""
    start, end = window
    cuts = sorted({start, end, *(min(max(t, start), end) for a, b, _ in intervals for t in (a, b))})
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for left, right in zip(cuts, cuts[1:]):
        middle = (left + right) / 2
        active = {category for a, b, category in intervals if a <= middle < b}
        seconds[next((c for c in CATEGORIES if c in active), "other")] += right - left
    return {category: round(value, 2) for category, value in seconds.items()}


def actor_intervals(events: list[dict], workers: dict[str, dict], actor: str) -> list[tuple[float, float, str]]:
    """An engine actor's phases from Ray's timeline: process start (the raylet launching its worker process to
    the constructor), model load (the constructor), first batch, then work. A call is one block of rows
    (`submit`), several batches of it."""
    spans: dict[str, list[tuple[float, float, str]]] = {}
    for event in events:
        if event.get("ph") == "X" and event.get("cat", "").startswith(f"task::MapWorker(MapBatches({actor}))."):
            method = event["cat"].rsplit(".", 1)[1]
            if method in ("__init__", "submit"):
                begin = event["ts"] / 1e6
                spans.setdefault(event["tid"], []).append((begin, begin + event["dur"] / 1e6, method))
    intervals = []
    for worker, calls in spans.items():
        calls.sort()
        launched = workers.get(worker.removeprefix("worker:"), {}).get("worker_launch_time_ms")
        init = next((c for c in calls if c[2] == "__init__"), None)
        if init and launched:
            intervals.append((launched / 1e3, init[0], "process start"))
        batches = [c for c in calls if c[2] == "submit"]
        intervals += [(a, b, "model load") for a, b, m in calls if m == "__init__"]
        # The first call warms up (compiles, allocates) only where others follow; an actor's only call is its work.
        intervals += [(a, b, "first batch" if i == 0 and len(batches) > 1 else "work")
                      for i, (a, b, _) in enumerate(batches)]
    return intervals


def task_intervals(events: list[dict], window: tuple[float, float]) -> list[tuple[float, float, str]]:
    """Ray Data's map and read tasks in the window (tokenising, reading, writing): work."""
    out = []
    for event in events:
        if event.get("ph") == "X" and event.get("name", "").endswith("map_operator._map_task"):
            begin = event["ts"] / 1e6
            if window[0] <= begin <= window[1]:
                out.append((begin, begin + event["dur"] / 1e6, "work"))
    return out


# pipeline.train.metrics.PHASES (a train run's timings.json) by category.
PHASE_CATEGORY = {"worker_start": "process start", "setup": "model load", "first_step": "first batch",
                  "steps": "work", "save": "save"}


def trial_intervals(tune_folder: str) -> list[tuple[float, float, str]]:
    """Each trial's phases from its rank 0's timings.json."""
    from pipeline.train.metrics import PHASES

    out = []
    for path in glob.glob(os.path.join(tune_folder, "trials", "*", "timings.json")):
        with open(path) as f:
            marks = json.load(f)
        out += [(marks[a], marks[b], PHASE_CATEGORY[name]) for name, a, b in PHASES if a in marks and b in marks]
    return out


def run_now(folder: str) -> dict:
    import ray
    from ray.util.state import list_workers

    from pipeline.config import load_config
    from pipeline.runner import init_ray, run_stages

    os.chdir(folder)  # the config's relative paths (.demo/...) are relative to the working directory
    build_seconds = build_demo(sys.executable, folder)
    cfg = load_config(CONFIG, [f"run.storage={folder}/runs"])
    started = time.time()
    init_ray(cfg.run.ray_address, cfg.run.num_cpus)
    ray_start = time.time() - started
    manifests = run_stages(cfg, STAGES, STAGES)
    run_seconds = time.time() - started
    events = ray.timeline()
    workers = {w["worker_id"]: w for w in list_workers(detail=True, limit=10_000, raise_on_missing_output=False)}
    ray.shutdown()
    os.chdir(REPO)

    stages = {}
    for name in STAGES:
        manifest = manifests[name]
        begin = _unix(manifest["started_at"])
        window = (begin, begin + manifest["seconds"])
        if name == "pairs":
            intervals = task_intervals(events, window)
        elif name == "reference":
            intervals = actor_intervals(events, workers, "PairScorer")
        elif name == "eval":
            intervals = actor_intervals(events, workers, "EvalScorer")
        else:
            intervals = trial_intervals(os.path.join(folder, "runs", cfg.run.name, "tune"))
        stages[name] = {"seconds": manifest["seconds"], **partition(window, intervals)}
    fixed = ray_start + sum(s["seconds"] - s["work"] for s in stages.values())
    return {"build_seconds": round(build_seconds, 1), "ray_start_seconds": round(ray_start, 1),
            "run_seconds": round(run_seconds, 1), "stages": stages, "fixed_seconds": round(fixed, 1),
            "fixed_share_of_run": round(fixed / run_seconds, 3),
            "total_seconds": round(build_seconds + run_seconds, 1)}


def _unix(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def run_before(commit: str, folder: str) -> dict:
    """The demo at `commit`, in a worktree of it, with this environment's packages."""
    tree = os.path.join(folder, "repo")
    subprocess.run(["git", "worktree", "add", "--detach", tree, commit], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    try:
        # PYTHONPATH before the editable install's finder: the driver and every Ray worker import the old package.
        env = {**os.environ, "PYTHONPATH": tree}
        python = os.path.join(REPO, ".venv", "bin", "python")
        build_seconds = build_demo(python, tree, env)
        started = time.time()
        subprocess.run([python, "-m", "pipeline", "run", "jobs/dpo_vs_dpop.yaml", "--stages", ",".join(STAGES),
                        "--set", f"run.storage={folder}/runs"], cwd=tree, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run_seconds = time.time() - started
        stages = {}
        for name in STAGES:
            with open(os.path.join(folder, "runs", "dpo_vs_dpop", name, "_manifest.json")) as f:
                stages[name] = {"seconds": json.load(f)["seconds"]}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=REPO, check=False)
    return {"commit": commit, "build_seconds": round(build_seconds, 1), "run_seconds": round(run_seconds, 1),
            "stages": stages, "total_seconds": round(build_seconds + run_seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="78f1bda", help="the commit before the performance work")
    parser.add_argument("--no-before", action="store_true", help="measure only the current code")
    args = parser.parse_args()
    result = {"machine": f"{os.cpu_count()} CPUs"}
    with tempfile.TemporaryDirectory() as folder:
        if not args.no_before:
            print(f"[bench] the demo at {args.before} ...", flush=True)
            result["before"] = run_before(args.before, os.path.join(folder, "before"))
            print(f"[bench] before: {result['before']['total_seconds']} s", flush=True)
        os.makedirs(os.path.join(folder, "now"))
        print("[bench] the demo now ...", flush=True)
        result["now"] = run_now(os.path.join(folder, "now"))
    now = result["now"]
    if "before" in result:
        before = result["before"]
        result["speedup_total"] = round(before["total_seconds"] / now["total_seconds"], 2)
        result["speedup_run"] = round(before["run_seconds"] / now["run_seconds"], 2)
    with open(os.path.join(HERE, "benchmarks", "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")

    print(f"\n{'':<10} {'before s':>9} {'now s':>7} " + " ".join(f"{c:>13}" for c in CATEGORIES))
    rows = [("build", "build_seconds"), ("Ray start", "ray_start_seconds")]
    for label, key in rows:
        print(f"{label:<10} {result.get('before', {}).get(key, ''):>9} {now[key]:>7}")
    for name in STAGES:
        stage = now["stages"][name]
        was = result.get("before", {}).get("stages", {}).get(name, {}).get("seconds", "")
        print(f"{name:<10} {was:>9} {stage['seconds']:>7} " + " ".join(f"{stage[c]:>13}" for c in CATEGORIES))
    print(f"{'total':<10} {result.get('before', {}).get('total_seconds', ''):>9} {now['total_seconds']:>7}")
    print(f"fixed costs: {now['fixed_seconds']} s of the run's {now['run_seconds']} s "
          f"({100 * now['fixed_share_of_run']:.0f}%)")
    if "speedup_total" in result:
        print(f"speed-up: {result['speedup_total']}x end to end, {result['speedup_run']}x the stages alone")


if __name__ == "__main__":
    main()
