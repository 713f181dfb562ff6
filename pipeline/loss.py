"""The DPOP loss (Pal et al. 2024, "Smaug", Eq. 3) as a pure function of tensors.

    z       = (log πθ(y_w|x) − log π_ref(y_w|x)) − (log πθ(y_l|x) − log π_ref(y_l|x))
    penalty = max(0, log π_ref(y_w|x) − log πθ(y_w|x))
    L_DPOP  = −log σ( β · (z − λ · penalty) )

The penalty sits inside the sigmoid and is scaled by β, as in the paper. λ = 0 is plain DPO.
Every input is a 1-D tensor of per-pair log-probs summed over completion tokens.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F


class DPOPOutput(NamedTuple):
    losses: torch.Tensor
    """Per-pair loss, shape (pairs,). Reduce it yourself (the trainer sums and divides by the step's pairs)."""
    chosen_rewards: torch.Tensor
    """β · (log πθ(y_w|x) − log π_ref(y_w|x)), detached: the implicit reward of the chosen completion."""
    rejected_rewards: torch.Tensor
    """β · (log πθ(y_l|x) − log π_ref(y_l|x)), detached."""
    penalty: torch.Tensor
    """max(0, log π_ref(y_w|x) − log πθ(y_w|x)), detached: how far the chosen log-prob fell below the reference."""


def dpop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    dpop_lambda: float,
) -> DPOPOutput:
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    penalty = torch.clamp(-chosen_logratio, min=0.0)
    logits = beta * (chosen_logratio - rejected_logratio - dpop_lambda * penalty)
    # logsigmoid is the numerically stable form of log(sigmoid(x)) for large |x|.
    losses = -F.logsigmoid(logits)
    return DPOPOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratio).detach(),
        rejected_rewards=(beta * rejected_logratio).detach(),
        penalty=penalty.detach(),
    )
