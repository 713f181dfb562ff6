"""The shared vocabulary: stage names, metric names, thresholds and error types.

Every module may import this one and it imports nothing of the package, so the names that stages, the config, the
runner and the report agree on live in one place, and no module has to import a stage to learn them.
"""
import re
from enum import StrEnum


class Stage(StrEnum):
    """The stages, in run order. A member equals its string ("pairs" == Stage.PAIRS), which is also its folder
    name under {run.storage}/{run.name}/ and its name on the command line."""
    PAIRS = "pairs"
    REFERENCE = "reference"
    TRAIN = "train"
    TUNE = "tune"
    EVAL = "eval"


STAGE_NAMES = tuple(Stage)

# The per-pair statistics a train run computes on each split: summed on every worker, all-reduced, then divided by
# the pair count (pipeline.train.loop).
STAT_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "dpop/penalty", "dpop/penalty_active", "logps/ref_gap", "nll")
# Every metric a train run reports, by the name `tune.metric`, `train.early_stopping.metric` and metrics.jsonl use.
REPORTED_METRICS = (*STAT_KEYS, *(f"eval/{key}" for key in STAT_KEYS), "learning_rate", "grad_norm",
                    "epoch", "peak_memory_mb")
# The train keys that make a method: what a sweep varies, and what names a trial and tells methods apart in the
# figures and the report (config.TrainSection documents each).
METHOD_KEYS = ("loss_type", "dpop_lambda", "beta", "label_smoothing", "nll_weight", "learning_rate")
METHOD_SYMBOLS = {"beta": "β", "dpop_lambda": "λ", "label_smoothing": "ε", "nll_weight": "α", "learning_rate": "lr"}
LOSS_NAMES = {"robust": "robust DPO", "ipo": "IPO", "hinge": "SLiC"}


def method_name(params: dict) -> str:
    """A method's short name from its train keys: DPO, DPOP (λ > 0), cDPO (label smoothing), robust DPO, IPO, SLiC
    (hinge); `+ penalty` where DPOP's penalty is added to another loss, `+ NLL` with RPO's NLL term (α > 0)."""
    loss, penalty = params.get("loss_type", "sigmoid"), params.get("dpop_lambda", 0) > 0
    if loss == "sigmoid":
        name = "DPOP" if penalty else "cDPO" if params.get("label_smoothing", 0) > 0 else "DPO"
    else:
        name = LOSS_NAMES[loss] + (" + penalty" if penalty else "")
    return name + (" + NLL" if params.get("nll_weight", 0) > 0 else "")


def varying_keys(methods: list[dict]) -> list[str]:
    """The METHOD_KEYS whose values differ among `methods` (dicts of METHOD_KEYS): what tells them apart."""
    return [key for key in METHOD_KEYS if len({m.get(key) for m in methods}) > 1]


def method_label(params: dict, varying: list[str]) -> str:
    """method_name and the values of the `varying` keys, e.g. "DPOP (λ 50)" beside "DPO (λ 0)"."""
    details = ", ".join(f"{symbol} {params[key]:g}" for key, symbol in METHOD_SYMBOLS.items() if key in varying)
    return method_name(params) + (f" ({details})" if details else "")


# The metrics the eval stage reports per task kind, by the names results.json and `eval.select_by` use.
TASK_METRICS = {
    "pairs": ("acc", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
              "logps/chosen_change", "logps/rejected_change", "logps/chosen_below_reference"),
    "multiple_choice": ("acc", "acc_norm"),
    "gsm8k": ("exact_match", "exact_match_flexible"),
}

# A policy's chosen log-prob counts as below the reference (train's dpop/penalty_active, eval's
# logps/chosen_below_reference) only beyond this many nats per chosen token (its mean token log-prob that far below):
# two computations' float rounding (seen: under 1e-5 nats a sequence in fp32 on the tiny model, 3.4e-4 on
# SmolLM2-135M) is not a drop, and would otherwise make a policy identical to the reference look half "active" at
# step 1. Per token, because rounding noise adds up over a completion's tokens.
BELOW_REFERENCE_NATS_PER_TOKEN = 1e-4
# The same where the policy or the reference computes in bf16 (config.below_reference_nats_per_token): bf16
# activations put a 30-layer model's log-probs up to 0.021 nats a token apart at step 1, from batch composition and
# kernels alone (jobs/benchmarks/bf16_parity.json, docs/training.md).
BELOW_REFERENCE_NATS_PER_TOKEN_BF16 = 0.025
# Below this median token edit distance between chosen and rejected, plain DPO tends to lower the chosen
# completion's likelihood (Smaug, Fig. 2 and Sec. 3: pairs that differ in a few tokens); training warns when such
# data runs with dpop_lambda = 0, and the pairs stage marks it on its histogram.
LOW_EDIT_DISTANCE = 10


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


class PlanError(ValueError):
    """The requested stages cannot run (unknown stage, upstream output missing or stale, run folder in use, GPUs
    the cluster lacks); no stage has started."""


class StageFailed(RuntimeError):
    """A stage ran but its output must not be used (every row dropped, too many dropped). `fields` go into a
    manifest with status `failed`: the drop counts stay on record, and the stage is not done."""

    def __init__(self, message: str, fields: dict):
        super().__init__(message)
        self.fields = fields


class StageError(RuntimeError):
    """A stage raised: its folder holds `_failed.json` (the error, when) and `_error.log` (the traceback), and the
    message is one line that names the stage, the error and the log."""


def one_line(error: BaseException, limit: int = 600) -> str:
    """An error as one line: the innermost cause (a Ray task's error wraps the user's, whose message is the useful
    part), its type and message, terminal colours and line breaks removed. Past `limit` characters its end is kept:
    where Ray puts a remote traceback first, the exception's own message comes last."""
    seen = {id(error)}
    while (inner := getattr(error, "cause", None) or error.__cause__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def counts_text(counts: dict, empty: str = "none") -> str:
    """{"train": 433, "eval": 47} -> "train 433, eval 47": counts in a progress line, in words."""
    return ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in counts.items()) or empty
