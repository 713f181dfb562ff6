"""Pair formats, tokenization, edit distance and the pairs stage on Ray Data with its drop counts."""
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_config, write_jsonl
from pipeline.config import load_config
from pipeline.pairs import split_of, token_edit_distance, tokenize_pair
from pipeline.runner import run_stages
from pipeline.sources import Drop, RawPair, parse_implicit_prompt, parse_pairwise


def source(**options):
    """A source's config as the parsers receive it: a SourceSection with its defaults."""
    from pipeline.config import SourceSection

    return SourceSection(**{"path": "x.jsonl", "format": "pairwise", **options})


def slow_levenshtein(a, b):
    table = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        previous, table[0] = table[0], i
        for j in range(1, len(b) + 1):
            current = table[j]
            table[j] = min(table[j] + 1, table[j - 1] + 1, previous + (a[i - 1] != b[j - 1]))
            previous = current
    return table[-1]


def test_edit_distance_matches_the_dynamic_programme():
    rng = random.Random(0)
    for _ in range(300):
        vocab = rng.choice([2, 5, 50])
        a = [rng.randrange(vocab) for _ in range(rng.randint(0, 150))]
        if rng.random() < 0.5:  # a near copy, the case DPOP is about
            b = list(a)
            for _ in range(rng.randint(0, 4)):
                if b:
                    b[rng.randrange(len(b))] = rng.randrange(vocab)
        else:
            b = [rng.randrange(vocab) for _ in range(rng.randint(0, 150))]
        assert token_edit_distance(a, b) == slow_levenshtein(a, b)
    assert token_edit_distance([1, 2, 3], [1, 9, 3]) == 1
    assert token_edit_distance([], [4, 5]) == 2


def test_pairwise_strings_and_messages():
    (pair,) = parse_pairwise({"q": "2+2?", "chosen": "4", "rejected": "5"}, source(fields={"prompt": "q"}))
    assert pair == RawPair("2+2?", "4", "5")
    (pair,) = parse_pairwise({"prompt": "2+2?", "chosen": [{"role": "assistant", "content": "4"}],
                              "rejected": "5"}, source())
    assert pair.prompt == [{"role": "user", "content": "2+2?"}]
    assert pair.rejected == [{"role": "assistant", "content": "5"}]


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "p", "chosen": "c"}, "missing_field"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, "missing_field"),
    ({"prompt": "", "chosen": "c", "rejected": "r"}, "empty_field"),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}, "bad_messages"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "bad_type"),
])
def test_pairwise_drops(row, reason):
    with pytest.raises(Drop) as drop:
        parse_pairwise(row, source())
    assert drop.value.reason == reason


