"""Online rounds: the generate stage samples k completions of each problem, seeded, and counts every problem it
cannot use."""
import json

import pyarrow.parquet as pq

from conftest import write_config, write_jsonl
from pipeline.config import load_config

PROBLEMS = [
    {"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "What is 4 plus 4?", "answer": 8},
    {"question": "What is 10 minus 1?", "answer": "9"},
    {"question": "What is 1 plus 1?", "answer": "two, I think"},
    {"question": "What is 7 plus 1?"},
    {"question": "  ", "answer": "#### 3"},
]


def online_config(tmp_path, tiny_model, **online):
    return load_config(write_config(tmp_path / "online.yaml", {
        "run": {"name": "online", "storage": str(tmp_path / "runs")},
        "model": {"name_or_path": tiny_model},
        "data": {"sources": [{"path": str(write_jsonl(tmp_path / "pairs.jsonl", [
            {"prompt": "a", "chosen": "b", "rejected": "c"}])), "format": "pairwise"}],
                 "max_prompt_length": 32, "max_length": 64},
        "reference": {"backend": "hf", "dtype": "float32", "use_gpu": False},
        "online": {"prompts": [{"path": str(write_jsonl(tmp_path / "problems.jsonl", PROBLEMS))}],
                   "samples_per_prompt": 4, "max_new_tokens": 12, "temperature": 1.0, **online},
    }))


def test_generate_samples_k_completions_per_problem_seeded_and_counts_the_rest(tmp_path, tiny_model, ray_cluster):
    from pipeline.generate import generate_samples
    from pipeline.runner import StageContext

    cfg = online_config(tmp_path, tiny_model)
    outputs = []
    for attempt in ("first", "again"):
        out = tmp_path / attempt
        manifest = generate_samples(cfg, StageContext(out=str(out), inputs={}, fingerprint=""))
        outputs.append(sorted(pq.read_table(out).to_pylist(), key=lambda row: row["prompt_id"]))
    assert manifest["rows"] == 3 and manifest["rows_in"] == 6
    assert manifest["dropped"] == {"no_gold_answer": 2, "missing_field": 1}
    assert "two, I think" in json.dumps(manifest["drop_examples"])
    assert manifest["sampling"]["n"] == 4 and manifest["sampling"]["temperature"] == 1.0
    assert manifest["sampling"]["seed"] == 0 and manifest["completion_tokens"] > 0
    first, again = outputs
    assert first == again  # seeded: the same samples twice
    assert sorted(row["gold"] for row in first) == ["5", "8", "9"]
    assert all(len(row["completions"]) == 4 for row in first)
    assert any(len(set(row["completions"])) > 1 for row in first)
    other = generate_samples(online_config(tmp_path, tiny_model, seed=1),
                             StageContext(out=str(tmp_path / "other"), inputs={}, fingerprint=""))
    assert other["rows"] == 3
    assert sorted(pq.read_table(tmp_path / "other").to_pylist(), key=lambda row: row["prompt_id"]) != first


def generated(tmp_path, problems: list[dict]) -> str:
    """A generate stage's output: one row a problem with its completions."""
    import pyarrow as pa

    from pipeline import storage

    folder = tmp_path / "generate"
    rows = [{"prompt_id": f"p{i}", "source": "problems", "task": "gsm8k", "question": f"q{i}",
             "prompt": f"Question: q{i}\nAnswer:", "prompt_ids": [5, 6, 7], **problem} for i, problem in enumerate(problems)]
    storage.write_parquet(pa.Table.from_pylist(rows), str(folder / "part.parquet"))
    return str(folder)


def test_verified_samples_become_pairs_and_every_problem_without_one_is_counted(tmp_path, tiny_model):
    from pipeline.runner import StageContext
    from pipeline.sampled_pairs import pair_samples

    cfg = online_config(tmp_path, tiny_model, pairs_per_prompt=2)
    cfg.data.eval_fraction = 0.0
    inputs = {"generate": generated(tmp_path, [
        {"gold": "5", "completions": [" 2 + 3 = 6\n#### 6", " 2 + 3 = 5\n#### 5", " five", " 3 + 2 = 5\n#### 5"]},
        {"gold": "8", "completions": [" #### 8", " 4 + 4 = 8\n#### 8", " #### 8", " so 8"]},
        {"gold": "9", "completions": [" #### 1", " #### 2", " #### 3", " #### 4"]},
        {"gold": "2", "completions": [" #### 2", " two", " to", " #### 3"]},
    ])}
    manifest = pair_samples(cfg, StageContext(out=str(tmp_path / "pairs"), inputs=inputs, fingerprint=""))
    pairs = pq.read_table(tmp_path / "pairs").to_pylist()
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        (" 2 + 3 = 5\n#### 5<|im_end|>", " 2 + 3 = 6\n#### 6<|im_end|>"),
        (" #### 2<|im_end|>", " #### 3<|im_end|>")]  # each completion ended by the tokenizer's EOS
    assert manifest["rows"] == 2 and manifest["problems_in"] == 4 and manifest["problems_paired"] == 2
    assert manifest["usable_share"] == 0.5
    assert manifest["dropped"] == {"all_correct": 1, "all_wrong": 1}
    assert manifest["completions_unscored"] == {"no_final_answer": 4}
    assert all(p["chosen_ids"][-1] == p["rejected_ids"][-1] for p in pairs) and all(p["split"] == "train"
                                                                                     for p in pairs)


