"""Summed completion log-probs of padded (prompt + completion) batches, shared by the `hf` reference
backend and the trainer so that both score sequences the same way."""
import torch


def pad_pairs(prompt_ids, completion_ids, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt+completion sequences into one batch.

    `completion_mask` is 1 exactly on completion tokens: prompt and padding never count.
    """
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    completion_mask = torch.zeros((len(lengths), width), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        n_prompt, n = len(prompt), len(prompt) + len(completion)
        input_ids[row, :n_prompt] = torch.as_tensor(prompt, dtype=torch.long)
        input_ids[row, n_prompt:n] = torch.as_tensor(completion, dtype=torch.long)
        attention_mask[row, :n] = 1
        completion_mask[row, n_prompt:n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token | previous tokens) over completion tokens, one float per row.

    The logit at position t predicts token t+1, so logits and labels are shifted by one. The log-softmax is
    taken in fp32 as logsumexp-subtraction, which avoids materialising a second (batch, length, vocab) tensor.
    """
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:]
    token_logits = torch.gather(logits, 2, labels.unsqueeze(-1)).squeeze(-1)
    token_logps = token_logits - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(dim=-1)


def completion_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the model on a padded batch from `pad_pairs` and return summed completion log-probs."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