def test_implicit_prompt_text_and_messages():
    history = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:"
    (pair,) = parse_implicit_prompt({"chosen": history + " 4", "rejected": history + " 5"}, source())
    assert pair == RawPair(history, " 4", " 5")
    turns = [{"role": "user", "content": "2+2?"}]
    (pair,) = parse_implicit_prompt({"chosen": turns + [{"role": "assistant", "content": "4"}],
                                     "rejected": turns + [{"role": "assistant", "content": "5"}]}, source())
    assert pair.prompt == turns and pair.chosen == [{"role": "assistant", "content": "4"}]
    with pytest.raises(Drop, match="no_shared_prefix"):
        parse_implicit_prompt({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, source())
    with pytest.raises(Drop, match="no_assistant_turn"):
        parse_implicit_prompt({"chosen": "no turns", "rejected": "here"}, source())


def test_chat_template_tokenization(tokenizer):
    prompt = [{"role": "user", "content": "What is 2 plus 2?"}]
    pair = RawPair(prompt, [{"role": "assistant", "content": "four"}], [{"role": "assistant", "content": "five"}])
    out = tokenize_pair(pair, tokenizer, max_prompt_length=64, max_length=128)
    assert out["prompt"] == "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n"
    assert out["chosen"] == "four<|im_end|>\n"
    full = tokenizer.apply_chat_template(prompt + pair.chosen, tokenize=False)
    assert out["prompt"] + out["chosen"] == full
    assert tokenizer.eos_token_id in out["chosen_ids"]  # the template's end of turn is the EOS


def test_string_completions_end_with_eos_and_long_prompts_keep_their_end(tokenizer):
    pair = RawPair("x " * 50 + "What is 2 plus 2? ", "4", "5")
    out = tokenize_pair(pair, tokenizer, max_prompt_length=8, max_length=64)
    assert out["chosen_ids"][-1] == tokenizer.eos_token_id and out["chosen"].endswith(tokenizer.eos_token)
    assert len(out["prompt_ids"]) == 8
    full_ids = tokenizer(pair.prompt)["input_ids"]
    assert out["prompt_ids"] == full_ids[-8:] and out["prompt"].endswith("plus 2? ")
    with pytest.raises(Drop, match="too_long"):
        tokenize_pair(RawPair("q", "4 " * 100, "5"), tokenizer, max_prompt_length=8, max_length=64)
    with pytest.raises(Drop, match="identical"):
        tokenize_pair(RawPair("q", "4", "4"), tokenizer, max_prompt_length=8, max_length=64)


def test_split_is_stable_and_by_prompt():
    assert split_of("a prompt", 0.5) == split_of("a prompt", 0.5)
    share = sum(split_of(f"prompt {i}", 0.2) == "eval" for i in range(5000)) / 5000
    assert 0.17 < share < 0.23
    assert split_of("anything", 0.0) == "train"


def test_pairs_stage_counts_every_row(tmp_path, tiny_model, ray_cluster):
    good = [{"prompt": f"What is {i} plus {i}? ", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"} for i in range(40)]
    chat = [{"prompt": [{"role": "user", "content": f"Say {i}"}], "chosen": [{"role": "assistant", "content": f"{i}"}],
             "rejected": [{"role": "assistant", "content": f"{i + 1}"}]} for i in range(20)]
    bad = [
        "{not json",
        "[1, 2]",
        json.dumps({"prompt": "p", "chosen": "c"}),
        json.dumps({"prompt": "p", "chosen": "", "rejected": "r"}),
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
        json.dumps({"prompt": "p", "chosen": "long " * 300, "rejected": "r"}),
        json.dumps(good[0]),  # a duplicate of the first pair
    ]
    pairwise = write_jsonl(tmp_path / "pairwise.jsonl", good + chat + bad)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    conversations = write_jsonl(tmp_path / "conv.jsonl", [
        {"chosen": history + [{"role": "user", "content": f"n{i}?"}, {"role": "assistant", "content": f"{i}"}],
         "rejected": history + [{"role": "user", "content": f"n{i}?"}, {"role": "assistant", "content": f"{i}!"}]}
        for i in range(15)
    ] + [{"chosen": history, "rejected": [{"role": "user", "content": "other"}, history[1]]}])
    # The same rows as a JSON array and as Parquet: every reader yields the same pairs.
    array_path = tmp_path / "array.json"
    array_path.write_text(json.dumps(good[:10]))
    pq.write_table(pa.Table.from_pylist(good[10:20]), tmp_path / "table.parquet")
    cfg = load_config(write_config(tmp_path / "c.yaml", {
        "run": {"name": "p", "storage": str(tmp_path / "runs")},
        "model": {"name_or_path": tiny_model},
        "data": {"sources": [{"path": pairwise, "format": "pairwise"},
                             {"path": conversations, "format": "implicit_prompt", "name": "hh"},
                             {"path": str(array_path), "format": "pairwise"},
                             {"path": str(tmp_path / "table.parquet"), "format": "pairwise"}],
                 "max_prompt_length": 32, "max_length": 64, "eval_fraction": 0.25, "deduplicate": True},
    }))
    manifest = run_stages(cfg, ["pairs"])["pairs"]
    rows_in = len(good) + len(chat) + len(bad) + 16 + 10 + 10
    assert manifest["records_in"] == rows_in
    assert manifest["dropped"] == {"malformed_row": 2, "missing_field": 1, "empty_field": 1, "identical": 1,
                                   "too_long": 1, "no_shared_prefix": 1, "duplicate": 21}
    # 21 duplicates: the planted one, and the JSON and Parquet copies of good[:20].
    assert manifest["rows"] == 40 + 20 + 15
    assert manifest["rows"] + sum(manifest["dropped"].values()) == rows_in
    table = pq.read_table(tmp_path / "runs" / "p" / "pairs")
    assert table.num_rows == manifest["rows"]
    assert table.schema.field("chosen_ids").type == pa.list_(pa.int32())
    assert len(set(table["pair_id"].to_pylist())) == table.num_rows
    assert sorted(set(table["split"].to_pylist())) == ["eval", "train"]
    assert set(table["source"].to_pylist()) <= {"pairwise", "hh", "array", "table"}
    rows = table.to_pylist()
    for row in rows:
        assert row["edit_distance"] == slow_levenshtein(row["chosen_ids"], row["rejected_ids"])
        assert row["split"] == split_of(row["prompt"], 0.25)
    # Drop details say where the row was: file and line.
    assert manifest["drop_examples"]["missing_field"][0]["detail"] == \
        f"pairwise.jsonl line {len(good) + len(chat) + 3}: no field 'rejected'"
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_dropped"]


def _pairs_config(tmp_path, model, sources, **data) -> str:
    return write_config(tmp_path / "c.yaml", {
        "run": {"name": "bad", "storage": str(tmp_path / "runs")},
        "model": {"name_or_path": model},
        "data": {"sources": sources, "max_prompt_length": 32, "max_length": 64, "eval_fraction": 0.0, **data},
    })


def test_every_bad_input_is_named_or_counted(tmp_path, tiny_model, ray_cluster):
    """Each kind of bad row is a counted drop with its file and line, and each kind of good-but-unusual input
    (U+2028 in a string, gzip beside plain files, a save_to_disk folder) is read whole."""
    import gzip

    import datasets

    def row(i, **extra):
        return {"prompt": f"What is {i} plus {i}? ", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}", **extra}

    separators = [row(100 + i, prompt=f"Line {i}\u2028break\u2029here? ") for i in range(6)]
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in [row(i) for i in range(4)] + separators]
    lines += [
        b'{"prompt": "p", "chosen": "\xff\xfe", "rejected": "r"}',  # invalid UTF-8
        b"{not json",
        json.dumps({"prompt": "p", "chosen": "c"}).encode(),  # missing field
        json.dumps({"prompt": "p", "chosen": 7, "rejected": "r"}).encode(),  # wrong type
        json.dumps({"prompt": "", "chosen": "c", "rejected": "r"}).encode(),  # empty string
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}).encode(),
        json.dumps({"prompt": "p", "chosen": "far " * 50_000, "rejected": "r"}).encode(),  # far over the limit
        json.dumps({"prompt": [{"role": "wizard", "content": "hi"}], "chosen": "a", "rejected": "b"}).encode(),
    ]
    (tmp_path / "lines.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", [row(i) for i in range(10, 13)])
    with gzip.open(mixed / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(row(i)) + "\n" for i in range(20, 24)))
    (mixed / "_SUCCESS").write_text("")  # bookkeeping files are not data
    datasets.Dataset.from_list([row(i) for i in range(30, 35)]).save_to_disk(str(tmp_path / "saved"))
    hellaswag = tmp_path / "hs.txt"
    items = [["act: ctx", "0", "right", "wrong a", "wrong b", "wrong c"], ["act: ctx2", "1", "x", "y", "z", "w"]]
    hellaswag.write_text("\n".join(line for item in items for line in item) + "\nact: cut\n2\nonly\n")

    config = _pairs_config(tmp_path, tiny_model, [
        {"path": str(tmp_path / "lines.jsonl"), "format": "pairwise"},
        {"path": str(mixed), "format": "pairwise"},
        {"path": str(tmp_path / "saved"), "format": "pairwise"},
        {"path": str(hellaswag), "format": "multiple_choice"},
    ], max_dropped_fraction=1.0)
    manifest = run_stages(load_config(config), ["pairs"])["pairs"]
    sources = manifest["sources"]
    assert sources["lines"]["dropped"] == {"invalid_utf8": 1, "malformed_row": 1, "missing_field": 1, "bad_type": 1,
                                           "empty_field": 1, "identical": 1, "too_long": 1, "unknown_role": 1}
    assert sources["lines"]["train"] == 10  # the six rows with U+2028 / U+2029 among them, whole
    assert sources["mixed"]["train"] == 7 and sources["saved"]["train"] == 5
    assert sources["hs"] == {"records_in": 3, "train": 6, "eval": 0, "dropped": {"incomplete_record": 1}}
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_dropped"] == 10 + 8 + 7 + 5 + 6 + 1
    details = {e["detail"] for examples in manifest["drop_examples"].values() for e in examples}
    bad_byte = lines[10].index(b"\xff")
    assert f"lines.jsonl line 11: invalid start byte at byte {bad_byte}" in details
    assert "hs.txt line 13: 15 lines, not a multiple of 6; the last 3 are not a whole item" in details
    prompts = pq.read_table(tmp_path / "runs" / "bad" / "pairs").column("prompt").to_pylist()
    assert sum("\u2028break\u2029" in p for p in prompts) == 6


