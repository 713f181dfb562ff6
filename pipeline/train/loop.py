"""What every Ray Train worker runs (`train_loop`), top to bottom: setup, then per step `train_step` (micro-batches
through `forward_backward_step`: chosen and rejected in one forward, the preference loss, backward; clip; step), metrics
all-reduced, `evaluate` and checkpoints when due, early stopping, and the final policy.
"""
import logging
import math
import time
from dataclasses import dataclass

import psutil

from pipeline import storage
from pipeline.config import Config, below_reference_nats_per_token, training_dtype
from pipeline.tracking import Trackers
from pipeline.train.checkpoint import CheckpointManager
from pipeline.train.data import TrainPairs, stream_indices
from pipeline.train.metrics import MetricsLog, say
from pipeline.train.parallel import device_mesh, load_policy, save_policy
from pipeline.vocab import STAT_KEYS


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
    save_dtype: object
    """The dtype the final policy is written in (train.save_dtype; `auto`: the model folder's own)."""
    layout: str
    """train.layout where the model's attention supports it, else `padded` (pipeline.logprobs.layout_for)."""
    parameters: dict
    """{"trainable": ..., "total": ...}: with LoRA, trainable counts the adapters only."""
    checkpoints: CheckpointManager
    early_stopping: EarlyStopping | None = None


def setup(cfg: Config) -> Worker:
    """The sharded policy (`load_policy`), its tokenizer, and AdamW with the warm-up/decay schedule."""
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoTokenizer

    from pipeline.logprobs import layout_for

    t, remote_code = cfg.train, cfg.model.trust_remote_code
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)
    shard_size = shard_group_size(cfg, context)
    model, model_dtype = load_policy(cfg.model.name_or_path, remote_code, device_mesh(device.type, world, shard_size),
                                     device, mixed_precision=training_dtype(cfg) == "bfloat16",
                                     activation_checkpointing=t.activation_checkpointing, lora=t.lora,
                                     reshard_after_forward=t.reshard_after_forward,
                                     cpu_offload=t.cpu_offload)
    with storage.local_copy(cfg.model.tokenizer or cfg.model.name_or_path, weights=False) as files:
        tokenizer = AutoTokenizer.from_pretrained(files, trust_remote_code=remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # With LoRA only the adapters require grad: only they get gradients and AdamW state.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.lr_schedule))
    early_stopping = EarlyStopping(t.early_stopping) if t.early_stopping else None
    save_dtype = (model_dtype or torch.float32) if t.save_dtype == "auto" else getattr(torch, t.save_dtype)
    layout = layout_for(model, t.layout)
    if rank == 0 and layout != t.layout:
        say(f"train.layout {t.layout} needs sdpa attention; {model.config._attn_implementation} uses {layout}")
    parameters = {"trainable": sum(p.numel() for p in trainable), "total": sum(p.numel() for p in model.parameters())}
    if rank == 0:
        say(f"{parameters['trainable']:,} of {parameters['total']:,} parameters train"
            + (f" (LoRA r={t.lora.r} on {', '.join(t.lora.target_modules)})" if t.lora else ""))
    checkpoints = CheckpointManager(model, optimizer, scheduler, early_stopping, t.batch_size, rank, device,
                                    lora=t.lora is not None)
    return Worker(cfg, model, optimizer, scheduler, tokenizer, pad_id, device, rank, world, save_dtype, layout,
                  parameters, checkpoints, early_stopping)


def shard_group_size(cfg: Config, context) -> int:
    """train.shard_size; unset: the workers on one node with GPUs (HSDP across nodes), all of them on CPUs. Says
    when a shard group spans nodes (its per-layer all-gathers then cross them): Ray numbers the workers node by
    node, so that happens only when a node holds a number of workers that shard_size does not divide."""
    import ray
    import torch.distributed as dist

    world = context.get_world_size()
    size = cfg.train.shard_size or (context.get_local_world_size() if cfg.train.use_gpu else world)
    if world % size:
        size = world  # nodes with unequal worker counts: one group, plain FSDP
    nodes = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    groups = [set(nodes[start:start + size]) for start in range(0, world, size)]
    if context.get_world_rank() == 0:
        layout = f"{world // size} replica(s) x {size} shard(s)" if size < world else f"{world} shard(s)"
        say(f"FSDP2 over {layout}, on {len(set(nodes))} node(s)")
        if any(len(group) > 1 for group in groups):
            say(f"warning: a shard group of {size} workers spans nodes, so its all-gathers cross them; set "
                f"train.shard_size to the workers per node")
    return size


def concatenated_forward(model, batch: dict, pad_id: int, layout: str, device):
    """Policy log-probs of chosen and rejected completions, both in one forward pass.

    The one owner of the pair layout: each pair is a group (prompt, [chosen, rejected]) of pipeline.logprobs, so
    the scores come back chosen, rejected, chosen, rejected, ..."""
    from pipeline.logprobs import completion_logps, make_batch

    groups = [(prompt.tolist(), [chosen.tolist(), rejected.tolist()])
              for prompt, chosen, rejected in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])]
    logps = completion_logps(model, make_batch(groups, pad_id, layout).to(device)).view(-1, 2)
    return logps[:, 0], logps[:, 1]


