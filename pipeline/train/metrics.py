"""What a train run records and tells: metrics.jsonl, progress lines, and timings.json (where its time goes)."""
import json
import sys

from pipeline import storage


def say(message: str) -> None:
    """Progress from a worker. Ray Train's print patch would echo a plain print twice; this writes it once."""
    print(f"[dpop] train: {message}", file=sys.__stdout__, flush=True)


class MetricsLog:
    """metrics.jsonl, written whole by rank 0 at every logged step so it is complete on any storage."""

    def __init__(self, uri: str, keep_until_step: int | None):
        self.uri = uri
        text = storage.read_text(uri) if keep_until_step else None
        rows = [json.loads(line) for line in (text or "").splitlines() if line.strip()]
        self.rows = [r for r in rows if r["step"] <= (keep_until_step or 0)]

    def write(self, row: dict) -> None:
        self.rows.append(row)
        storage.write_text(self.uri, "".join(json.dumps(r) + "\n" for r in self.rows))


def read_metrics(out: str) -> list[dict]:
    text = storage.read_text(storage.join(out, "metrics.jsonl")) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# A run's phases in timings.json (rank 0's Unix times): (name, from mark, to mark). All but `steps` are fixed costs.
PHASES = (("worker_start", "process_started", "loop_entered"), ("setup", "loop_entered", "setup_done"),
          ("first_step", "setup_done", "first_step_done"), ("steps", "first_step_done", "steps_done"),
          ("save", "steps_done", "policy_saved"))


def phase_seconds(out: str) -> dict | None:
    """Seconds per phase of the run in `out` (worker start: the process's start to the train loop, its imports
    included; setup: model load, shard and broadcast, optimizer, checkpoint restore, pairs), from timings.json."""
    marks = storage.read_json(storage.join(out, "timings.json"))
    if not marks:
        return None
    return {name: round(marks[b] - marks[a], 2) for name, a, b in PHASES if a in marks and b in marks}
