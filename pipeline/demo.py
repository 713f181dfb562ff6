"""A tiny model, tokenizer and preference data set built locally, so the demo and the tests need no download.

    python -m pipeline.demo OUT_DIR

writes OUT_DIR/model (a 2-layer Llama with a ChatML-style chat template, random weights) and
OUT_DIR/pairwise.jsonl, OUT_DIR/conversations.jsonl: arithmetic preference pairs in the `pairwise` and
`implicit_prompt` formats, with a few deliberately broken rows so the demo shows drop counts.
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


def build_tiny_model(out_dir: str, corpus: list[str] | None = None, seed: int = 0) -> str:
    """Save a tiny Llama (hidden 128, 2 heads of dim 64, 2 layers) and its tokenizer to `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if corpus is None:
        corpus = [" ".join(t) for t in arithmetic_examples(2000, seed)] + NUMBER_WORDS
    tokenizer = build_tokenizer(corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
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
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


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


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_dir = os.path.abspath(sys.argv[1])
    paths = write_demo_data(out_dir)
    if not os.path.exists(os.path.join(out_dir, "model", "config.json")):
        build_tiny_model(os.path.join(out_dir, "model"))
    print(f"demo model: {out_dir}/model; data: {', '.join(paths.values())}")


if __name__ == "__main__":
    main()