def step_stats(worker: Worker, batch: dict):
    """Forward one micro-batch; return the per-pair losses (with grad): train.loss_type of DPOP's margin, plus
    α · the chosen mean token NLL, and the summed statistics of STAT_KEYS. The statistics are of summed log-probs
    whatever the loss, so the methods of a sweep compare on one scale."""
    import torch

    from pipeline.loss import chosen_nll, preference_loss

    t, device = worker.cfg.train, worker.device
    policy_chosen, policy_rejected = concatenated_forward(worker.model, batch, worker.pad_id, worker.layout, device)
    ref_chosen = torch.tensor(batch["ref_chosen_logp"], dtype=torch.float32, device=device)
    ref_rejected = torch.tensor(batch["ref_rejected_logp"], dtype=torch.float32, device=device)
    chosen_tokens, rejected_tokens = (torch.tensor([len(ids) for ids in batch[column]], dtype=torch.float32,
                                                   device=device) for column in ("chosen_ids", "rejected_ids"))
    logps = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if t.loss_type == "ipo":  # IPO's target margin 1/(2β) is per token: means over each completion, as TRL takes
        logps = tuple(lp / n for lp, n in zip(logps, (chosen_tokens, rejected_tokens) * 2))
    out = preference_loss(*logps, beta=t.beta, loss_type=t.loss_type, dpop_lambda=t.dpop_lambda,
                          label_smoothing=t.label_smoothing)
    nll = chosen_nll(policy_chosen, chosen_tokens)
    losses = out.losses + t.nll_weight * nll if t.nll_weight else out.losses
    chosen_logratio = (policy_chosen - ref_chosen).detach()
    rejected_logratio = (policy_rejected - ref_rejected).detach()
    penalty = torch.clamp(-chosen_logratio, min=0.0)
    ref_gap = (chosen_logratio.abs() + rejected_logratio.abs()) / 2
    sums = torch.stack([
        losses.detach().sum(),
        t.beta * chosen_logratio.sum(),
        t.beta * rejected_logratio.sum(),
        (chosen_logratio > rejected_logratio).float().sum(),
        t.beta * (chosen_logratio - rejected_logratio).sum(),
        policy_chosen.detach().sum(),
        policy_rejected.detach().sum(),
        penalty.sum(),
        (penalty > below_reference_nats_per_token(worker.cfg) * chosen_tokens).float().sum(),
        ref_gap.sum(),
        nll.detach().sum(),
        torch.tensor(float(len(ref_chosen)), device=device),
    ])
    return losses, sums


def reduce_stats(sums, prefix: str = "") -> dict:
    """All-reduce the summed statistics over workers and turn them into means per pair."""
    import torch.distributed as dist

    dist.all_reduce(sums)
    values = sums.tolist()
    count = values[-1]
    return {prefix + key: value / count for key, value in zip(STAT_KEYS, values[:-1])}


def forward_backward_step(worker: Worker, batch: dict, last_micro_batch: bool):
    """One micro-batch: forward, preference loss, backward. Gradients reduce-scatter only on the step's last one."""
    t = worker.cfg.train
    worker.model.set_requires_gradient_sync(last_micro_batch)
    losses, sums = step_stats(worker, batch)
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


