"""`reference` stage (Ray Data actor pool): pairs + the reference model's log-probs of both completions.

Each actor holds one engine of pipeline.engines: vLLM (backend `vllm`) or transformers (backend `hf`), the engines
the eval stage uses too. Both sum log p over completion tokens only; the stage writes `ref_chosen_logp`,
`ref_rejected_logp` (float64) beside the pair columns. Pairs with a non-finite log-prob are dropped and counted. Output is written as it is scored, so a rerun after a crash scores only what is missing.
"""
from collections import Counter

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from pipeline import storage
from pipeline.config import Config
from pipeline.engines import EngineActor, engine_actor
from pipeline.vocab import Stage, StageFailed

REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")


def _with_reference(batch: pa.Table, logps: list[float]) -> pa.Table:
    """`logps` holds the chosen sequences' sums, then the rejected ones'."""
    n = batch.num_rows
    batch = batch.append_column(REF_COLUMNS[0], pa.array(logps[:n], pa.float64()))
    return batch.append_column(REF_COLUMNS[1], pa.array(logps[n:], pa.float64()))


def _sequences(batch: pa.Table) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and completions for every chosen, then every rejected, completion of the batch."""
    prompts = batch["prompt_ids"].to_pylist()
    return prompts * 2, batch["chosen_ids"].to_pylist() + batch["rejected_ids"].to_pylist()


class PairScorer(EngineActor):
    """Ray Data actor: the reference columns for a batch of pairs."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts, completions = _sequences(batch)
        return _with_reference(batch, self.engine.logps(prompts, completions))


def score_pairs(ds, cfg: Config):
    """Add the reference columns to a Ray Dataset of pairs (lazy; nothing runs until it is consumed)."""
    return ds.map_batches(PairScorer, batch_size=cfg.reference.batch_size,
                          **engine_actor(cfg, cfg.model.name_or_path, cfg.data.max_length, cfg.reference.backend))


NONFINITE_IDS_KEPT = 100  # pair ids listed in the manifest; the count covers them all


def is_finite(batch: pa.Table) -> pa.Array:
    """Both reference log-probs finite. A NaN or ±inf (float16 overflow, a broken model) would make training fail
    blaming β, or let a −inf pair contribute nothing while it seems to train."""
    return pa.compute.and_(pa.compute.is_finite(batch[REF_COLUMNS[0]]), pa.compute.is_finite(batch[REF_COLUMNS[1]]))


def _output_files(out: str) -> list[str]:
    """The stage's Parquet files (its `_`-prefixed bookkeeping files aside)."""
    return [uri for uri, info in storage.list_files(out, recursive=False)
            if info.base_name.endswith(".parquet") and not info.base_name.startswith(("_", "."))]


def keep_finished_files(out: str, wanted: Counter) -> Counter:
    """After an interrupted run: keep the output files it finished and return the pair ids they hold. A file cut by
    the kill has no Parquet footer and is deleted. A repeated pair id (identical pairs share one) must end up with
    all its copies or none: a file holding some copies of an id whose other copies no file holds is rewritten
    without them, so those pairs are scored again, every copy."""
    by_file = {}
    for file in _output_files(out):
        try:
            by_file[file] = Counter(storage.read_parquet(file, ["pair_id"]).column(0).to_pylist())
        except (pa.ArrowInvalid, OSError):
            storage.delete_file(file)
    done = sum(by_file.values(), Counter())
    incomplete = {pair_id for pair_id, n in done.items() if n != wanted.get(pair_id, 0)}
    incomplete_array = pa.array(sorted(incomplete), pa.string())
    for file, ids in list(by_file.items()):
        if incomplete & ids.keys():
            table = _not_in(storage.read_parquet(file), incomplete_array)
            storage.write_parquet(table, file)
            by_file[file] = Counter(table["pair_id"].to_pylist())
    return sum(by_file.values(), Counter())


