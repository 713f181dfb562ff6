"""Batched, padded log-prob gathering against one sequence at a time with an explicit loop."""
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.logprobs import completion_logps, pad_pairs, sequence_logps


def tiny_llama(vocab=97):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def slow_logp(model, prompt, completion):
    """No padding, no masks: run the single sequence and add log p(token t | tokens < t) over the completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for t in range(len(prompt), len(prompt) + len(completion)):
        total += torch.log_softmax(logits[t - 1], dim=-1)[ids[0, t]].item()
    return total


def test_batched_padded_equals_one_at_a_time():
    model = tiny_llama()
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 97) for _ in range(rng.randint(1, 20))] for _ in range(7)]
    completions = [[rng.randrange(1, 97) for _ in range(rng.randint(1, 15))] for _ in range(7)]
    batch = pad_pairs(prompts, completions, pad_id=0)
    with torch.no_grad():
        batched = completion_logps(model, batch)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        assert abs(batched[i].item() - slow_logp(model, p, c)) < 1e-4


def test_masks_cover_exactly_the_completion():
    batch = pad_pairs([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["completion_mask"].int().tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]


def test_prompt_and_padding_tokens_never_count():
    """Garbage at the logits of prompt-token targets and padding changes nothing; at a completion target it does."""
    batch = pad_pairs([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=0)
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 20)
    base = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
    noisy = logits.clone()
    noisy[0, :2] = 1e4 * torch.randn(2, 20)  # positions predicting prompt tokens 6 and 7
    noisy[1, 4] = 1e4 * torch.randn(20)  # the padding position (it would predict nothing)
    assert torch.allclose(base, sequence_logps(noisy, batch["input_ids"], batch["completion_mask"]))
    noisy[1, 2, 13] += 5.0  # the logit of completion token 13, predicted at position 2
    assert not torch.allclose(base, sequence_logps(noisy, batch["input_ids"], batch["completion_mask"]))
