"""`pairs` stage (Ray Data): raw sources -> tokenized preference pairs in Parquet.

    read each source as one JSON record per row
    -> parse by format (pipeline/sources.py) -> chat template / EOS -> tokenize -> truncate -> edit distance, split
    -> mark duplicates (if data.deduplicate) -> write kept pairs; count every dropped row by reason in the manifest

Truncation rule: a prompt longer than data.max_prompt_length keeps its last tokens; completions are never cut, so
a pair whose prompt plus longer completion exceeds data.max_length is dropped as `too_long`.
"""
import functools
import hashlib
import json
import os
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from pipeline import plots, storage
from pipeline.config import Config, EvalSourceSection, SourceSection, source_name
from pipeline.sources import PARSERS, Drop, RawPair, parse_record
from pipeline.vocab import ConfigError, StageFailed, counts_text, one_line

TOKEN_IDS = pa.list_(pa.int32())
PAIR_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("prompt_ids", TOKEN_IDS),
        ("chosen_ids", TOKEN_IDS),
        ("rejected_ids", TOKEN_IDS),
        ("edit_distance", pa.int32()),
        ("source", pa.string()),
        ("split", pa.string()),
    ]
)
# While the stage runs, dropped rows travel with the pairs so that one pass counts everything; `first_of_record`
# is 1 on the first row each input record yields (a pair or a drop), so its sum counts the records read.
WORK_SCHEMA = pa.schema([*PAIR_SCHEMA, pa.field("drop_reason", pa.string()), pa.field("drop_detail", pa.string()),
                         pa.field("first_of_record", pa.int32())])
EDIT_DISTANCE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
EDIT_DISTANCE_PLOT = "_edit_distance.png"
DROP_EXAMPLES = 3