def _not_in(batch: pa.Table, done: pa.Array) -> pa.Table:
    return batch.filter(pa.compute.invert(pa.compute.is_in(batch["pair_id"], value_set=done)))


def compute_reference(cfg: Config, stage) -> dict:
    """Score every pair and write the finite ones as they are scored (files of reference.rows_per_file pairs); the
    rest are dropped and counted as `nonfinite_reference` (documented choice: they stay out of training, the
    manifest names them, and the run goes on). Rerun after an interruption, it keeps the finished files and scores
    only the pairs they lack."""
    import ray

    pairs = ray.data.read_parquet(stage.inputs[Stage.PAIRS])
    # One column read here with pyarrow: through Ray Data it took 6 s of read tasks on the demo's 480 pairs.
    wanted = Counter(storage.read_parquet(stage.inputs[Stage.PAIRS], ["pair_id"]).column(0).to_pylist())
    done = keep_finished_files(stage.out, wanted) if stage.resuming else Counter()
    todo = pairs
    if done:
        todo = pairs.map_batches(_not_in, fn_kwargs={"done": pa.array(sorted(done))}, batch_format="pyarrow")
        print(f"[dpop] reference: resuming: {done.total()} pairs already scored by the interrupted run are kept; "
              f"scoring the other {wanted.total() - done.total()}", flush=True)
    if wanted.total() > done.total():
        # Blocks of rows_per_file pairs: each is scored by one actor call chain and written as its own file as soon
        # as it is done (a whole Parquet file read as one block would be written only at the very end).
        todo = todo.repartition(target_num_rows_per_block=cfg.reference.rows_per_file)
        score_pairs(todo, cfg).map_batches(lambda b: b.filter(is_finite(b)), batch_format="pyarrow").write_parquet(
            stage.out, min_rows_per_file=cfg.reference.rows_per_file)

    columns = ["pair_id", "split", *REF_COLUMNS]
    files = _output_files(stage.out)
    written = pa.concat_tables([storage.read_parquet(f, columns) for f in files]).to_pandas() if files else \
        pa.table({c: [] for c in columns}).to_pandas()
    nonfinite = wanted - Counter(written.pair_id)  # every pair is written or dropped, and nothing else is written
    assert not Counter(written.pair_id) - wanted, "the reference output holds pairs that are not in the input"
    accounting = {"rows_in": wanted.total(), "rows_out": len(written), "rows_dropped": nonfinite.total()}
    assert accounting["rows_in"] == accounting["rows_out"] + accounting["rows_dropped"], accounting
    if nonfinite:
        print(f"[dpop] WARNING: reference: dropped {nonfinite.total()} pair(s) whose reference log-prob is not "
              f"finite (nonfinite_reference), e.g. {sorted(nonfinite)[:5]}", flush=True)
    fields = {"rows": len(written), **accounting, "backend": cfg.reference.backend,
              "dropped": {"nonfinite_reference": nonfinite.total()} if nonfinite else {},
              "nonfinite_pair_ids": sorted(nonfinite)[:NONFINITE_IDS_KEPT],
              "resumed": {"pairs_kept": done.total(), "pairs_scored": wanted.total() - done.total()} if done else None}
    if not len(written):
        raise StageFailed(f"reference: every one of {wanted.total()} pairs has a non-finite reference log-prob "
                          f"(reference.dtype {cfg.reference.dtype}; a broken model or float16 overflow)", fields)
    means = written.groupby("split")[list(REF_COLUMNS)].mean().round(4).to_dict(orient="index")
    shown = "; ".join(f"{split} chosen {m['ref_chosen_logp']:g}, rejected {m['ref_rejected_logp']:g}"
                      for split, m in means.items())
    print(f"[dpop] reference: {len(written)} pairs scored with {cfg.reference.backend}; mean log-probs: {shown}",
          flush=True)
    return {**fields, "mean_logps_by_split": means}