MULTIPLE_CHOICE = [
    {"question": "Which is a mammal?", "choices": {"text": ["trout", "whale", "shark"], "label": ["A", "B", "C"]},
     "answerKey": "B"},  # Hugging Face ai2_arc
    {"question": "What is 2 plus 2?", "choices": ["3", "4"], "answer": 1},  # question, choices, answer index
    {"question": "Pick one", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "E"},
    {"question": "Only one", "choices": ["x"], "answer": 0},
]


def test_multiple_choice_prompts_letter_their_choices_and_the_verifier_reads_the_letter(tmp_path, tiny_model,
                                                                                         ray_cluster):
    from pipeline.generate import read_problems
    from pipeline.pairs import load_tokenizer
    from pipeline.runner import StageContext
    from pipeline.sampled_pairs import pair_samples

    cfg = online_config(tmp_path, tiny_model, prompts=[
        {"path": str(write_jsonl(tmp_path / "arc.jsonl", MULTIPLE_CHOICE)), "task": "multiple_choice"}])
    cfg.data.max_length = 128  # the lettered choices are longer than the math questions
    problems, dropped, examples = read_problems(cfg, load_tokenizer(tiny_model, False))  # (in any order)
    assert sorted(p["prompt"] for p in problems) == ["Question: What is 2 plus 2?\nA. 3\nB. 4\nAnswer:",
                                                     "Question: Which is a mammal?\nA. trout\nB. whale\nC. shark\nAnswer:"]
    assert [(p["gold"], p["task"]) for p in problems] == [("B", "multiple_choice")] * 2
    assert dropped == {"no_gold_answer": 1, "too_few_choices": 1} and "'E'" in examples["no_gold_answer"][0]

    cfg.data.eval_fraction = 0.0
    inputs = {"generate": generated(tmp_path, [
        {"task": "multiple_choice", "gold": "B", "completions": [" A. trout", " B", " because", " #### B"]},
        {"task": "multiple_choice", "gold": "A", "completions": [" A", " (A) since", " A.", " #### A"]},
    ])}
    manifest = pair_samples(cfg, StageContext(out=str(tmp_path / "pairs"), inputs=inputs, fingerprint=""))
    pairs = pq.read_table(tmp_path / "pairs").to_pylist()
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(" B<|im_end|>", " A. trout<|im_end|>")]
    assert manifest["dropped"] == {"all_correct": 1} and manifest["completions_unscored"] == {"no_final_answer": 1}


def test_reward_model_labels_pair_the_highest_against_the_lowest_reward(tmp_path, tiny_model, ray_cluster):
    from pipeline.engines import RewardEngine
    from pipeline.pairs import load_tokenizer
    from pipeline.runner import StageContext
    from pipeline.sampled_pairs import pair_samples
    from test_labels import tiny_reward_model

    reward_model = tiny_reward_model(tmp_path / "rm", tiny_model)
    cfg = online_config(tmp_path, tiny_model, labeller="reward_model", reward_model=reward_model)
    completions = [" one", " two plus", " three is 3", " four"]
    inputs = {"generate": generated(tmp_path, [{"gold": "1", "completions": completions}])}
    manifest = pair_samples(cfg, StageContext(out=str(tmp_path / "pairs"), inputs=inputs, fingerprint=""))
    tokenizer = load_tokenizer(tiny_model, False)
    rewards = RewardEngine(reward_model, "float32", False, 1, False).rewards(
        [[5, 6, 7]] * 4, [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                          for c in completions])
    (pair,) = pq.read_table(tmp_path / "pairs").to_pylist()
    best, worst = max(range(4), key=rewards.__getitem__), min(range(4), key=rewards.__getitem__)
    assert (pair["chosen"], pair["rejected"]) == (completions[best] + "<|im_end|>", completions[worst] + "<|im_end|>")
    assert manifest["labeller"] == "reward_model" and manifest["completions_unscored"] == {}
