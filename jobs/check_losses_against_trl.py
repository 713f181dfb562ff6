"""Our loss menu at λ = 0 against TRL's own code: TRL's `DPOTrainer._compute_loss` (trl 1.16, the version
jobs/install_trl.sh installs) run on the same per-token log-probs as `pipeline.loss.preference_loss`, for each loss
TRL shares with us, and RPO's NLL term against TRL's `sft` loss term.

    bash jobs/install_trl.sh && .venv-trl/bin/python jobs/check_losses_against_trl.py
        # writes jobs/benchmarks/trl_losses.json

TRL's method is called unbound, on an object holding the attributes it reads, with a stand-in model whose output
is the given per-token log-probs (zero outside the completion, as TRL's fused head gives), so the loss code that
runs is TRL's, line for line. Completions have random lengths, so IPO's per-token averaging is exercised.
"""
import json
import os
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.loss import chosen_nll, preference_loss  # noqa: E402  (after the path: only torch is needed)


def batch(pairs: int, length: int, seed: int) -> dict:
    """Per-token log-probs of `pairs` chosen then rejected completions (rows), their completion masks, and
    reference log-probs; completions end at random lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, length, (2 * pairs,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    token_logps = -torch.rand(2 * pairs, length, generator=g, dtype=torch.float64) * 3 * mask
    ref = token_logps.sum(1) + torch.randn(2 * pairs, generator=g, dtype=torch.float64)
    return {"token_logps": token_logps, "mask": mask, "lengths": lengths, "ref": ref}


def trl_loss(loss_type: str, beta: float, label_smoothing: float, data: dict) -> float:
    """TRL's per-batch loss: its `_compute_loss`, unbound, with a stand-in model and accelerator."""
    from trl.trainer.dpo_trainer import DPOTrainer

    rows, length = data["mask"].shape
    # TRL shifts the completion mask by one against its inputs (the log-prob of token t+1 sits at t).
    completion_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), data["mask"]], dim=1)
    outputs = SimpleNamespace(log_probs=data["token_logps"], entropy=torch.zeros(rows, length),
                              mean_logits=torch.zeros(rows, length), is_top1=torch.zeros(rows, length, dtype=bool),
                              aux_loss=None)

    class Model:
        training = True

        def __call__(self, **kwargs):
            return outputs

    identity = SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t)
    trainer = SimpleNamespace(model=Model(), accelerator=identity, aux_loss_enabled=False, ld_alpha=None,
                              precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                              loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
                              _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    half = rows // 2
    inputs = {"input_ids": torch.zeros(rows, length + 1, dtype=torch.long), "attention_mask": completion_mask,
              "completion_mask": completion_mask, "ref_chosen_logps": data["ref"][:half],
              "ref_rejected_logps": data["ref"][half:]}
    return float(DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False))


def our_loss(loss_type: str, beta: float, label_smoothing: float, data: dict) -> float:
    """Ours as the trainer calls it: summed log-probs, averaged over each completion's tokens for `ipo`."""
    logps = data["token_logps"].sum(1)
    half = len(logps) // 2
    inputs = [logps[:half], logps[half:], data["ref"][:half], data["ref"][half:]]
    if loss_type == "ipo":
        lengths = data["lengths"].double()
        inputs = [x / n for x, n in zip(inputs, [lengths[:half], lengths[half:]] * 2)]
    return float(preference_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
                 .losses.mean())


def main() -> None:
    import trl

    results = []
    for loss_type, label_smoothing in (("sigmoid", 0.0), ("robust", 0.0), ("robust", 0.2), ("ipo", 0.0),
                                       ("hinge", 0.0)):
        for beta in (0.1, 0.5):
            for seed in range(3):
                data = batch(8, 40, seed)
                theirs, ours = (f(loss_type, beta, label_smoothing, data) for f in (trl_loss, our_loss))
                results.append({"loss_type": loss_type, "label_smoothing": label_smoothing, "beta": beta,
                                "seed": seed, "trl": theirs, "ours": ours, "abs_diff": abs(theirs - ours)})
    # RPO's NLL term against TRL's `sft` term: TRL's is the mean over every chosen token of the batch, ours the mean
    # of each pair's mean token NLL (RPO's definition); they agree when the chosen completions have one length.
    for equal_lengths in (True, False):
        data = batch(8, 40, 7)
        if equal_lengths:
            data["mask"][:] = 1
            data["lengths"][:] = 40
            data["token_logps"] = -torch.rand(16, 40, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        half = len(data["mask"]) // 2
        theirs = trl_loss("sft", 0.1, 0.0, data)
        ours = float(chosen_nll(data["token_logps"].sum(1)[:half], data["lengths"][:half].double()).mean())
        results.append({"loss_type": "nll (trl: sft)", "equal_chosen_lengths": equal_lengths, "trl": theirs,
                        "ours": ours, "abs_diff": abs(theirs - ours)})
    out = os.path.join(REPO, "jobs", "benchmarks", "trl_losses.json")
    with open(out, "w") as f:
        json.dump({"trl": trl.__version__, "torch": torch.__version__, "results": results}, f, indent=1)
    for r in results:
        print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"largest difference where the definitions agree: "
          f"{max(r['abs_diff'] for r in results if r.get('equal_chosen_lengths', True)):.2e}; wrote {out}")


if __name__ == "__main__":
    main()
