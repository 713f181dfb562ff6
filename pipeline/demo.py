"""Tiny models, tokenizers and data sets built locally, so the demos and the tests need no download.

    python -m pipeline.demo OUT_DIR

writes
- OUT_DIR/math_model: a 2-layer Llama pretrained on worked word problems, and OUT_DIR/problems.jsonl,
  OUT_DIR/problems_test.jsonl (GSM8K layout): the DPO-against-DPOP demo (jobs/dpo_vs_dpop.yaml);
- OUT_DIR/model (the same Llama, random weights) and OUT_DIR/pairwise.jsonl, OUT_DIR/conversations.jsonl:
  arithmetic preference pairs in the `pairwise` and `implicit_prompt` formats, with a few deliberately broken rows
  so the demo shows drop counts, and eval_sums_*.jsonl benchmarks: the all-formats demo (jobs/demo.yaml).
"""
import json
import os
import random
import sys

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]
NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


def arithmetic_examples(n: int, seed: int):
    """(question, right answer, wrong answer) triples: the wrong answer is off by one, a low-edit-distance pair."""
    rng = random.Random(seed)
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        wrong = a + b + rng.choice([-1, 1])
        yield f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}."


NAMES = ["Ana", "Ben", "Caro", "Dev", "Eli", "Fay", "Gus", "Hana"]
ITEMS = ["apples", "books", "coins", "pens", "stamps", "shells"]


def word_problems(n: int, seed: int, top: int = 30):
    """(question, worked solution ending '#### N') pairs: one- and two-step sums and differences with numbers up to
    `top`, GSM8K's layout, so the `math_corruption` recipe and the eval stage's exact match read them as they are."""
    rng = random.Random(seed)
    for _ in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(1, top), rng.randint(1, top)
        kind = rng.randrange(3)
        if kind == 0:
            total = a + b
            yield (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                   f"{name} has {a} + {b} = {total} {item}.\n#### {total}")
        elif kind == 1:
            a, b = max(a, b), min(a, b)
            yield (f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
                   f"{a} - {b} = {a - b} {item} are left.\n#### {a - b}")
        else:
            c = rng.randint(1, a + b)
            yield (f"{name} has {a} {item}, gets {b} more, then gives away {c}. How many {item} are left?",
                   f"{name} has {a} + {b} = {a + b} {item}. Then {a + b} - {c} = {a + b - c}.\n#### {a + b - c}")


def problem_text(question: str, solution: str) -> str:
    """A problem as the math_corruption pairs and the gsm8k eval present it: 'Question: ...\nAnswer: ...'."""
    return f"Question: {question}\nAnswer: {solution}"


def build_tokenizer(corpus: list[str], vocab_size: int = 512):
    """A byte-level BPE trained on `corpus`, wrapped as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(out_dir: str, corpus: list[str] | None = None, seed: int = 0, layers: int = 2,
                     pretrain_on: list[str] | None = None, pretrain_steps: int = 0) -> str:
    """Save a tiny Llama (hidden 128, 2 heads of dim 64, `layers` layers) and its tokenizer to `out_dir`; with
    `pretrain_on`, first train it for `pretrain_steps` steps as a language model of those texts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if corpus is None:
        corpus = [" ".join(t) for t in arithmetic_examples(2000, seed)] + NUMBER_WORDS
    tokenizer = build_tokenizer(corpus + (pretrain_on or []))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention wants 64 or 128
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if pretrain_on:
        pretrain(model, tokenizer, pretrain_on, pretrain_steps, seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def pretrain(model, tokenizer, texts: list[str], steps: int, seed: int, batch_size: int = 32,
             learning_rate: float = 3e-3) -> list[float]:
    """Plain causal-LM training on `texts` (each ending in EOS), so the demo model is a real model of its task
    before any preference training; returns the loss per step."""
    import torch

    rng = random.Random(seed)
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps,
                                                   pct_start=0.05)
    losses = []
    model.train()
    for step in range(steps):
        batch = rng.sample(encoded, batch_size)
        width = max(map(len, batch))
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in batch])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step == 0:
            print(f"[demo] pretraining the tiny model: step {step + 1}/{steps}, loss {loss.item():.3f}", flush=True)
    model.eval()
    return losses


