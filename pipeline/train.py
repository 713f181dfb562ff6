"""`train` stage: the DPOP policy update on Ray Train (`TorchTrainer`) with FSDP2.

Driver (`train_policy`): reference Parquet -> train/eval Arrow tables in the object store (`load_pairs`)
    -> TorchTrainer(train_loop) -> curves PNG.
Each worker (`train_loop`), top to bottom:
    setup (load_policy: built on the meta device, parallelized with FSDP2, each rank's shard filled from rank 0's
    read, dropout off; AdamW + warm-up/decay) -> restore_checkpoint
    -> the train split into memory (TrainPairs), globally shuffled per epoch by `stream_indices`
    -> per step (`train_step`): micro-batches (`forward_backward_step`: chosen and rejected in one forward,
       dpop_loss, backward) -> clip, step -> metrics (all-reduced) -> `evaluate` / `save_checkpoint` when due
    -> `save_policy`: gather the full weights and save the policy in Hugging Face format.

Exact resume: step s always trains on positions [(s - 1) * batch_size, s * batch_size) of the one seeded stream,
so a run resumed from its step-k checkpoint (model, optimizer, schedule, RNG) continues as if never stopped.
"""
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

from pipeline import storage
from pipeline.config import Config, config_warnings, training_dtype
from pipeline.pairs import LOW_EDIT_DISTANCE
from pipeline.tracking import Trackers, run_params

TRAIN_COLUMNS = ["pair_id", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logp", "ref_rejected_logp"]
# Per-pair statistics summed on every worker, all-reduced, then divided by the pair count.
STAT_KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "dpop/penalty", "dpop/penalty_active", "logps/ref_gap"]
# Every metric a train run reports, by the name `tune.metric` and metrics.jsonl use.
REPORTED_METRICS = (*STAT_KEYS, *(f"eval/{key}" for key in STAT_KEYS), "learning_rate", "grad_norm",
                    "epoch", "peak_memory_mb")
# A chosen log-prob counts as below the reference (dpop/penalty_active) only beyond this many nats: the two
# backends' float rounding (seen: under 1e-5 nats in fp32 on the tiny model, 3.4e-4 on SmolLM2-135M) is not a
# drop, and would otherwise make a policy identical to the reference look half "active" at step 1.
PENALTY_ACTIVE_NATS = 1e-3


def say(message: str) -> None:
    """Progress from a worker. Ray Train's print patch would echo a plain print twice; this writes it once."""
    print(f"[dpop] train: {message}", file=sys.__stdout__, flush=True)


