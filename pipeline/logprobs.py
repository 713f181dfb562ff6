"""Summed completion log-probs, the one scoring path of the trainer and the `hf` backend (reference and eval).

A batch is a list of groups: one prompt and the completions scored after it (a pair's chosen and rejected, a
question's choices, or one completion). Two layouts put them into tensors (`ScoringBatch`):

- `packed` (for PyTorch's scaled_dot_product_attention, transformers' `sdpa`, which takes a boolean mask): each
  group is one run of tokens, prompt + completion_1 + ... + completion_k, and runs are packed into rows without padding. A 4-D mask lets a
  token see only earlier tokens of its own prompt and its own completion, and position ids restart at the
  prompt's length for every completion, so each completion is scored exactly as if it followed the prompt alone.
  The prompt is computed once for all its completions (prefix sharing), and no position is padding.
- `padded`: one row per prompt + completion, right-padded: the fallback for every other attention kernel
  (flash-attention takes no custom mask; eager adds the mask to the scores as floats).

Either way the output head runs only on the positions that predict a completion token, a chunk of them at a time
(`ChunkedTokenLogps`), so no (tokens, vocabulary) float tensor exists for the whole batch, in forward or backward.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Rows of the output head's input scored at once: the (chunk, vocabulary) fp32 logits are the largest tensor.
HEAD_CHUNK = 1024

Group = tuple[list[int], list[list[int]]]
"""A prompt's token ids and the token ids of each completion scored after it."""


@dataclass
class ScoringBatch:
    input_ids: torch.Tensor
    """(rows, width) token ids."""
    position_ids: torch.Tensor
    """(rows, width): packed completions restart at their prompt's length."""
    attention_mask: torch.Tensor
    """(rows, width) 1 on tokens for `padded`; (rows, 1, width, width) bool, True where a query may attend a key,
    for `packed`."""
    predictor: torch.Tensor
    """(tokens,) index into the flattened (rows * width) positions of the one whose output predicts each
    completion token."""
    targets: torch.Tensor
    """(tokens,) the completion tokens."""
    owner: torch.Tensor
    """(tokens,) which completion (in group order, then completion order) each token belongs to."""
    num_completions: int

    def to(self, device) -> "ScoringBatch":
        return ScoringBatch(*(t.to(device) for t in (self.input_ids, self.position_ids, self.attention_mask,
                                                      self.predictor, self.targets, self.owner)),
                            self.num_completions)


def _score_positions(prompt_len: int, starts: list[int], completions: list[list[int]], offset: int):
    """(predictor, target) flat indices for completions laid out at `starts` after a prompt at `offset`. The first
    completion token is predicted by the prompt's last token, every later one by the token before it."""
    predictor, targets = [], []
    for start, completion in zip(starts, completions):
        predictor.append(offset + prompt_len - 1)
        predictor.extend(range(offset + start, offset + start + len(completion) - 1))
        targets.extend(completion)
    return predictor, targets


def pad_groups(groups: list[Group], pad_id: int) -> ScoringBatch:
    """One right-padded row per prompt + completion."""
    rows = [(prompt, completion) for prompt, completions in groups for completion in completions]
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    predictor, targets, owner = [], [], []
    for row, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[row, :n] = torch.as_tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, :n] = 1
        row_predictor, row_targets = _score_positions(len(prompt), [len(prompt)], [completion], row * width)
        predictor += row_predictor
        targets += row_targets
        owner += [row] * len(completion)
    position_ids = torch.arange(width).expand(len(rows), width).clone()
    return ScoringBatch(input_ids, position_ids, attention_mask, torch.tensor(predictor), torch.tensor(targets),
                        torch.tensor(owner), len(rows))


