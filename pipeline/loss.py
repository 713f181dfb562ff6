"""The preference losses, pure functions of tensors: DPOP's margin (Pal et al. 2024, "Smaug", Eq. 3) under each
loss of the menu.

    z       = (log πθ(y_w|x) − log π_ref(y_w|x)) − (log πθ(y_l|x) − log π_ref(y_l|x))
    penalty = max(0, log π_ref(y_w|x) − log πθ(y_w|x))
    m       = z − λ · penalty

| loss_type | per pair | from |
|---|---|---|
| `sigmoid` | −(1−ε) log σ(βm) − ε log σ(−βm) | DPO (Rafailov et al. 2023); ε > 0: conservative DPO (Mitchell 2023) |
| `robust`  | ((1−ε)(−log σ(βm)) + ε log σ(−βm)) / (1 − 2ε) | robust DPO (Chowdhury et al. 2024), ε flipped labels |
| `ipo`     | (m − 1/(2β))² | IPO (Azar et al. 2023, Eq. 17; β is the paper's τ) |
| `hinge`   | max(0, 1 − βm) | SLiC (Zhao et al. 2023) |

With λ = 0 each is TRL's loss of the same name (DPOTrainer.dpo_loss). `sigmoid` with λ > 0 is DPOP itself: the
penalty sits inside the sigmoid and is scaled by β, as in the paper. Every input is a 1-D tensor of per-pair
log-probs, summed over completion tokens (for `ipo` the trainer passes them averaged over the completion's tokens,
as TRL does, so 1/(2β) is a margin per token). RPO's NLL term (Pang et al. 2024) is `chosen_nll`, added by the
trainer with its weight α.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")


class PreferenceLossOutput(NamedTuple):
    losses: torch.Tensor
    """Per-pair loss, shape (pairs,). Reduce it yourself (the trainer sums and divides by the step's pairs)."""
    chosen_rewards: torch.Tensor
    """β · (log πθ(y_w|x) − log π_ref(y_w|x)), detached: the implicit reward of the chosen completion."""
    rejected_rewards: torch.Tensor
    """β · (log πθ(y_l|x) − log π_ref(y_l|x)), detached."""
    penalty: torch.Tensor
    """max(0, log π_ref(y_w|x) − log πθ(y_w|x)), detached: how far the chosen log-prob fell below the reference."""



def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    dpop_lambda: float = 0.0,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: one of {', '.join(LOSS_TYPES)}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to sigmoid and robust, not {loss_type}")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    penalty = torch.clamp(-chosen_logratio, min=0.0)
    margin = chosen_logratio - rejected_logratio - dpop_lambda * penalty
    eps = label_smoothing
    # logsigmoid is the numerically stable form of log(sigmoid(x)) for large |x|.
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)
    elif loss_type == "robust":
        losses = ((1 - eps) * -F.logsigmoid(beta * margin) + eps * F.logsigmoid(-beta * margin)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * margin)
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratio).detach(),
        rejected_rewards=(beta * rejected_logratio).detach(),
        penalty=penalty.detach(),
    )


def dpop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    dpop_lambda: float,
) -> PreferenceLossOutput:
    """L_DPOP = −log σ(β · (z − λ · penalty)): the `sigmoid` loss without label smoothing. λ = 0 is plain DPO."""
    return preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                           beta=beta, loss_type="sigmoid", dpop_lambda=dpop_lambda)


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term per pair (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): the chosen
    completion's mean token negative log-likelihood, −log πθ(y_w|x) / |y_w|, from its summed log-prob."""
    return -policy_chosen_logps / chosen_tokens