def parallelize(model, mesh, mixed_precision: bool, activation_checkpointing: bool) -> None:
    """All parallelism in one place: FSDP2 `fully_shard` on each decoder layer, then on the root.

    Sharding layer by layer lets FSDP2 gather one layer's weights at a time. With `mixed_precision`, compute runs
    in bf16 while parameters, gradients' reduction and optimizer state stay fp32.
    """
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision else MixedPrecisionPolicy())
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); cannot shard it")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def disable_dropout(model) -> None:
    """Dropout off, as TRL does: with it the policy scores a pair differently from the reference (and from itself)
    at step 0, and DPOP's one-sided penalty pushes on that noise. Covers nn.Dropout modules and the attention
    dropout rate that transformers' attention layers keep as a float."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if isinstance(getattr(model.config, "attention_dropout", None), float):
        model.config.attention_dropout = 0.0


def lr_lambda(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine or linear decay to 0, or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


@functools.lru_cache(maxsize=2)
def epoch_permutation(num_pairs: int, seed: int, epoch: int):
    import numpy as np

    return np.random.default_rng([seed, epoch]).permutation(num_pairs)


def stream_indices(num_pairs: int, seed: int, start: int, count: int):
    """Pair indices at positions [start, start + count) of the training stream.

    The stream is epoch after epoch of all pairs, each epoch in its own order drawn from (seed, epoch): a global
    shuffle, every pair once per epoch, and any position found without replaying those before it, which is what
    makes a resumed run continue exactly where its checkpoint left off.
    """
    import numpy as np

    pieces, position, end = [], start, start + count
    while position < end:
        epoch, offset = divmod(position, num_pairs)
        take = min(end - position, num_pairs - offset)
        pieces.append(epoch_permutation(num_pairs, seed, epoch)[offset:offset + take])
        position += take
    return np.concatenate(pieces)


class TrainPairs:
    """One split's pairs in this worker's memory (token ids and reference log-probs), taken from the object store.

    Rows are sorted by pair id, so every worker and every rerun index the same pairs the same way whatever order
    the reference stage wrote them in. Each worker holds the train split: 4 bytes a token for each of the three id
    arrays plus a few hundred bytes a pair; read once, so no epoch re-executes a read.
    """

    def __init__(self, table):
        import numpy as np

        columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in TRAIN_COLUMNS}
        # Identical pairs share a pair id; their reference log-probs break the tie.
        order = np.lexsort((columns["ref_rejected_logp"], columns["ref_chosen_logp"], columns["pair_id"]))
        self.columns = {name: [values[i] for i in order] for name, values in columns.items()}
        self.num_pairs = len(order)

    def batch(self, indices) -> dict:
        return {name: [values[i] for i in indices] for name, values in self.columns.items()}

    def length(self, index: int) -> int:
        """Tokens of pair `index` in the packed layout: prompt, chosen and rejected."""
        return sum(len(self.columns[name][index]) for name in ("prompt_ids", "chosen_ids", "rejected_ids"))

    def worker_batches(self, rank: int, world: int, batch_size: int) -> list[dict]:
        """This worker's equal share (the remainder is left out, as eval_accounting records) in batches. Every
        worker gets the same number of batches: FSDP's forward is a collective, so none may run one more."""
        share = self.num_pairs // world
        indices = range(rank * share, (rank + 1) * share)
        return [self.batch(indices[i:i + batch_size]) for i in range(0, share, batch_size)]


def concatenated_forward(model, batch: dict, pad_id: int, layout: str, device):
    """Policy log-probs of chosen and rejected completions, both in one forward pass.

    The one owner of the pair layout: each pair is a group (prompt, [chosen, rejected]) of pipeline.logprobs, so
    the scores come back chosen, rejected, chosen, rejected, ..."""
    from pipeline.logprobs import completion_logps, make_batch

    groups = [(prompt.tolist(), [chosen.tolist(), rejected.tolist()])
              for prompt, chosen, rejected in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])]
    logps = completion_logps(model, make_batch(groups, pad_id, layout).to(device)).view(-1, 2)
    return logps[:, 0], logps[:, 1]


def dpop_step_stats(worker: "Worker", batch: dict):
    """Forward one micro-batch; return the per-pair losses (with grad) and the summed statistics of STAT_KEYS."""
    import torch

    from pipeline.loss import dpop_loss

    t, device = worker.cfg.train, worker.device
    policy_chosen, policy_rejected = concatenated_forward(worker.model, batch, worker.pad_id, worker.layout, device)
    ref_chosen = torch.tensor(batch["ref_chosen_logp"], dtype=torch.float32, device=device)
    ref_rejected = torch.tensor(batch["ref_rejected_logp"], dtype=torch.float32, device=device)
    out = dpop_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, t.beta, t.dpop_lambda)
    ref_gap = ((policy_chosen.detach() - ref_chosen).abs() + (policy_rejected.detach() - ref_rejected).abs()) / 2
    sums = torch.stack([
        out.losses.detach().sum(),
        out.chosen_rewards.sum(),
        out.rejected_rewards.sum(),
        (out.chosen_rewards > out.rejected_rewards).float().sum(),
        (out.chosen_rewards - out.rejected_rewards).sum(),
        policy_chosen.detach().sum(),
        policy_rejected.detach().sum(),
        out.penalty.sum(),
        (out.penalty > PENALTY_ACTIVE_NATS).float().sum(),
        ref_gap.sum(),
        torch.tensor(float(len(ref_chosen)), device=device),
    ])
    return out.losses, sums