def pack_groups(groups: list[Group], pad_id: int) -> ScoringBatch:
    """Groups packed into rows as wide as the longest group (first fit, longest first), each group's prompt
    shared by its completions. Rows of one group's width keep attention's cost linear in the batch: one row
    holding everything would cost the square of the batch's tokens."""
    lengths = [len(prompt) + sum(map(len, completions)) for prompt, completions in groups]
    width = max(lengths)
    rows: list[list[int]] = []  # group indices per row
    used: list[int] = []
    for g in sorted(range(len(groups)), key=lambda g: -lengths[g]):
        row = next((r for r in range(len(rows)) if used[r] + lengths[g] <= width), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(g)
        used[row] += lengths[g]

    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    # segment: which run of tokens (a prompt, or one completion) a position is; a query sees a key of the same
    # segment (causally) or of its own group's prompt.
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    prompt_of = torch.full((len(rows), width), -2, dtype=torch.long)
    first_completion = sum(len(c) for _, c in groups)  # segment ids of prompts follow those of completions
    completion_ids = [0]
    for _, completions in groups:
        completion_ids.append(completion_ids[-1] + len(completions))
    predictor = {}
    for row, members in enumerate(rows):
        at = 0
        for g in members:
            prompt, completions = groups[g]
            offset = row * width + at
            prompt_segment = first_completion + g
            input_ids[row, at:at + len(prompt)] = torch.as_tensor(prompt)
            position_ids[row, at:at + len(prompt)] = torch.arange(len(prompt))
            segment[row, at:at + len(prompt)] = prompt_segment
            prompt_of[row, at:at + len(prompt)] = prompt_segment
            start, starts = len(prompt), []
            for k, completion in enumerate(completions):
                span = slice(at + start, at + start + len(completion))
                input_ids[row, span] = torch.as_tensor(completion)
                position_ids[row, span] = torch.arange(len(prompt), len(prompt) + len(completion))
                segment[row, span] = completion_ids[g] + k
                prompt_of[row, span] = prompt_segment
                starts.append(start)
                start += len(completion)
            predictor[g] = _score_positions(len(prompt), starts, completions, offset)
            at += lengths[g]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_segment = segment[:, :, None] == segment[:, None, :]
    sees_own_prompt = prompt_of[:, :, None] == segment[:, None, :]
    mask = causal & (same_segment | sees_own_prompt) & (segment[:, None, :] >= 0)
    # A padding query attends to itself only, so no row of the softmax is empty (its output is never read).
    mask |= torch.eye(width, dtype=torch.bool) & (segment[:, :, None] < 0)

    flat_predictor, targets, owner = [], [], []
    for g, (_, completions) in enumerate(groups):
        flat_predictor += predictor[g][0]
        targets += predictor[g][1]
        for k, completion in enumerate(completions):
            owner += [completion_ids[g] + k] * len(completion)
    return ScoringBatch(input_ids, position_ids, mask[:, None], torch.tensor(flat_predictor),
                        torch.tensor(targets), torch.tensor(owner), completion_ids[-1])


def layout_for(model, requested: str = "packed") -> str:
    """`packed` needs sdpa attention (a boolean 4-D mask); every other kernel falls back to `padded`."""
    return requested if getattr(model.config, "_attn_implementation", None) == "sdpa" else "padded"


def make_batch(groups: list[Group], pad_id: int, layout: str) -> ScoringBatch:
    return pack_groups(groups, pad_id) if layout == "packed" else pad_groups(groups, pad_id)


VOCAB_BLOCK = 16384
"""Rows of the output head upcast to fp32 at a time (64 MB of fp32 at hidden size 1024, 512 MB at 8192)."""


def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T computed in fp32 whatever the inputs' dtype. A bf16 matmul rounds its output to bf16: a
    logit near 20 moves by up to 0.06, a 128-token sequence's log-prob by several hundredths of a nat, far above the
    1e-3-nat threshold behind dpop/penalty_active. The head's rows are upcast VOCAB_BLOCK at a time, so no fp32 copy
    of the whole head exists (4.2 GB for a 128k x 8192 head)."""
    hidden = hidden.float()
    if weight.dtype == torch.float32:
        return hidden @ weight.T
    return torch.cat([hidden @ weight[row:row + VOCAB_BLOCK].float().T
                      for row in range(0, len(weight), VOCAB_BLOCK)], dim=1)


class ChunkedTokenLogps(torch.autograd.Function):
    """log p(target) for each row of `hidden` under the output head `weight`, `chunk` rows at a time, from fp32
    logits (fp32_logits).

    Forward keeps no logits. Backward recomputes each chunk's: one more matmul per chunk, in exchange for never
    holding (tokens, vocabulary) floats (the trade Liger-Kernel's fused linear cross-entropy makes). The gradient of
    log softmax(z)[t] is onehot(t) - softmax(z).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(targets), chunk):
            logits = fp32_logits(hidden[start:start + chunk], weight)
            target = targets[start:start + chunk, None]
            out[start:start + chunk] = (logits.gather(1, target) - logits.logsumexp(1, keepdim=True)).squeeze(1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, len(targets), ctx.chunk):
            h = hidden[start:start + ctx.chunk]
            g = grad_out[start:start + ctx.chunk, None].float()
            logits = fp32_logits(h, weight)
            grad_logits = -torch.softmax(logits, dim=1) * g
            grad_logits.scatter_add_(1, targets[start:start + ctx.chunk, None], g)
            # The matmuls in the inputs' dtype (bf16 under mixed precision: an fp32 matmul is many times slower on
            # GPUs), as autograd runs the plain head's backward; the weight's gradient accumulates in fp32.
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + ctx.chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


class _ScoredPositions:
    """What the output head scores during one `completion_logps` call (None: it is a plain linear layer)."""
    predictor: torch.Tensor | None = None
    targets: torch.Tensor | None = None


# Config keys of models that change the logits after the output head (Gemma 2's soft cap, Cohere's and Granite's
# scales): their head's output is not the logits, so they are scored from the full logits instead.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def score_completions_only(model) -> bool:
    """Make the model's output head compute log p(target) at the scored positions only, in chunks, whenever
    `completion_logps` asks, and stay the plain head otherwise (generation, saving: its weights and names are
    unchanged). Its forward runs inside the model's own forward, so FSDP2 has its weight gathered there.
    False where the model's logits are not its head's output (LOGIT_TRANSFORMS) or the head is not a bias-free
    Linear layer."""
    head = model.get_output_embeddings()
    if getattr(head, "scored_positions", None) is not None:
        return True
    if (not isinstance(head, torch.nn.Linear) or head.bias is not None
            or any(getattr(model.config, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS)):
        return False
    head.scored_positions = _ScoredPositions()

    def forward(hidden):
        scored = head.scored_positions
        if scored.predictor is None:
            return F.linear(hidden, head.weight)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored.predictor)
        return ChunkedTokenLogps.apply(rows, head.weight, scored.targets, HEAD_CHUNK)

    head.forward = forward
    return True


@contextlib.contextmanager
def _scoring(model, batch: ScoringBatch):
    scored = model.get_output_embeddings().scored_positions
    scored.predictor, scored.targets = batch.predictor, batch.targets
    try:
        yield
    finally:
        scored.predictor = scored.targets = None


def completion_logps(model, batch: ScoringBatch) -> torch.Tensor:
    """Summed log-probs of every completion of the batch (fp32, shape (num_completions,)), in group order."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "position_ids": batch.position_ids, "use_cache": False}
    if score_completions_only(model):
        with _scoring(model, batch):
            token_logps = model(**inputs).logits.reshape(-1)
    else:
        logits = model(**inputs).logits
        scored = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.predictor).float()
        token_logps = scored.gather(1, batch.targets[:, None]).squeeze(1) - scored.logsumexp(1)
    sums = torch.zeros(batch.num_completions, dtype=torch.float32, device=token_logps.device)
    return sums.index_add(0, batch.owner, token_logps)


def score_sequences(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                    micro_batch_size: int, device) -> list[float]:
    """Summed log-probs (float64 values) of each prompt + completion, as the reference and eval stages score them
    (the `hf` backend): completions after the same prompt form one group, which shares the prompt's computation,
    and groups go shortest first, `micro_batch_size` groups a forward, so a micro-batch holds groups of similar
    length. A sequence whose score is not finite is scored again alone: a NaN or inf in one sequence's activations
    reaches every sequence it shares a packed row with (masked attention weighs it by 0, and 0 * NaN is NaN)."""
    members: dict[tuple, list[int]] = {}
    for i, prompt in enumerate(prompts):
        members.setdefault(tuple(prompt), []).append(i)
    groups = sorted(members.values(), key=lambda g: len(prompts[g[0]]) + sum(len(completions[i]) for i in g))
    layout = layout_for(model)
    logps = [0.0] * len(prompts)
    with torch.inference_mode():
        for start in range(0, len(groups), micro_batch_size):
            chunk = groups[start:start + micro_batch_size]
            batch = make_batch([(prompts[g[0]], [completions[i] for i in g]) for g in chunk], pad_id, layout)
            scores = completion_logps(model, batch.to(device)).double().tolist()
            for i, score in zip((i for g in chunk for i in g), scores):
                logps[i] = score
        for i, score in enumerate(logps):
            if not math.isfinite(score):
                alone = make_batch([(prompts[i], [completions[i]])], pad_id, "padded")
                logps[i] = completion_logps(model, alone.to(device)).double().item()
    return logps

