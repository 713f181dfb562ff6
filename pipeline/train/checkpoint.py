"""The checkpoint manager: what a checkpoint holds, how it is saved and restored.

A checkpoint is a sharded DCP checkpoint of the model and optimizer (every worker writes its own shard files), every
worker's RNG states (CPU, and CUDA on a GPU: LoRA dropout draws from it), and rank 0's trainer state (step,
schedule, data position, early stopping). With LoRA it holds the adapters and their optimizer state only: the
frozen base is the model folder's, loaded again on resume, and would be most of the bytes (a 70B base is 280 GB in
fp32 against some hundreds of MB of adapters). Ray Train merges
the workers' folders into one checkpoint and keeps the newest `train.keep_checkpoints` (stage.make_trainer).
"""
import io
import json
import os
import tempfile

from torch.distributed.checkpoint import FileSystemReader

from pipeline.train.metrics import say
from pipeline.train.readers import ObjectStoreReader, read_bytes

TRAINER_STATE = "trainer_state.json"


class CheckpointManager:
    """One worker's side of the run's checkpoints: `save` at a checkpoint step (every worker together: the DCP save
    is a collective), `restore` at start."""

    def __init__(self, model, optimizer, scheduler, early_stopping, batch_size: int, rank: int, device,
                 lora: bool):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.early_stopping = early_stopping
        self.batch_size, self.rank, self.device = batch_size, rank, device
        # Only what trains: every parameter, or with LoRA the adapters. Restoring, only a LoRA model may lack
        # weights in the checkpoint (its frozen base); a full one must find every weight.
        self.options = StateDictOptions(ignore_frozen_params=True, strict=not lora)

    def _rng_states(self) -> dict:
        import torch

        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def save(self, step: int, metrics: dict) -> None:
        """A sharded DCP checkpoint of model and optimizer, the schedule, the data position and every worker's RNG
        state, reported to Ray Train with `metrics` (which keeps the newest train.keep_checkpoints)."""
        import ray.train
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        with tempfile.TemporaryDirectory() as folder:
            model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.options)
            # Every worker writes its own shard files; Ray merges the workers' folders into one checkpoint.
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
            torch.save(self._rng_states(), os.path.join(folder, f"rng_state_rank{self.rank}.pt"))
            if self.rank == 0:
                with open(os.path.join(folder, TRAINER_STATE), "w") as f:
                    json.dump({"step": step, "scheduler": self.scheduler.state_dict(),
                               "pairs_consumed": step * self.batch_size, "epoch": metrics["epoch"],
                               "early_stopping": self.early_stopping.state_dict() if self.early_stopping else None},
                              f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"step_{step:06d}")

    def restore(self) -> int:
        """Load the newest checkpoint Ray Train hands this run (after a crash, a lost worker or a rerun of an
        unfinished stage) and return its step; 0 when there is none. Each worker reads the checkpoint in place on a
        local (shared) disk; on an object store it reads only the byte ranges of its own slices (ObjectStoreReader),
        never the other workers' shards (a 70B full checkpoint is about 1.1 TB with AdamW's state)."""
        import pyarrow.fs as pafs
        import ray.train
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return 0
        source, path = checkpoint.filesystem, checkpoint.path
        reader = FileSystemReader(path) if isinstance(source, pafs.LocalFileSystem) else ObjectStoreReader(source, path)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.options)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, storage_reader=reader)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.options)
        trainer_state = json.loads(read_bytes(source, f"{path}/{TRAINER_STATE}"))
        rng = read_bytes(source, f"{path}/rng_state_rank{self.rank}.pt")
        if rng is not None:  # absent when the worker count changed: a fresh seed is all that is left
            rng = torch.load(io.BytesIO(rng))
            if isinstance(rng, torch.Tensor):  # written before the CUDA state was kept beside the CPU's
                rng = {"cpu": rng}
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        if self.early_stopping and trainer_state.get("early_stopping"):
            self.early_stopping.load_state_dict(trainer_state["early_stopping"])
        step = trainer_state["step"]
        if trainer_state["pairs_consumed"] != step * self.batch_size:
            raise ValueError(f"checkpoint at step {step} consumed {trainer_state['pairs_consumed']} pairs, not "
                             f"{step} * train.batch_size; it belongs to another configuration")
        if self.rank == 0:
            say(f"resuming from step {step} (epoch {trainer_state['epoch']}, {trainer_state['pairs_consumed']} "
                f"pairs consumed)")
        return step