def reduce_stats(sums, prefix: str = "") -> dict:
    """All-reduce the summed statistics over workers and turn them into means per pair."""
    import torch.distributed as dist

    dist.all_reduce(sums)
    values = sums.tolist()
    count = values[-1]
    return {prefix + key: value / count for key, value in zip(STAT_KEYS, values[:-1])}


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


class EarlyStopping:
    """train.early_stopping: the best value of the watched eval metric, its step, and the evaluations since. The
    metric is all-reduced, so every worker takes the same decisions."""

    def __init__(self, section):
        self.section = section
        self.best, self.best_step, self.evaluations_since_best = None, None, 0

    def update(self, metrics: dict, step: int) -> bool:
        """Record an evaluation; True when it is the best so far."""
        value = metrics[self.section.metric]
        sign = 1 if self.section.mode == "max" else -1
        if self.best is None or sign * (value - self.best) > self.section.min_delta:
            self.best, self.best_step, self.evaluations_since_best = value, step, 0
            return True
        self.evaluations_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.evaluations_since_best >= self.section.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "evaluations_since_best": self.evaluations_since_best}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.evaluations_since_best = state["evaluations_since_best"]


@dataclass
class Worker:
    """What one Ray Train worker holds: the sharded policy, its optimizer and schedule, and its place in the group."""
    cfg: Config
    model: object
    optimizer: object
    scheduler: object
    tokenizer: object
    pad_id: int
    device: object
    rank: int
    world: int
    saved_dtype: object
    """The dtype the model was saved in; the final policy is written back in it."""
    layout: str
    """train.layout where the model's attention supports it, else `padded` (pipeline.logprobs.layout_for)."""
    parameters: dict
    """{"trainable": ..., "total": ...}: with LoRA, trainable counts the adapters only."""
    early_stopping: EarlyStopping | None = None


def add_adapters(model, lora):
    """`model` with peft LoRA adapters (`train.lora`) on its target layers; only the adapters require grad. The
    base model's weights are untouched, so the policy starts equal to the reference (each B is zero)."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=targets, bias="none", task_type="CAUSAL_LM"))


def load_policy(path: str, trust_remote_code: bool, mesh, device, mixed_precision: bool,
                activation_checkpointing: bool, lora=None):
    """The policy, sharded, without any rank but 0 ever holding all of it (as torchtitan and torchtune load).

    Every rank builds the model on the meta device (no memory), shards it (`parallelize`) and allocates only its
    shard; rank 0 reads the weights and `set_model_state_dict` broadcasts them, each rank keeping its part.
    Non-persistent buffers (rotary frequencies) are in no state dict: rank 0's, computed at load, are broadcast.
    Weights load in fp32; bf16 compute comes from FSDP2's mixed-precision policy. Dropout is off. With `lora`,
    adapters are added on every rank before sharding, and rank 0's freshly initialised ones are broadcast too.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    rank = dist.get_rank()
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    disable_dropout(model)
    if lora:
        model = add_adapters(model, lora)
    persistent = set(model.state_dict())
    parallelize(model, mesh, mixed_precision=mixed_precision, activation_checkpointing=activation_checkpointing)
    model.to_empty(device=device)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code) \
        if rank == 0 else None
    if full is not None and lora:
        full = add_adapters(full, lora)
    set_model_state_dict(model, full.state_dict() if full else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    loaded_buffers = dict(full.named_buffers()) if full else {}
    for name, buffer in model.named_buffers():
        if name not in persistent:
            value = loaded_buffers[name].to(device) if full else torch.empty_like(buffer)
            dist.broadcast(value, src=0)
            buffer.copy_(value)
    return model, config.dtype


def setup(cfg: Config) -> Worker:
    """The sharded policy (`load_policy`), its tokenizer, and AdamW with the warm-up/decay schedule."""
    import ray.train
    import ray.train.torch
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoTokenizer

    from pipeline.logprobs import layout_for

    t, remote_code = cfg.train, cfg.model.trust_remote_code
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)
    model, saved_dtype = load_policy(cfg.model.name_or_path, remote_code, init_device_mesh(device.type, (world,)),
                                     device, mixed_precision=training_dtype(cfg) == "bfloat16",
                                     activation_checkpointing=t.activation_checkpointing, lora=t.lora)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.name_or_path,
                                              trust_remote_code=remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # With LoRA only the adapters require grad: only they get gradients and AdamW state.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.lr_schedule))
    early_stopping = EarlyStopping(t.early_stopping) if t.early_stopping else None
    layout = layout_for(model, t.layout)
    if rank == 0 and layout != t.layout:
        say(f"train.layout {t.layout} needs sdpa attention; {model.config._attn_implementation} uses {layout}")
    parameters = {"trainable": sum(p.numel() for p in trainable), "total": sum(p.numel() for p in model.parameters())}
    if rank == 0:
        say(f"{parameters['trainable']:,} of {parameters['total']:,} parameters train"
            + (f" (LoRA r={t.lora.r} on {', '.join(t.lora.target_modules)})" if t.lora else ""))
    return Worker(cfg, model, optimizer, scheduler, tokenizer, pad_id, device, rank, world, saved_dtype, layout,
                  parameters, early_stopping)