def token_edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two token sequences (unit cost insert, delete, substitute).

    Strips the shared prefix and suffix, then runs Myers' bit-parallel algorithm (Hyyrö's form for global
    distance) with Python ints as bit vectors: O(len(a) * len(b) / word) instead of a Python-level DP table.
    """
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a, end_b = end_a - 1, end_b - 1
    a, b = a[start:end_a], b[start:end_b]
    if len(a) > len(b):
        a, b = b, a
    if not a:
        return len(b)
    m = len(a)
    mask, top = (1 << m) - 1, 1 << (m - 1)
    match_bits: dict[int, int] = {}
    for i, token in enumerate(a):
        match_bits[token] = match_bits.get(token, 0) | (1 << i)
    plus_v, minus_v, score = mask, 0, m
    for token in b:
        eq = match_bits.get(token, 0)
        x_v = eq | minus_v
        x_h = ((((eq & plus_v) + plus_v) & mask) ^ plus_v) | eq
        plus_h = (minus_v | ~(x_h | plus_v)) & mask
        minus_h = plus_v & x_h
        if plus_h & top:
            score += 1
        elif minus_h & top:
            score -= 1
        plus_h = ((plus_h << 1) | 1) & mask
        minus_h = (minus_h << 1) & mask
        plus_v = (minus_h | ~(x_v | plus_h)) & mask
        minus_v = plus_h & x_v
    return score


def stable_hash(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def split_of(prompt: str, eval_fraction: float) -> str:
    """Hash the prompt, not the pair, so all pairs of one prompt share a split (no prompt in both)."""
    bucket = int(stable_hash("split", prompt), 16) % 1_000_000
    return "eval" if bucket < eval_fraction * 1_000_000 else "train"


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    with storage.local_copy(name_or_path, weights=False) as files:  # (on an object store: its small files)
        tokenizer = AutoTokenizer.from_pretrained(files, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no EOS token; completions need one to end")
    return tokenizer


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text; a template that rejects the conversation (roles out of order, a role it does not
    know) is a `template_error` drop for that row, not a crash of the stage."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise Drop("template_error", f"{type(e).__name__}: {e}") from None


def tokenize_pair(pair: RawPair, tokenizer, max_prompt_length: int, max_length: int) -> dict:
    """Text as the model sees it and its token ids, truncated by the module's rule; raises Drop."""
    if isinstance(pair.prompt, str):
        prompt_text, chosen_text, rejected_text = (
            pair.prompt,
            pair.chosen + tokenizer.eos_token,
            pair.rejected + tokenizer.eos_token,
        )
        prompt_ids = tokenizer(prompt_text)["input_ids"]  # with the tokenizer's own BOS, if it adds one
        chosen_ids = tokenizer(pair.chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rejected_ids = tokenizer(pair.rejected, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    else:
        if not tokenizer.chat_template:
            raise ValueError(f"a source holds chat messages but tokenizer {tokenizer.name_or_path!r} has no chat "
                             "template; set model.tokenizer to one that has")
        prompt_text = _render_chat(tokenizer, pair.prompt, add_generation_prompt=True)
        completions = []
        for messages in (pair.chosen, pair.rejected):
            full = _render_chat(tokenizer, pair.prompt + messages)
            if not full.startswith(prompt_text):
                raise Drop("template_mismatch", "the chat template renders the prompt differently with the answer")
            completions.append(full[len(prompt_text):])
        chosen_text, rejected_text = completions
        # The template already holds any BOS and end-of-turn tokens.
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        chosen_ids = tokenizer(chosen_text, add_special_tokens=False)["input_ids"]
        rejected_ids = tokenizer(rejected_text, add_special_tokens=False)["input_ids"]
    if chosen_ids == rejected_ids:
        raise Drop("identical", "chosen and rejected are the same tokens")
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        prompt_text = tokenizer.decode(prompt_ids)
    longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
    if longest > max_length:
        raise Drop("too_long", f"{longest} tokens > data.max_length {max_length}")
    return {
        "prompt": prompt_text,
        "chosen": chosen_text,
        "rejected": rejected_text,
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
    }


def build_batch(batch: pa.Table, cfg: Config) -> pa.Table:
    """Ray Data UDF: JSON records of one batch -> pair rows and drop rows (WORK_SCHEMA)."""
    data = cfg.data
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.trust_remote_code)
    out = defaultdict(list)

    def emit(row: dict, first: bool) -> None:
        row["first_of_record"] = int(first)
        for name in WORK_SCHEMA.names:
            out[name].append(row.get(name))

    def drop_row(source: str, origin: str, drop: Drop) -> dict:
        detail = f"{origin}: {drop.detail}" if origin else drop.detail
        return {"pair_id": "", "source": source, "drop_reason": drop.reason, "drop_detail": detail[:300]}

    for source_index, record, origin, read_error in zip(batch["source_index"].to_pylist(), batch["record"].to_pylist(),
                                                        batch["origin"].to_pylist(), batch["read_error"].to_pylist()):
        source = data.sources[source_index]
        name = source_name(source)
        try:
            raw_pairs = PARSERS[source.format](parse_record(record, read_error), source)
        except Drop as drop:
            emit(drop_row(name, origin, drop), first=True)
            continue
        for i, raw in enumerate(raw_pairs):
            try:
                pair = tokenize_pair(raw, tokenizer, data.max_prompt_length, data.max_length)
            except Drop as drop:
                emit(drop_row(name, origin, drop), first=i == 0)
                continue
            pair.update(
                pair_id=stable_hash(pair["prompt"], pair["chosen"], pair["rejected"]),
                edit_distance=token_edit_distance(pair["chosen_ids"], pair["rejected_ids"]),
                source=name,
                split=split_of(pair["prompt"], data.eval_fraction),
                drop_reason="",
                drop_detail="",
            )
            emit(pair, first=i == 0)
    return pa.Table.from_pydict({name: out[name] for name in WORK_SCHEMA.names}, schema=WORK_SCHEMA)


def mark_duplicates(group: pa.Table) -> pa.Table:
    """Rows sharing a pair_id have the same prompt, chosen and rejected: keep one, count the rest."""
    if group.num_rows < 2 or group["pair_id"][0].as_py() == "":  # "" groups the dropped rows together
        return group
    reasons = ["" if i == 0 else "duplicate" for i in range(group.num_rows)]
    details = ["" if i == 0 else "same prompt, chosen and rejected as another row" for i in range(group.num_rows)]
    group = group.set_column(group.schema.get_field_index("drop_reason"), "drop_reason", pa.array(reasons))
    return group.set_column(group.schema.get_field_index("drop_detail"), "drop_detail", pa.array(details))


def kept_pairs(table: pa.Table) -> pa.Table:
    """The pairs to write, in the declared schema (a shuffle may widen int32 lists to int64)."""
    kept = table.filter(pa.compute.equal(table["drop_reason"], ""))
    return kept.select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA)


