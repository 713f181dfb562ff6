"""The pairs a train run reads, and the order it reads them in.

The driver reads the reference stage's Parquet once (`load_pairs`) into the object store; every worker holds the
train split in memory (`TrainPairs`). Step s always trains on positions [(s - 1) * batch_size, s * batch_size) of
one seeded stream (`stream_indices`), so a run resumed from its step-k checkpoint continues as if never stopped.
"""
import functools

from pipeline import storage

TRAIN_COLUMNS = ["pair_id", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logp", "ref_rejected_logp"]


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


def eval_accounting(train_rows: int, eval_rows: int, num_workers: int) -> dict:
    """Which reference rows a run uses. Every train pair is used; the eval split is divided equally among the
    workers (TrainPairs.worker_batches leaves out the remainder), and one smaller than the worker count is not
    used."""
    unused = eval_rows if eval_rows < num_workers else eval_rows % num_workers
    dropped = {("eval_split_too_small" if eval_rows < num_workers else "eval_remainder"): unused} if unused else {}
    return {"rows_in": train_rows + eval_rows, "rows_out": train_rows + eval_rows - unused, "rows_dropped": unused,
            "dropped": dropped}