TRAINER_STATE = "trainer_state.json"


def save_checkpoint(worker: Worker, step: int, metrics: dict) -> None:
    """A sharded DCP checkpoint of model and optimizer, the schedule, the data position and every worker's RNG
    state, reported to Ray Train (which keeps the newest train.keep_checkpoints)."""
    import ray.train
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    with tempfile.TemporaryDirectory() as folder:
        model_state, optim_state = get_state_dict(worker.model, worker.optimizer)
        # Every worker writes its own shard files; Ray merges the workers' folders into one checkpoint.
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
        torch.save(torch.get_rng_state(), os.path.join(folder, f"rng_state_rank{worker.rank}.pt"))
        if worker.rank == 0:
            with open(os.path.join(folder, TRAINER_STATE), "w") as f:
                json.dump({"step": step, "scheduler": worker.scheduler.state_dict(),
                           "pairs_consumed": step * worker.cfg.train.batch_size, "epoch": metrics["epoch"],
                           "early_stopping": worker.early_stopping.state_dict() if worker.early_stopping else None},
                          f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"step_{step:06d}")


def restore_checkpoint(worker: Worker) -> int:
    """Load the newest checkpoint Ray Train hands this run (after a crash, a lost worker or a rerun of an
    unfinished stage) and return its step; 0 when there is none."""
    import ray.train
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as folder:
        model_state, optim_state = get_state_dict(worker.model, worker.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(worker.model, worker.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        with open(os.path.join(folder, TRAINER_STATE)) as f:
            trainer_state = json.load(f)
        rng_path = os.path.join(folder, f"rng_state_rank{worker.rank}.pt")
        if os.path.exists(rng_path):  # absent when the worker count changed: a fresh seed is all that is left
            torch.set_rng_state(torch.load(rng_path))
    worker.scheduler.load_state_dict(trainer_state["scheduler"])
    if worker.early_stopping and trainer_state.get("early_stopping"):
        worker.early_stopping.load_state_dict(trainer_state["early_stopping"])
    step = trainer_state["step"]
    if trainer_state["pairs_consumed"] != step * worker.cfg.train.batch_size:
        raise ValueError(f"checkpoint at step {step} consumed {trainer_state['pairs_consumed']} pairs, not "
                         f"{step} * train.batch_size; it belongs to another configuration")
    if worker.rank == 0:
        say(f"resuming from step {step} (epoch {trainer_state['epoch']}, {trainer_state['pairs_consumed']} pairs "
            f"consumed)")
    return step


def forward_backward_step(worker: Worker, batch: dict, last_micro_batch: bool):
    """One micro-batch: forward, DPOP loss, backward. Gradients reduce-scatter only on the step's last one."""
    t = worker.cfg.train
    worker.model.set_requires_gradient_sync(last_micro_batch)
    losses, sums = dpop_step_stats(worker, batch)
    # Sum over this worker's pairs / its pairs per step; FSDP averages over workers: a mean per pair.
    (losses.sum() / (t.batch_size // worker.world)).backward()
    return sums


def train_step(worker: Worker, pairs: TrainPairs, step: int) -> dict:
    """One optimizer step on global batch `step` of the stream: this worker's slice of it, in micro-batches."""
    import torch

    t = worker.cfg.train
    per_worker = t.batch_size // worker.world
    start = (step - 1) * t.batch_size + worker.rank * per_worker
    # Micro-batches of similar length: the step's pairs (and so its gradient) stay the same, and a micro-batch
    # pads (or packs) to less.
    indices = sorted(stream_indices(pairs.num_pairs, worker.cfg.run.seed, start, per_worker), key=pairs.length)
    step_sums = None
    for micro_start in range(0, per_worker, t.micro_batch_size):
        batch = pairs.batch(indices[micro_start:micro_start + t.micro_batch_size])
        last = micro_start + t.micro_batch_size >= per_worker
        sums = forward_backward_step(worker, batch, last)
        step_sums = sums if step_sums is None else step_sums + sums
    grad_norm = torch.nn.utils.clip_grad_norm_(worker.model.parameters(), t.max_grad_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if not torch.isfinite(grad_norm):
        # A step on inf/NaN gradients (or a NaN loss) would leave NaN weights and train on silently. The norm is
        # global, the same on every worker, so all of them stop here together.
        raise FloatingPointError(f"non-finite gradient norm at step {step} (beta={t.beta}, "
                                 f"dpop_lambda={t.dpop_lambda}, learning_rate={t.learning_rate})")
    lr = worker.scheduler.get_last_lr()[0]
    worker.optimizer.step()
    worker.scheduler.step()
    worker.optimizer.zero_grad(set_to_none=True)
    epoch = (step - 1) * t.batch_size // pairs.num_pairs
    return {"step": step, "epoch": epoch, "learning_rate": lr, "grad_norm": grad_norm.item(),
            "peak_memory_mb": peak_memory_mb(worker.device), **reduce_stats(step_sums)}


def peak_memory_mb(device) -> float:
    """The largest worker's peak memory so far: allocated GPU memory, or on CPU the process's peak resident set
    (which includes the Python runtime and libraries, about 0.5 GB here)."""
    import resource

    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kilobytes on Linux
    value = torch.tensor(float(peak), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return round(value.item(), 1)


def evaluate(worker: Worker, eval_batches: list[dict]) -> dict:
    """The same statistics on this worker's share of the eval split, all-reduced, prefixed `eval/`."""
    import torch

    worker.model.eval()
    total = None
    with torch.no_grad():
        for batch in eval_batches:
            _, sums = dpop_step_stats(worker, batch)
            total = sums if total is None else total + sums
    worker.model.train()
    return reduce_stats(total, prefix="eval/")


def save_policy(worker: Worker, out: str) -> None:
    """Gather the sharded weights (a collective: every worker takes part); rank 0 writes the HF model as model/.
    With LoRA: the adapters as adapter/ (peft format), and with train.lora.merge the merged model as model/."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full_state = get_model_state_dict(worker.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if worker.rank != 0:
        return
    lora = worker.cfg.train.lora
    if lora:
        with tempfile.TemporaryDirectory() as folder:
            worker.model.save_pretrained(folder, state_dict=full_state)  # peft keeps the adapters' entries only
            storage.upload_dir(folder, storage.join(out, "adapter"))
        say(f"saved the adapters to {storage.join(out, 'adapter')}")
        if not lora.merge:
            return
        policy = merged_policy(worker.cfg, full_state)
        full_state = policy.state_dict()
    else:
        policy = worker.model
    full_state = {k: v.to(worker.saved_dtype) for k, v in full_state.items()}
    with tempfile.TemporaryDirectory() as folder:
        policy.save_pretrained(folder, state_dict=full_state)
        worker.tokenizer.save_pretrained(folder)
        storage.upload_dir(folder, storage.join(out, "model"))
    say(f"saved the policy to {storage.join(out, 'model')}")


def merged_policy(cfg: Config, adapted_state: dict):
    """The base model with the trained adapters folded into its weights (W + alpha / r * B @ A), on the CPU: a
    plain transformers model that `from_pretrained` and vLLM load without peft."""
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32,
                                                trust_remote_code=cfg.model.trust_remote_code)
    adapted = add_adapters(base, cfg.train.lora)
    adapted.load_state_dict(adapted_state)
    return adapted.merge_and_unload()


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: setup, resume, the steps with their logging, evaluation and checkpoints,
    then the final policy."""
    import ray
    import ray.train
    import ray.util

    # Ray Train logs every report call, metrics and all, at INFO on a logger named by its file path (not under
    # "ray.train"), which only the root level reaches. Our own progress lines are printed.
    logging.getLogger().setLevel(logging.WARNING)
    cfg, out = loop_config["config"], loop_config["out"]
    t = cfg.train
    # Where the run's time goes, as Unix times, for timings.json: this process's start (Ray Train starting the
    # worker), then each phase's end. All but the steps are fixed costs that a longer run does not repeat.
    marks = {"process_started": psutil.Process().create_time(), "loop_entered": time.time()}
    worker = setup(cfg)
    start_step = restore_checkpoint(worker)
    metrics_log = MetricsLog(storage.join(out, "metrics.jsonl"), start_step) if worker.rank == 0 else None
    tracking = loop_config["tracking"]
    trackers = Trackers(cfg, out, tracking["name"], tracking["params"]) \
        if worker.rank == 0 and cfg.run.trackers else None
    # The workers' placement group, reported so that a sweep can free it if Tune ends this run early.
    placement_group = ray.util.get_current_placement_group()
    reported = {"placement_group": placement_group.id.hex()} if placement_group else {}

    pairs = TrainPairs(ray.get(loop_config["pairs"]["train"]))
    eval_batches = []
    if "eval" in loop_config["pairs"]:
        eval_batches = TrainPairs(ray.get(loop_config["pairs"]["eval"])).worker_batches(
            worker.rank, worker.world, t.micro_batch_size)

    worker.model.train()
    step_started = marks["setup_done"] = time.time()
    for step in range(start_step + 1, t.max_steps + 1):
        metrics = train_step(worker, pairs, step)
        marks.setdefault("first_step_done", time.time())
        metrics["seconds_per_step"] = round(time.time() - step_started, 3)
        metrics["time"] = round(time.time(), 3)
        step_started = time.time()
        first, last = step == start_step + 1, step == t.max_steps
        if first and start_step:
            metrics["resumed_from_step"] = start_step
        if first:
            metrics.update({f"parameters/{k}": v for k, v in worker.parameters.items()})
        if eval_batches and (last or (t.eval_every and step % t.eval_every == 0)):
            metrics.update(evaluate(worker, eval_batches))
            if worker.early_stopping and keep_if_best(worker, metrics, step, out):
                last = True  # no improvement for `patience` evaluations: model/ holds the best one's weights
        logged = first or last or step % t.log_every == 0 or "eval/loss" in metrics
        if worker.rank == 0 and logged:
            metrics_log.write(metrics)
            if trackers:
                trackers.log(metrics)
            shown = " ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "rewards/accuracies", "rewards/margins",
                                                                "logps/chosen", "dpop/penalty_active"))
            evaluated = f" | eval/loss {metrics['eval/loss']:.4g}" if "eval/loss" in metrics else ""
            say(f"step {step}/{t.max_steps} {shown}{evaluated} ({metrics['seconds_per_step']:.2f}s/step)")
        # ray.train.report blocks while the controller has not yet taken the previous report (it polls every 2 s),
        # so only checkpoints, the last step and rows with the metric a sweep ranks by are reported: metrics.jsonl
        # is written above. The condition is the same on every worker, as report requires.
        if t.checkpoint_every and step % t.checkpoint_every == 0 and not last:
            save_checkpoint(worker, step, {**metrics, **reported})
        elif last or (logged and loop_config["report_metric"] in metrics):
            ray.train.report({**metrics, **reported})
        if last:
            break
    marks["steps_done"] = time.time()
    if not worker.early_stopping or worker.early_stopping.best_step is None:
        save_policy(worker, out)  # with early stopping, model/ was written at the best evaluation
    marks["policy_saved"] = time.time()
    if trackers:
        trackers.close()
    if worker.rank == 0:
        storage.write_json(storage.join(out, "timings.json"), {k: round(v, 3) for k, v in marks.items()})


def keep_if_best(worker: Worker, metrics: dict, step: int, out: str) -> bool:
    """Early stopping after an evaluation: the best one so far saves its weights as model/; returns whether the
    run should end now. Its state enters the metrics row (and with it metrics.jsonl)."""
    early_stopping = worker.early_stopping
    if early_stopping.update(metrics, step):
        save_policy(worker, out)
    metrics["early_stopping/best_step"] = early_stopping.best_step
    metrics["early_stopping/best"] = early_stopping.best
    if early_stopping.should_stop:
        metrics["early_stopping/stopped"] = True
        if worker.rank == 0:
            say(f"early stopping at step {step}: {early_stopping.section.metric} has not improved on "
                f"{early_stopping.best:.4g} (step {early_stopping.best_step}) for {early_stopping.section.patience} "
                f"evaluations; model/ is step {early_stopping.best_step}")
        return True
    return False


def plot_curves(rows: list[dict], path: str) -> None:
    """Training curves, eval points on top: what a person checks first after a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
              ("logps/chosen", "log p(chosen)"), ("logps/rejected", "log p(rejected)"),
              ("dpop/penalty_active", "share of pairs with chosen below reference")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label="train")
        evals = [r for r in rows if f"eval/{key}" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r[f"eval/{key}"] for r in evals], "o-", label="eval")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def low_edit_distance_warning(dpop_lambda: float, median_edit_distance: float | None) -> str | None:
    """Plain DPO on pairs that differ in a few tokens is the failure mode DPOP was made for: say so."""
    if dpop_lambda > 0 or median_edit_distance is None or median_edit_distance >= LOW_EDIT_DISTANCE:
        return None
    return (f"plain DPO (train.dpop_lambda = 0) on pairs with median token edit distance {median_edit_distance:g} "
            f"(< {LOW_EDIT_DISTANCE}): on pairs that differ in a few tokens DPO tends to lower the likelihood of the "
            f"chosen completion too (Smaug, Pal et al. 2024). DPOP keeps it up: set train.dpop_lambda > 0 (the paper "
            f"uses 50).")


def load_pairs(reference: str, t) -> tuple[dict, dict]:
    """The reference stage's pairs, read once by the driver and put in the object store as Arrow tables: "train",
    and "eval" when every worker gets a row. Workers (and every trial of a sweep) take them from there, so no
    train run starts Ray Data read tasks (about 12 s each here) and no epoch re-reads anything."""
    import numpy as np
    import pyarrow.compute as pc
    import ray

    table = storage.read_parquet(reference, columns=TRAIN_COLUMNS + ["split", "edit_distance"])
    splits = {name: table.filter(pc.equal(table["split"], name)) for name in ("train", "eval")}
    train_rows, eval_rows = splits["train"].num_rows, splits["eval"].num_rows
    if train_rows < t.micro_batch_size * t.num_workers:
        raise ValueError(f"train split has {train_rows} pairs; train.micro_batch_size * train.num_workers = "
                         f"{t.micro_batch_size * t.num_workers} need at least that many")
    pairs = {"train": ray.put(splits["train"].select(TRAIN_COLUMNS))}
    if eval_rows >= t.num_workers:
        pairs["eval"] = ray.put(splits["eval"].select(TRAIN_COLUMNS))
    info = {"train_rows": train_rows, "eval_rows": eval_rows,
            "median_edit_distance": float(np.median(splits["train"]["edit_distance"].drop_null().to_numpy()))}
    return pairs, info


def make_trainer(cfg: Config, out: str, run_name: str, pairs: dict, tracking: dict, callbacks: list = (),
                 report_metric: str | None = None):
    """The TorchTrainer of one training run writing to `out`; the train stage and every tune trial use it.
    `pairs` are load_pairs' object refs; `tracking` names the run for run.trackers ({"name", "params"});
    `report_metric` is the metric a sweep ranks by (rows with it are reported to Ray Train, and so to Tune).
    Rerunning with the same `out` and `run_name` resumes from that run's newest checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.train
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg, "out": out, "pairs": pairs, "report_metric": report_metric,
                           "tracking": tracking},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=run_name, storage_path=out, callbacks=list(callbacks),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
                                       # A lost worker restarts the group from the newest checkpoint.
                                       failure_config=ray.train.FailureConfig(max_failures=t.max_failures)),
    )


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


def read_metrics(out: str) -> list[dict]:
    text = storage.read_text(storage.join(out, "metrics.jsonl")) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def eval_accounting(train_rows: int, eval_rows: int, num_workers: int) -> dict:
    """Which reference rows a run uses. Every train pair is used; the eval split is divided equally among the
    workers (TrainPairs.worker_batches leaves out the remainder), and one smaller than the worker count is not
    used."""
    unused = eval_rows if eval_rows < num_workers else eval_rows % num_workers
    dropped = {("eval_split_too_small" if eval_rows < num_workers else "eval_remainder"): unused} if unused else {}
    return {"rows_in": train_rows + eval_rows, "rows_out": train_rows + eval_rows - unused, "rows_dropped": unused,
            "dropped": dropped}


def train_policy(cfg: Config, stage) -> dict:
    t = cfg.train
    pairs, info = load_pairs(stage.inputs["reference"], t)
    warnings = config_warnings(cfg) + [w for w in [low_edit_distance_warning(t.dpop_lambda,
                                                                             info["median_edit_distance"])] if w]
    for warning in warnings:
        print(f"[dpop] WARNING: {warning}", flush=True)
    print(f"[dpop] train: {info['train_rows']} train / {info['eval_rows']} eval pairs, {t.max_steps} steps of "
          f"{t.batch_size} pairs on {t.num_workers} worker(s), beta={t.beta} lambda={t.dpop_lambda}", flush=True)
    # The fingerprint in the run name: a rerun of the same config resumes its checkpoints, another starts anew.
    tracking = {"name": f"{cfg.run.name}/train", "params": run_params(cfg, stage.manifests["reference"]["fingerprint"])}
    result = make_trainer(cfg, stage.out, f"ray-{stage.fingerprint}", pairs, tracking).fit()
    if result.error:
        raise result.error

    rows = read_metrics(stage.out)
    with tempfile.TemporaryDirectory() as folder:
        plot_curves(rows, os.path.join(folder, "curves.png"))
        storage.upload_file(os.path.join(folder, "curves.png"), storage.join(stage.out, "curves.png"))
    final = rows[-1]
    median_edit = info["median_edit_distance"]
    train_rows, eval_rows = info["train_rows"], info["eval_rows"]
    resumed = [r["resumed_from_step"] for r in rows if "resumed_from_step" in r]
    # Without evaluations (an eval split smaller than the worker count) early stopping never acts: model/ is final.
    early = {"early_stopping": {"stopped": bool(final.get("early_stopping/stopped")),
                                "model_step": final.get("early_stopping/best_step") or final["step"],
                                "best": final.get("early_stopping/best"), "metric": t.early_stopping.metric}} \
        if t.early_stopping else {}
    if early and early["early_stopping"]["stopped"]:
        print(f"[dpop] train: stopped early at step {final['step']}; model/ is the step "
              f"{early['early_stopping']['model_step']} policy", flush=True)
    return {
        "warnings": warnings,
        "median_edit_distance": median_edit,
        "resumed_from_step": resumed[-1] if resumed else None,
        "rows": train_rows,
        "eval_rows": eval_rows,
        **eval_accounting(train_rows, eval_rows, t.num_workers),
        "steps": final["step"],
        "final_metrics": {k: v for k, v in final.items()
                          if k not in ("step", "resumed_from_step", "time") and not k.startswith("parameters/")},
        "parameters": {k.split("/")[1]: v for k, v in rows[0].items() if k.startswith("parameters/")},
        "model": storage.join(stage.out, "model") if not t.lora or t.lora.merge else None,
        "adapter": storage.join(stage.out, "adapter") if t.lora else None,
        "model_step": early["early_stopping"]["model_step"] if early else final["step"],
        **early,
        "curves": storage.join(stage.out, "curves.png"),
        "timings": phase_seconds(stage.out),
    }
