"""`train` stage: the DPOP policy update on Ray Train (`TorchTrainer`) with FSDP2, one concern per module:

- `stage.py`: the driver side: the pairs into the object store, the `TorchTrainer`, the curves, the manifest.
- `loop.py`: what each worker runs, top to bottom: setup, `train_step` (micro-batches through
  `forward_backward_step`), `evaluate`, early stopping, `train_loop`.
- `data.py`: the pair table in each worker's memory and the seeded stream of pairs (epochs, data position).
- `parallel.py`: FSDP2 (`parallelize`), LoRA, the sharded policy's loading and saving.
- `checkpoint.py`: the checkpoint manager: what a checkpoint holds, save, restore.
- `metrics.py`: metrics.jsonl, progress lines, timings.json.

Driver (`train_policy`): reference Parquet -> train/eval Arrow tables in the object store (`load_pairs`)
    -> TorchTrainer(train_loop) -> curves PNG.
Each worker (`train_loop`), top to bottom:
    setup (load_policy: built on the meta device, parallelized with FSDP2, each rank's shard filled from rank 0's
    read, dropout off; AdamW + warm-up/decay) -> CheckpointManager.restore
    -> the train split into memory (TrainPairs), globally shuffled per epoch by `stream_indices`
    -> per step (`train_step`): micro-batches (`forward_backward_step`: chosen and rejected in one forward,
       preference_loss + α · NLL, backward) -> clip, step -> metrics (all-reduced)
       -> `evaluate` / `CheckpointManager.save` when due
    -> `save_policy`: every worker writes its share of the policy's safetensors files, from its shards.

Exact resume: step s always trains on positions [(s - 1) * batch_size, s * batch_size) of the one seeded stream,
so a run resumed from its step-k checkpoint (model, optimizer, schedule, RNG) continues as if never stopped.
"""
