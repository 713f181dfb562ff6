"""multiple_choice and math_corruption pairs (the Smaug recipes) on inline samples of every layout, then on the
real ARC, HellaSwag and GSM8K files in ../shared."""
import bz2
import json
import random

import pyarrow.parquet as pq
import pytest

from conftest import write_config, write_jsonl
from pipeline.config import load_config
from pipeline.runner import run_stages
from pipeline.sources import NUMBER, Drop, corrupt_solution, parse_math_corruption, parse_multiple_choice
from test_pairs import source

ARC_ROW = {
    "instruction": "Please choose the correct answer to the question: George wants to warm his hands quickly by "
                   "rubbing them. Which skin surface will produce the most heat?\n\nAnswer1: dry palms Answer2: wet "
                   "palms Answer3: palms covered with oil Answer4: palms covered with lotion\n\nAnswer format: "
                   "answer1/answer2/answer3/answer4",
    "input": "", "output": "the correct answer is answer1", "answer": "answer1",
}
AI2_ARC_ROW = {"id": "x", "question": "Which is a metal?", "answerKey": "B",
               "choices": {"text": ["wood", "iron", "glass"], "label": ["A", "B", "C"]}}
HELLASWAG_ROW = {"activity_label": "Roof shingle removal", "ctx": "A man is sitting on a roof. he",
                 "endings": ["is using wrap.", "is ripping level tiles off.", "holds a cube.", "starts pulling up roofing."],
                 "label": "3"}
GSM8K_ROW = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                         "May. How many clips did Natalia sell altogether in April and May?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                       "altogether in April and May.\n#### 72"}


def test_arc_instruction_layout():
    pairs = parse_multiple_choice(ARC_ROW, source())
    assert len(pairs) == 3
    assert pairs[0].prompt == ("Question: George wants to warm his hands quickly by rubbing them. Which skin surface "
                               "will produce the most heat?\nAnswer:")
    assert {p.chosen for p in pairs} == {" dry palms"}
    assert [p.rejected for p in pairs] == [" wet palms", " palms covered with oil", " palms covered with lotion"]


def test_ai2_arc_hellaswag_and_named_fields():
    pairs = parse_multiple_choice(AI2_ARC_ROW, source())
    assert [(p.chosen, p.rejected) for p in pairs] == [(" iron", " wood"), (" iron", " glass")]
    pairs = parse_multiple_choice(HELLASWAG_ROW, source())
    assert pairs[0].prompt == "Roof shingle removal: A man is sitting on a roof. he"  # endings continue the context
    assert {p.chosen for p in pairs} == {" starts pulling up roofing."} and len(pairs) == 3
    row = {"q": "2+2?", "options": ["3", "4", "5"], "right": "4"}
    pairs = parse_multiple_choice(row, source(fields={"question": "q", "choices": "options", "answer": "right"},
                                              prompt_template="Q: {question}\nA:"))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("Q: 2+2?\nA:", " 4", " 3"), ("Q: 2+2?\nA:", " 4", " 5")]
    pairs = parse_multiple_choice({"question": "2+2?", "choices": ["3", "4"], "answer": 1}, source(chat=True))
    assert pairs[0].prompt == [{"role": "user", "content": "Question: 2+2?\nAnswer:"}]
    assert pairs[0].chosen == [{"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("row, reason", [
    ({"question": "q", "choices": ["a", "b"], "answer": 5}, "bad_answer"),
    ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "bad_answer"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "too_few_choices"),
    ({"question": "q", "choices": ["a", "b"]}, "missing_field"),
    ({"instruction": "Pick one: a or b", "answer": "answer1"}, "unparsed_question"),
])
def test_multiple_choice_drops(row, reason):
    with pytest.raises(Drop) as drop:
        parse_multiple_choice(row, source())
    assert drop.value.reason == reason


def changed_numbers(chosen: str, rejected: str) -> list[tuple[str, str]]:
    """The (old, new) numbers where two solutions differ; asserts everything else is the same text."""
    assert NUMBER.split(chosen) == NUMBER.split(rejected), "the texts differ outside their numbers"
    old, new = NUMBER.findall(chosen), NUMBER.findall(rejected)
    return [(a, b) for a, b in zip(old, new) if a != b]


def check_corruption(row: dict, seed: int = 0) -> list[tuple[str, str]]:
    (pair,) = parse_math_corruption(row, source(format="math_corruption", seed=seed))
    changes = changed_numbers(pair.chosen, pair.rejected)
    assert changes, "a corruption must change something"
    assert len({old for old, _ in changes}) == 1 and len({new for _, new in changes}) == 1  # one number, consistently
    return changes


def test_math_corruption_changes_exactly_one_number_consistently():
    (pair,) = parse_math_corruption(GSM8K_ROW, source(format="math_corruption"))
    assert pair.prompt.startswith("Question: Natalia sold clips") and pair.prompt.endswith("\nAnswer:")
    assert "<<" not in pair.chosen and pair.chosen.endswith("#### 72")
    check_corruption(GSM8K_ROW)
    # The intermediate result 24 recurs later (48+24): changing it at its result changes the later use too.
    rng = random.Random(0)
    solution = "She sold 48/2 = 24 in May.\nIn total 48+24 = 72.\n#### 72"
    seen = set()
    for _ in range(200):
        rejected, old, new = corrupt_solution(solution, rng)
        seen.add(old)
        changes = changed_numbers(solution, rejected)
        # 24's result is used again later; 72 is the result of "48+24 =" (both 72s change) or the final answer only.
        assert changes in ([(old, new)] * 2, [(old, new)]) and (old != "24" or len(changes) == 2)
        assert "48/2" in rejected  # an operand before the changed result is never touched
    assert seen == {"24", "72"}  # only computed results and the final answer are picked