def write_demo_data(out_dir: str, n_pairs: int = 240, seed: int = 0) -> dict[str, str]:
    """Arithmetic pairs in both formats, plus one row of each kind that the pairs stage must drop."""
    os.makedirs(out_dir, exist_ok=True)
    examples = list(arithmetic_examples(n_pairs, seed))
    half = len(examples) // 2
    pairwise_path = os.path.join(out_dir, "pairwise.jsonl")
    with open(pairwise_path, "w") as f:
        for i, (question, right, wrong) in enumerate(examples[:half]):
            if i % 2:  # every other row as chat messages, to exercise the chat template
                row = {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": right}],
                    "rejected": [{"role": "assistant", "content": wrong}],
                }
            else:
                row = {"prompt": question + " ", "chosen": right, "rejected": wrong}
            f.write(json.dumps(row) + "\n")
        f.write("{this line is not json\n")  # malformed_json
        f.write(json.dumps({"prompt": "What is 1 plus 1?", "chosen": "2"}) + "\n")  # missing_field
        f.write(json.dumps({"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "4"}) + "\n")  # identical
        f.write(json.dumps({"prompt": "What is 3 plus 3?", "chosen": "six " * 400, "rejected": "5"}) + "\n")  # too_long
    conversations_path = os.path.join(out_dir, "conversations.jsonl")
    with open(conversations_path, "w") as f:
        for question, right, wrong in examples[half:]:
            history = [
                {"role": "user", "content": "Answer in one sentence."},
                {"role": "assistant", "content": "Sure."},
                {"role": "user", "content": question},
            ]
            row = {
                "chosen": history + [{"role": "assistant", "content": right}],
                "rejected": history + [{"role": "assistant", "content": wrong}],
            }
            f.write(json.dumps(row) + "\n")
    return {"pairwise": pairwise_path, "conversations": conversations_path}


def write_eval_data(out_dir: str, n_items: int = 40, seed: int = 1) -> dict[str, str]:
    """Held-out benchmarks in the eval stage's layouts: multiple-choice sums (one right total, three off by a little)
    and GSM8K-style problems whose worked answers end in '#### N'. Their own seed: they never enter training."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    paths = {"multiple_choice": os.path.join(out_dir, "eval_sums_choice.jsonl"),
             "gsm8k": os.path.join(out_dir, "eval_sums_gsm8k.jsonl")}
    with open(paths["multiple_choice"], "w") as f:
        for question, right, _ in arithmetic_examples(n_items, seed):
            total = int(right.rstrip(".").split()[-1])
            choices = sorted({total, total + 1, max(0, total - 2), total + 10} - {total}) + [total]
            rng.shuffle(choices)
            f.write(json.dumps({"question": question, "choices": [str(c) for c in choices],
                                "answer": choices.index(total)}) + "\n")
    with open(paths["gsm8k"], "w") as f:
        for question, right, _ in arithmetic_examples(n_items, seed + 1):
            total = right.rstrip(".").split()[-1]
            f.write(json.dumps({"question": question, "answer": f"{right}\n#### {total}"}) + "\n")
    return paths


def write_problem_data(out_dir: str, n_train: int = 480, n_eval: int = 80) -> dict[str, str]:
    """Word problems for the DPO-against-DPOP demo: `problems.jsonl` becomes low-edit-distance pairs through the
    math_corruption recipe (plus two broken rows that the pairs stage drops and counts), `problems_test.jsonl`
    is the held-out exact-match benchmark (another seed)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"problems": os.path.join(out_dir, "problems.jsonl"),
             "problems_test": os.path.join(out_dir, "problems_test.jsonl")}
    with open(paths["problems"], "w") as f:
        for question, solution in word_problems(n_train, seed=2):
            f.write(json.dumps({"question": question, "answer": solution}) + "\n")
        f.write(json.dumps({"question": "How many pens are there?"}) + "\n")  # missing_field
        f.write(json.dumps({"question": "Is it sunny?", "answer": "Yes, it is."}) + "\n")  # no_final_answer
    with open(paths["problems_test"], "w") as f:
        for question, solution in word_problems(n_eval, seed=3):
            f.write(json.dumps({"question": question, "answer": solution}) + "\n")
    return paths


PRETRAIN_PROBLEMS, PRETRAIN_STEPS = 3000, 600


def build_math_model(out_dir: str) -> str:
    """The demo's policy and reference: the tiny Llama trained as a language model of worked word problems (seen
    here: about 45 s on two cores, and about 40% exact match on unseen problems), so preference training starts
    from a model that solves the task sometimes, as in the paper, rather than from random weights."""
    texts = [problem_text(q, s) for q, s in word_problems(PRETRAIN_PROBLEMS, seed=0)]
    return build_tiny_model(out_dir, pretrain_on=texts, pretrain_steps=PRETRAIN_STEPS)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_dir = os.path.abspath(sys.argv[1])
    paths = {**write_demo_data(out_dir), **write_eval_data(out_dir), **write_problem_data(out_dir)}
    if not os.path.exists(os.path.join(out_dir, "model", "config.json")):
        build_tiny_model(os.path.join(out_dir, "model"))
    if not os.path.exists(os.path.join(out_dir, "math_model", "config.json")):
        build_math_model(os.path.join(out_dir, "math_model"))
    print(f"demo models: {out_dir}/model (random weights), {out_dir}/math_model (pretrained on word problems); "
          f"data: {', '.join(paths.values())}")


if __name__ == "__main__":
    main()