# Every reader yields these columns: one JSON text per input row, where it came from (file and line or row, for
# drop details), and a reader error ("reason: detail", or "") for rows that could not even be read as text.
RECORD_SCHEMA = pa.schema([("record", pa.string()), ("origin", pa.string()), ("read_error", pa.string())])


def _record_table(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.Table.from_pylist([dict(zip(RECORD_SCHEMA.names, row)) for row in rows], schema=RECORD_SCHEMA)


def _records(table: pa.Table) -> pa.Table:
    """Columnar rows (Parquet, Hugging Face) -> one JSON record per row, the form every parser reads."""
    paths = table["path"].to_pylist() if "path" in table.column_names else [""] * table.num_rows
    rows = table.drop_columns([c for c in ("path",) if c in table.column_names]).to_pylist()
    return _record_table([(json.dumps(r, default=str), os.path.basename(p), "") for r, p in zip(rows, paths)])


def _decoded_lines(blob: bytes):
    """(line number, text or None, error) for each non-empty line. Lines end at b"\n" only: JSON allows U+2028
    and U+2029 inside strings, and str.splitlines (which Ray's text reader uses) would cut a record there."""
    for number, raw in enumerate(blob.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, raw.decode("utf-8").rstrip("\r"), ""
        except UnicodeDecodeError as e:
            yield number, None, f"invalid_utf8: {e.reason} at byte {e.start}"


def _jsonl_records(table: pa.Table) -> pa.Table:
    """JSON lines files (plain or compressed: Ray's reader decompresses by extension), one record a line."""
    rows = []
    for blob, path in zip(table["bytes"].to_pylist(), table["path"].to_pylist()):
        name = os.path.basename(path)
        rows += [(text or "", f"{name} line {number}", error) for number, text, error in _decoded_lines(blob)]
    return _record_table(rows)


def _json_records(table: pa.Table) -> pa.Table:
    """A whole .json file: a list of objects, one object, or (despite the name) JSON lines."""
    rows = []
    for blob, path in zip(table["bytes"].to_pylist(), table["path"].to_pylist()):
        name = os.path.basename(path)
        try:
            parsed = json.loads(blob.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            rows += [(text or "", f"{name} line {number}", error) for number, text, error in _decoded_lines(blob)]
            continue
        items = parsed if isinstance(parsed, list) else [parsed]
        rows += [(json.dumps(item), f"{name} item {i}", "") for i, item in enumerate(items)]
    return _record_table(rows)


def _hellaswag_text_records(table: pa.Table) -> pa.Table:
    """HellaSwag's six-line text layout: "activity: context", the right ending's index, then the four endings.
    (Ray's file reader has already undone any .bz2 compression, from the extension.) Trailing lines that do not
    make a whole item are one `incomplete_record` drop."""
    rows = []
    for blob, path in zip(table["bytes"].to_pylist(), table["path"].to_pylist()):
        name = os.path.basename(path)
        try:
            lines = blob.decode("utf-8").split("\n")
        except UnicodeDecodeError as e:
            rows.append(("", name, f"invalid_utf8: {e.reason} at byte {e.start}"))
            continue
        if lines and lines[-1] == "":
            lines.pop()  # the file's final newline
        whole = len(lines) - len(lines) % 6
        for start in range(0, whole, 6):
            context, label, *endings = lines[start:start + 6]
            rows.append((json.dumps({"ctx": context, "label": label, "endings": endings}),
                         f"{name} line {start + 1}", ""))
        if whole < len(lines):
            rows.append(("", f"{name} line {whole + 1}", f"incomplete_record: {len(lines)} lines, not a multiple of "
                                                         f"6; the last {len(lines) - whole} are not a whole item"))
    return _record_table(rows)


READERS = {".jsonl": "JSON lines", ".json": "JSON", ".parquet": "Parquet", ".txt": "HellaSwag text"}
COMPRESSION = (".gz", ".bz2", ".zst", ".lz4")  # what pyarrow's input streams decompress, detected by extension
IGNORED = ("_", ".")  # _SUCCESS, _manifest.json, .DS_Store, .cache/: bookkeeping, not data


def _extension(name: str) -> str:
    """The data kind of a file name, compression suffix aside: x.jsonl.gz -> .jsonl, x.txt.bz2 -> .txt."""
    stem = name.lower()
    for suffix in COMPRESSION:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return os.path.splitext(stem)[1]


def is_saved_hf_dataset(path: str) -> bool:
    """A folder written by `datasets`' save_to_disk: Arrow shards plus JSON metadata files that are not data."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                       for f in ("state.json", "dataset_dict.json"))


def source_files(path: str) -> tuple[str, list[str]]:
    """The reader kind of a local path or URI and the data files to read. A folder must hold one kind of data file
    (compressed or not); a file of another kind in it is an error that names it, never silently skipped."""
    listed = storage.list_files(path)
    if not listed:
        raise FileNotFoundError(f"{path}: no such file or folder (or an empty one)")
    files = [uri for uri, _ in listed
             if not any(part.startswith(IGNORED) for part in uri[len(path.rstrip("/")):].split("/") if part)]
    kinds = {}
    for name in files:
        kinds.setdefault(_extension(name), []).append(name)
    unknown = {k: v for k, v in kinds.items() if k not in READERS}
    if unknown or len(kinds) != 1:
        listing = "; ".join(f"{k or 'no extension'}: {', '.join(os.path.basename(n) for n in v[:3])}"
                            for k, v in sorted(kinds.items()))
        raise ValueError(f"{path}: expected data files of one kind among {', '.join(READERS)} (optionally "
                         f"{'/'.join(COMPRESSION)}); found {listing or 'no files'}")
    kind = next(iter(kinds))
    if kind == ".parquet":
        import pyarrow.parquet as pq

        for uri in files:
            fs, inner = storage.resolve(uri)
            try:
                pq.read_metadata(inner, filesystem=fs)  # a truncated file has no footer
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{uri}: not a readable Parquet file ({e})") from None
    return kind, files


def check_source_files(sources: list[SourceSection] | list[EvalSourceSection], key: str) -> None:
    """Each file source holds files of one readable kind (source_files), checked in the driver before Ray starts;
    `key` names the sources' list in the config (data.sources, eval.sources)."""
    for i, source in enumerate(sources):
        if source.path.startswith("hf:") or is_saved_hf_dataset(source.path):
            continue
        try:
            source_files(source.path)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{key}[{i}].path: {e}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def checked_tokenizer(cfg: Config):
    """The run's tokenizer, loaded as the stages load it; a folder without one, or one that fails to load, is a
    ConfigError naming the key."""
    from pipeline.fingerprint import model_folder

    key = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
    path = cfg.model.tokenizer or cfg.model.name_or_path
    folder = path if storage.is_remote(path) else model_folder(path)[0]  # a hub name: its cached snapshot
    if os.path.isdir(folder) and not any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        raise ConfigError(f"{key}: {path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); set "
                          f"model.tokenizer to a folder or hub name that has one")
    try:
        return load_tokenizer(path, cfg.model.trust_remote_code)
    except Exception as e:
        raise ConfigError(f"{key}: cannot load a tokenizer from {path!r}: {one_line(e)}") from None


def check_inputs(cfg: Config) -> None:
    """The pairs stage's checks before Ray starts (StageSpec.check): its data files and its tokenizer."""
    check_source_files(cfg.data.sources, "data.sources")
    checked_tokenizer(cfg)


def read_source(source: SourceSection | EvalSourceSection, limit: int | None):
    """One source as a Ray Dataset of RECORD_SCHEMA rows (one JSON text per input row), its first `limit` rows
    when set."""
    import ray

    path = source.path
    if path.startswith("hf:") or is_saved_hf_dataset(path):
        import datasets

        if path.startswith("hf:"):
            # The cached snapshot's files, read as a local dataset folder: no hub request, whatever the
            # datasets library's offline handling (the runner resolved it before Ray started).
            from pipeline.fingerprint import hub_folder

            folder, _ = hub_folder(path[3:], "dataset")
            hf = datasets.load_dataset(folder, source.subset, split=source.split)
        else:
            hf = datasets.load_from_disk(path)
            if isinstance(hf, datasets.DatasetDict):
                if source.split not in hf:
                    raise ValueError(f"{path}: saved dataset has splits {sorted(hf)}, not {source.split!r} "
                                     f"(set the source's split)")
                hf = hf[source.split]
        # Its Arrow table (memory-mapped from the datasets cache), not ray.data.from_huggingface: that one asks the
        # hub for the dataset's Parquet export first, which fails offline.
        ds = ray.data.from_arrow(hf.with_format("arrow")[:]).map_batches(_records, batch_format="pyarrow")
    else:
        kind, files = source_files(path)
        if kind == ".parquet":
            ds = ray.data.read_parquet(files, include_paths=True).map_batches(_records, batch_format="pyarrow")
        else:
            reader = {".jsonl": _jsonl_records, ".json": _json_records, ".txt": _hellaswag_text_records}[kind]
            ds = ray.data.read_binary_files(files, include_paths=True).map_batches(reader, batch_format="pyarrow")
    if limit:
        ds = ds.limit(limit)
    return ds


def _quantiles(values) -> dict:
    out = {"count": int(len(values)), "mean": round(float(values.mean()), 2), "max": int(values.max())}
    out.update({f"p{int(q * 100)}": float(values.quantile(q)) for q in EDIT_DISTANCE_QUANTILES})
    return out


def edit_distance_report(frame, out: str) -> dict:
    """Quantiles of the token edit distance per source and split (and over all train pairs), and a histogram PNG
    per source beside the pairs: the profile that tells whether plain DPO is at risk on this data."""
    report = {"all_train": _quantiles(frame[frame.split == "train"].edit_distance) if (frame.split == "train").any()
              else None, "by_source": {}}
    for source in sorted(frame.source.unique()):
        part = frame[frame.source == source]
        report["by_source"][source] = {split: _quantiles(g.edit_distance) for split, g in part.groupby("split")}
    # The leading underscore keeps Parquet readers (pyarrow, Spark, pandas) from taking it for data.
    plots.edit_distance_histograms(frame, storage.join(out, EDIT_DISTANCE_PLOT))
    for source, splits in report["by_source"].items():
        shown = ", ".join(f"{split} median {q['p50']:g} (p10 {q['p10']:g}, p90 {q['p90']:g})"
                          for split, q in splits.items())
        print(f"[dpop] pairs: edit distance of {source}: {shown}", flush=True)
    return report


def _block_summary(block: pa.Table) -> pa.Table:
    """Candidates and records per (source, split, drop reason) in one block, summed in the driver: a map over the
    materialised blocks reuses the stage's workers, where Ray Data's groupby started a shuffle (5 s on 480 pairs)."""
    return block.group_by(["source", "split", "drop_reason"]).aggregate([([], "count_all"), ("first_of_record", "sum")])


def build_pairs(cfg: Config, stage) -> dict:
    from ray.data.expressions import col

    parts = []
    for index, source in enumerate(cfg.data.sources):
        ds = read_source(source, source.limit)
        parts.append(ds.map_batches(lambda t, i=index: t.append_column("source_index", pa.array([i] * t.num_rows,
                                                                                                  pa.int32())),
                                    batch_format="pyarrow"))
    records = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # A single file is one block: split it so tokenization spreads over the cluster.
    built = records.repartition(target_num_rows_per_block=1000).map_batches(
        build_batch, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=256)
    if cfg.data.deduplicate:
        built = built.groupby("pair_id").map_groups(mark_duplicates, batch_format="pyarrow")
    built = built.materialize()
    summary, records_in = Counter(), Counter()
    for row in built.map_batches(_block_summary, batch_format="pyarrow").take_all():
        summary[(row["source"], row["split"], row["drop_reason"])] += row["count_all"]
        records_in[row["source"]] += row["first_of_record_sum"]

    dropped, examples = Counter(), defaultdict(list)
    for row in built.filter(expr=col("drop_reason") != "").take(1000):
        if len(examples[row["drop_reason"]]) < DROP_EXAMPLES:
            examples[row["drop_reason"]].append({"source": row["source"], "detail": row["drop_detail"]})
    per_source = defaultdict(lambda: {"records_in": 0, "train": 0, "eval": 0, "dropped": {}})
    for source, n in records_in.items():
        per_source[source]["records_in"] = n
    for (source, split, reason), n in summary.items():
        if reason:
            dropped[reason] += n
            per_source[source]["dropped"][reason] = per_source[source]["dropped"].get(reason, 0) + n
        else:
            per_source[source][split] += n
    splits = Counter()
    for (_, split, reason), n in summary.items():
        if not reason:
            splits[split] += n
    rows = sum(splits.values())
    # Every candidate (a pair a record yields, or a record dropped whole) is kept or dropped with a reason.
    accounting = {"rows_in": sum(summary.values()), "rows_out": rows, "rows_dropped": sum(dropped.values())}
    assert accounting["rows_in"] == accounting["rows_out"] + accounting["rows_dropped"], accounting
    print(f"[dpop] pairs: {sum(records_in.values())} records read, {rows} pairs kept ({counts_text(splits)}), "
          f"dropped {counts_text(dropped)}", flush=True)
    fields = {"rows": rows, "records_in": sum(records_in.values()), **accounting, "splits": dict(splits),
              "dropped": dict(dropped), "drop_examples": dict(examples), "sources": dict(per_source)}
    check_drops(fields, cfg.data.max_dropped_fraction)

    built.map_batches(kept_pairs, batch_format="pyarrow").write_parquet(stage.out, min_rows_per_file=20_000)
    # Three columns read back with pyarrow in the driver: through Ray Data's read tasks it took 6 s on 480 pairs.
    written = storage.read_parquet(stage.out, ["source", "split", "edit_distance"]).to_pandas()
    assert len(written) == rows, f"wrote {len(written)} pairs, counted {rows}"
    return {**fields, "edit_distance": edit_distance_report(written, stage.out),
            "edit_distance_plot": storage.join(stage.out, EDIT_DISTANCE_PLOT)}


def check_drops(fields: dict, max_dropped_fraction: float) -> None:
    """Fail the stage, drop counts on record, when nothing is left or more than the allowed share was dropped: a
    wrong `format`, `fields` mapping or tokenizer drops most rows, and training on the remnant is not what anyone
    asked for."""
    dropped, total = fields["rows_dropped"], fields["rows_in"]
    top = ", ".join(f"{reason} {n} (e.g. {fields['drop_examples'][reason][0]['detail'][:120]!r})"
                    for reason, n in Counter(fields["dropped"]).most_common(3))
    if fields["rows"] == 0:
        raise StageFailed(f"pairs: every one of {total} candidate pairs was dropped" +
                          (f"; top reasons: {top}" if total else " (the sources hold no rows)"), fields)
    if dropped / total > max_dropped_fraction:
        raise StageFailed(f"pairs: dropped {dropped} of {total} candidate pairs ({dropped / total:.0%}), more than "
                          f"data.max_dropped_fraction {max_dropped_fraction:g}; top reasons: {top}", fields)