def test_math_corruption_is_deterministic_per_seed_and_counts_its_corruptions():
    first = parse_math_corruption(GSM8K_ROW, source(format="math_corruption", seed=7))
    assert first == parse_math_corruption(GSM8K_ROW, source(format="math_corruption", seed=7))
    seeds = {parse_math_corruption(GSM8K_ROW, source(format="math_corruption", seed=s))[0].rejected for s in range(20)}
    assert len(seeds) > 3
    three = parse_math_corruption(GSM8K_ROW, source(format="math_corruption", corruptions=3))
    assert len({p.rejected for p in three}) == 3 and len({p.chosen for p in three}) == 1
    metamath = {"query": "What is 2 + 3?", "response": "2 + 3 = 5.\nThe answer is: 5"}
    assert check_corruption(metamath)
    with pytest.raises(Drop, match="no_final_answer"):
        parse_math_corruption({"question": "q", "answer": "It is 5."}, source(format="math_corruption"))


def test_stage_reads_every_layout(tmp_path, tokenizer, tiny_model, ray_cluster):
    """Each reader through the pairs stage: JSON array (ARC), JSON lines (ai2_arc, GSM8K), HellaSwag text (plain
    and bz2); every input record is accounted for."""
    (tmp_path / "arc.json").write_text(json.dumps([ARC_ROW, {**ARC_ROW, "answer": "answer9"}]))
    lines = ["Roof: A man is on a roof. he", "3", "wraps skis.", "rips tiles off.", "holds a cube.", "pulls up roofing."]
    (tmp_path / "hs.txt").write_text("\n".join(lines * 2) + "\n")
    (tmp_path / "hs2.txt.bz2").write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    cfg = load_config(write_config(tmp_path / "c.yaml", {
        "run": {"name": "mc", "storage": str(tmp_path / "runs")},
        "model": {"name_or_path": tiny_model},
        "data": {"sources": [
            {"path": str(tmp_path / "arc.json"), "format": "multiple_choice"},
            {"path": write_jsonl(tmp_path / "ai2.jsonl", [AI2_ARC_ROW]), "format": "multiple_choice"},
            {"path": str(tmp_path / "hs.txt"), "format": "multiple_choice"},
            {"path": str(tmp_path / "hs2.txt.bz2"), "format": "multiple_choice", "name": "hs_bz2"},
            {"path": write_jsonl(tmp_path / "gsm.jsonl", [GSM8K_ROW]), "format": "math_corruption",
             "corruptions": 2}],
            "max_prompt_length": 200, "max_length": 400},
    }))
    manifest = run_stages(cfg, ["pairs"])["pairs"]
    by_source = manifest["sources"]
    assert {s: by_source[s]["records_in"] for s in by_source} == {"arc": 2, "ai2": 1, "hs": 2, "hs_bz2": 1, "gsm": 1}
    assert manifest["dropped"] == {"bad_answer": 1}
    assert manifest["rows"] == 3 + 2 + 3 * 3 + 2  # hs holds its item twice and hs_bz2 once more: all kept
    manifest = run_stages(cfg.copy_with({"data.deduplicate": True}), ["pairs"])["pairs"]
    assert manifest["dropped"] == {"bad_answer": 1, "duplicate": 6} and manifest["rows"] == 3 + 2 + 3 + 2
    ed = manifest["edit_distance"]["by_source"]
    assert set(ed) == {"arc", "ai2", "hs", "gsm"}
    assert (tmp_path / "runs" / "mc" / "pairs" / "_edit_distance.png").stat().st_size > 5000


def test_real_arc_hellaswag_gsm8k(shared, tmp_path, ray_cluster):
    """The paper's data sizes: ARC-Challenge train 3,357 pairs, HellaSwag validation 30,126; GSM8K train one
    low-edit-distance pair per problem; all tokenized with the 50k GPT-2 tokenizer."""
    cfg = load_config(write_config(tmp_path / "c.yaml", {
        "run": {"name": "real", "storage": str(tmp_path / "runs")},
        "model": {"name_or_path": str(shared / "models" / "gpt2-tokenizer")},
        "data": {"sources": [
            {"path": str(shared / "data" / "arc" / "ARC-Challenge_train.json"), "format": "multiple_choice",
             "name": "arc"},
            {"path": str(shared / "data" / "hellaswag" / "hellaswag_val_full.txt.bz2"), "format": "multiple_choice",
             "name": "hellaswag"},
            {"path": str(shared / "data" / "gsm8k" / "train.jsonl"), "format": "math_corruption", "name": "gsm8k"}],
            "max_prompt_length": 512, "max_length": 1024, "eval_fraction": 0.0},
    }))
    manifest = run_stages(cfg, ["pairs"])["pairs"]
    by_source = manifest["sources"]
    assert manifest["dropped"] == {}, manifest["drop_examples"]
    assert by_source["arc"]["train"] == 3357, by_source["arc"]
    assert by_source["hellaswag"]["train"] == 30126, by_source["hellaswag"]
    assert by_source["gsm8k"]["records_in"] == 7473
    assert by_source["gsm8k"]["train"] + sum(by_source["gsm8k"]["dropped"].values()) == 7473
    assert by_source["gsm8k"]["train"] >= 7400, by_source["gsm8k"]
    gsm = manifest["edit_distance"]["by_source"]["gsm8k"]["train"]
    assert gsm["p50"] <= 3 and gsm["p90"] <= 6  # one number changed: a few tokens
    table = pq.read_table(tmp_path / "runs" / "real" / "pairs").to_pandas()
    for row in table[table.source == "gsm8k"].head(500).itertuples():
        assert changed_numbers(row.chosen, row.rejected)