def test_unreadable_sources_are_named_before_any_work(tmp_path):
    from pipeline.pairs import source_files

    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "c", "rejected": "r"}] * 50), tmp_path / "t.parquet")
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.parquet: not a readable Parquet file"):
        source_files(str(tmp_path / "cut.parquet"))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"x": 1}])
    (folder / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"found \.csv: notes\.csv; \.jsonl: a\.jsonl"):
        source_files(str(folder))
    with pytest.raises(FileNotFoundError, match="gone.jsonl: no such file"):
        source_files(str(tmp_path / "gone.jsonl"))


def test_a_stage_that_keeps_nothing_fails_with_its_drops_on_record(tmp_path, tiny_model, ray_cluster, capsys):
    from pipeline.cli import main

    bad = write_jsonl(tmp_path / "bad.jsonl", ["{nope"] * 4 + [{"prompt": "p", "chosen": "c"}] * 2)
    config = _pairs_config(tmp_path, tiny_model, [{"path": bad, "format": "pairwise"}])
    assert main(["run", config, "--stages", "pairs"]) == 1
    captured = capsys.readouterr()
    assert "every one of 6 candidate pairs was dropped; top reasons: malformed_row 4" in captured.err
    # Progress lines in words and numbers, not Python dicts.
    assert "[dpop] pairs: 6 records read, 0 pairs kept (none), dropped malformed_row 4, missing_field 2" in captured.out
    assert not [line for line in captured.out.splitlines() if line.startswith("[dpop]") and "{" in line]
    manifest = json.loads((tmp_path / "runs" / "bad" / "pairs" / "_manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["dropped"] == {"malformed_row": 4, "missing_field": 2}
    assert main(["status", config]) == 1  # a failed stage: status says so in its exit status too
    assert "pairs      failed" in capsys.readouterr().out  # not done: nothing downstream may use it



def test_too_many_drops_fail_the_stage_naming_the_reasons():
    """data.max_dropped_fraction (default 0.5): most rows dropped means a wrong format or mapping, not bad rows."""
    from pipeline.config import DataSection
    from pipeline.pairs import check_drops
    from pipeline.vocab import StageFailed

    fields = {"rows": 1, "rows_in": 4, "rows_dropped": 3, "dropped": {"malformed_row": 2, "too_long": 1},
              "drop_examples": {"malformed_row": [{"detail": "a.jsonl line 2: Expecting value"}],
                                "too_long": [{"detail": "a.jsonl line 3: 80 tokens > data.max_length 64"}]}}
    with pytest.raises(StageFailed) as failure:
        check_drops(fields, DataSection.model_fields["max_dropped_fraction"].default)
    assert str(failure.value) == ("pairs: dropped 3 of 4 candidate pairs (75%), more than data.max_dropped_fraction "
                                  "0.5; top reasons: malformed_row 2 (e.g. 'a.jsonl line 2: Expecting value'), "
                                  "too_long 1 (e.g. 'a.jsonl line 3: 80 tokens > data.max_length 64')")
    assert failure.value.fields is fields  # the counts go into the failed manifest
    check_drops(fields, 0.75)  # at the limit: allowed