def evaluate(worker: Worker, eval_batches: list[dict]) -> dict:
    """The same statistics on this worker's share of the eval split, all-reduced, prefixed `eval/`."""
    import torch

    worker.model.eval()
    total = None
    with torch.no_grad():
        for batch in eval_batches:
            _, sums = step_stats(worker, batch)
            total = sums if total is None else total + sums
    worker.model.train()
    return reduce_stats(total, prefix="eval/")


def keep_if_best(worker: Worker, metrics: dict, step: int, out: str) -> bool:
    """Early stopping after an evaluation: the best one so far saves its weights as model/; returns whether the
    run should end now. Its state enters the metrics row (and with it metrics.jsonl)."""
    early_stopping = worker.early_stopping
    if early_stopping.update(metrics, step):
        save_policy(worker.model, worker.tokenizer, out, worker.save_dtype, worker.cfg.train.lora)
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


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: setup, resume, the steps with their logging, evaluation and checkpoints,
    then the final policy (run_steps); the trackers end FINISHED, or FAILED if anything raised."""
    import ray.train

    # Ray Train logs every report call, metrics and all, at INFO on a logger named by its file path (not under
    # "ray.train"), which only the root level reaches. Our own progress lines are printed.
    logging.getLogger().setLevel(logging.WARNING)
    cfg, out = loop_config["config"], loop_config["out"]
    # Where the run's time goes, as Unix times, for timings.json: this process's start (Ray Train starting the
    # worker), then each phase's end. All but the steps are fixed costs that a longer run does not repeat.
    marks = {"process_started": psutil.Process().create_time(), "loop_entered": time.time()}
    worker = setup(cfg)
    start_step = worker.checkpoints.restore()
    tracking = loop_config["tracking"]
    trackers = Trackers(cfg, out, tracking["name"], tracking["params"]) \
        if worker.rank == 0 and cfg.run.trackers else None
    try:
        final = run_steps(worker, loop_config, start_step, trackers, marks)
    except BaseException:
        if trackers:  # not left RUNNING, and its files uploaded
            trackers.close("FAILED")
        raise
    if trackers:
        trackers.close()
    if worker.rank == 0:
        storage.write_json(storage.join(out, "timings.json"), {k: round(v, 3) for k, v in marks.items()})
    if final:
        # The last row is reported only now, with the policy saved and the trackers closed: a sweep's scheduler may
        # stop the trial at this report (ASHA does at max_t), which ends its workers.
        ray.train.report(final)


def run_steps(worker: Worker, loop_config: dict, start_step: int, trackers: Trackers | None,
              marks: dict) -> dict | None:
    """The steps from `start_step` on, with their logging, evaluation and checkpoints, then the final policy.
    Returns the last step's row, for train_loop to report (None when no step was left to run)."""
    import ray
    import ray.train
    import ray.util

    cfg, out = loop_config["config"], loop_config["out"]
    t = cfg.train
    metrics_log = MetricsLog(storage.join(out, "metrics.jsonl"), start_step) if worker.rank == 0 else None
    # The workers' placement group, reported so that a sweep can free it if Tune ends this run early.
    placement_group = ray.util.get_current_placement_group()
    reported = {"placement_group": placement_group.id.hex()} if placement_group else {}

    pairs = TrainPairs(ray.get(loop_config["pairs"]["train"]))
    eval_batches = []
    if "eval" in loop_config["pairs"]:
        eval_batches = TrainPairs(ray.get(loop_config["pairs"]["eval"])).worker_batches(
            worker.rank, worker.world, t.micro_batch_size)

    worker.model.train()
    final = None
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
        # so only checkpoints and rows with the metric a sweep ranks by are reported, and the last step after the
        # save (train_loop): metrics.jsonl is written above. The condition is the same on every worker, as report
        # requires.
        if last:
            final = {**metrics, **reported}
            break
        if t.checkpoint_every and step % t.checkpoint_every == 0:
            worker.checkpoints.save(step, {**metrics, **reported})
        elif logged and loop_config["report_metric"] in metrics:
            ray.train.report({**metrics, **reported})
    marks["steps_done"] = time.time()
    if not worker.early_stopping or worker.early_stopping.best_step is None:
        # (With early stopping, model/ was written at the best evaluation.)
        save_policy(worker.model, worker.tokenizer, out, worker.save_dtype, worker.cfg.train.lora)
    marks["policy_saved"] = time.time()
    return final


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
