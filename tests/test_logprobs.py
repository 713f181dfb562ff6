"""Completion log-probs in both layouts (packed with shared prompts, padded) against one sequence at a time with
an explicit loop, and the chunked output head's gradients against plain autograd."""
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import logprobs
from pipeline.logprobs import ChunkedTokenLogps, completion_logps, make_batch, pack_groups, pad_groups


def tiny_llama(vocab=97, attn="sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def slow_logp(model, prompt, completion):
    """No padding, no masks, no sharing: run the single sequence and add log p(token t | tokens < t) over the
    completion, from the full logits in float64."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = torch.nn.functional.linear(model.model(input_ids=ids).last_hidden_state,
                                            model.lm_head.weight)[0].double()
    return sum(torch.log_softmax(logits[t - 1], dim=-1)[ids[0, t]].item()
               for t in range(len(prompt), len(prompt) + len(completion)))


def random_groups(seed=0, n=7, vocab=97):
    rng = random.Random(seed)
    tokens = lambda lo, hi: [rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    return [(tokens(1, 20), [tokens(1, 15) for _ in range(rng.randint(1, 3))]) for _ in range(n)]


@pytest.mark.parametrize("layout,attn", [("packed", "sdpa"), ("padded", "sdpa"), ("padded", "eager")])
def test_every_layout_equals_one_sequence_at_a_time(layout, attn):
    model = tiny_llama(attn=attn)
    assert logprobs.layout_for(model) == ("packed" if attn == "sdpa" else "padded")
    groups = random_groups()
    with torch.no_grad():
        batched = completion_logps(model, make_batch(groups, pad_id=0, layout=layout))
    expected = [slow_logp(model, prompt, c) for prompt, completions in groups for c in completions]
    assert len(batched) == len(expected)
    assert max(abs(b - e) for b, e in zip(batched.tolist(), expected)) < 1e-4


def test_packing_shares_each_prompt_and_pads_nothing_beyond_the_last_row():
    groups = [([5, 6, 7], [[9, 10], [11]]), ([8], [[12, 13, 14]]), ([3], [[15]])]
    packed = pack_groups(groups, pad_id=0)
    # The widest group (3 + 2 + 1 = 6 tokens) sets the width; the two others (4 and 2 tokens) share a row.
    assert packed.input_ids.tolist() == [[5, 6, 7, 9, 10, 11], [8, 12, 13, 14, 3, 15]]
    assert packed.position_ids[1].tolist() == [0, 1, 2, 3, 0, 1]
    # The third group's tokens see nothing of the second's.
    assert packed.attention_mask[1, 0, 5].tolist() == [False, False, False, False, True, True]
    mask = packed.attention_mask[0, 0]
    # The second completion ([11] at index 5) sees the prompt (0..2) and itself, not the first completion.
    assert mask[5].tolist() == [True, True, True, False, False, True]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3]
    # Every completion token is scored once; the first token of each completion is predicted by the prompt's end.
    assert packed.targets.tolist() == [9, 10, 11, 12, 13, 14, 15]
    assert packed.owner.tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert packed.predictor.tolist() == [2, 3, 2, 6, 7, 8, 10]
    padded = pad_groups(groups, pad_id=0)
    assert padded.input_ids.shape == (4, 5) and padded.num_completions == 4


def test_chunked_head_gradients_equal_plain_autograd():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37, dtype=torch.float64)
    chunked = ChunkedTokenLogps.apply(hidden, weight, targets, 8)
    (chunked.double() * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = torch.log_softmax(hidden @ weight.T, dim=1).gather(1, targets[:, None]).squeeze(1)
    (plain * upstream).sum().backward()
    assert torch.allclose(chunked.double(), plain, atol=1e-5)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-5) and torch.allclose(grads[1], weight.grad, atol=1e-5)


def test_training_gradients_of_packed_equal_padded():
    """The layouts agree on the weights' gradient of a loss of log-probs, not only on values."""
    groups = random_groups(seed=1, n=4)
    grads = {}
    for layout in ("packed", "padded"):
        model = tiny_llama().train()
        completion_logps(model, make_batch(groups, pad_id=0, layout=layout)).sum().backward()
        grads[layout] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grads["packed"], grads["padded"], atol=1e-4, rtol=1e-4)


def test_models_that_transform_their_logits_are_scored_from_full_logits(monkeypatch):
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0  # Llama ignores it; only the choice of path is checked
    groups = random_groups(n=2)
    assert not logprobs.score_completions_only(model)
    with torch.no_grad():
        values = completion_logps(model, make_batch(groups, pad_id=0, layout="packed"))
    expected = [slow_logp(model, p, c) for p, cs in groups for c in cs]
    assert max(abs(v - e) for v, e in zip(values.tolist(), expected)) < 1e-4


def test_bf16_head_gives_fp32_log_probs():
    """A bf16 policy's completion log-probs come from fp32 logits (issue 21): against a float64 computation from the
    same bf16 hidden states and head, each token within 1e-5 nats and a 128-token sum within 1e-3, the threshold
    behind dpop/penalty_active. (Rounding the logits to bf16, as a bf16 matmul does, is off by up to 0.03 a token and
    0.1 nats over 128 tokens here.) Several vocabulary blocks are upcast in turn."""
    torch.manual_seed(0)
    hidden = torch.randn(256, 64).bfloat16()
    weight = (torch.randn(3000, 64) * 0.6).bfloat16()  # logits up to about 20, as a trained head gives
    targets = torch.randint(0, 3000, (256,))
    exact = torch.log_softmax(hidden.double() @ weight.double().T, dim=1).gather(1, targets[:, None]).squeeze(1)
    original = logprobs.VOCAB_BLOCK
    logprobs.VOCAB_BLOCK = 1024
    try:
        got = ChunkedTokenLogps.apply(hidden, weight, targets, 100).double()
    finally:
        logprobs.VOCAB_BLOCK = original
    assert (got - exact).abs().max() < 1e-5
    assert (got[:128].sum() - exact[:128].sum()).abs() < 1e-3
    rounded = torch.log_softmax((hidden @ weight.T).double(), dim=1).gather(1, targets[:, None]).squeeze(1)
    assert (rounded[:128].sum() - exact[:128].sum()).abs() > 1e-2  # what the fp32 logits avoid
