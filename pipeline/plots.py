"""Every figure the stages and the report draw, through one helper (`figure`): matplotlib off-screen, the layout
tightened, the PNG written to a local path or an object-store URI, the figure closed even when drawing fails.

Each function takes plain rows (metrics.jsonl rows, manifest fields, result rows), so the report can redraw any
figure from storage alone.
"""
import contextlib
import os
import tempfile
from typing import NamedTuple

from pipeline import storage
from pipeline.config import Config, sweep_methods
from pipeline.vocab import LOW_EDIT_DISTANCE, METHOD_KEYS, method_label, varying_keys


def integer_ticks():
    """A tick locator for step axes: whole steps only."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


@contextlib.contextmanager
def figure(uri: str, nrows: int = 1, ncols: int = 1, **subplots):
    """`(fig, axes)` of `plt.subplots(nrows, ncols, **subplots)`, saved as a PNG at `uri` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        with tempfile.TemporaryDirectory() as folder:
            local = os.path.join(folder, "figure.png")
            fig.savefig(local, dpi=100)
            storage.upload_file(local, uri)
    finally:
        plt.close(fig)


def training_curves(rows: list[dict], uri: str) -> None:
    """A train run's curves, eval points on top: what a person checks first after a run."""
    panels = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
              ("logps/chosen", "log p(chosen)"), ("logps/rejected", "log p(rejected)"),
              ("dpop/penalty_active", "share of pairs with chosen below reference")]
    with figure(uri, 2, 3, figsize=(14, 7)) as (fig, axes):
        for ax, (key, title) in zip(axes.flat, panels):
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label="train")
            evals = [r for r in rows if f"eval/{key}" in r]
            if evals:
                ax.plot([r["step"] for r in evals], [r[f"eval/{key}"] for r in evals], "o-", label="eval")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(integer_ticks())
            ax.grid(alpha=0.3)
        axes.flat[0].legend()


def edit_distance_histograms(frame, uri: str) -> None:
    """Per source, the token edit distance between chosen and rejected by split, with its median and the low-edit
    threshold: the profile that tells whether plain DPO is at risk on this data. `frame`: the pairs' source, split
    and edit_distance columns (pandas)."""
    sources = sorted(frame.source.unique())
    with figure(uri, 1, max(1, len(sources)), figsize=(5 * max(1, len(sources)), 3.6), squeeze=False) as (fig, axes):
        for ax, source in zip(axes[0], sources):
            part = frame[frame.source == source]
            top = max(1, int(part.edit_distance.quantile(0.99)))
            bins = range(0, top + 2, max(1, (top + 1) // 40))
            for split, g in part.groupby("split"):
                ax.hist(g.edit_distance.clip(upper=top + 1), bins=bins, alpha=0.6, label=f"{split} ({len(g)})")
            median = part.edit_distance.median()
            ax.axvline(median, color="black", linestyle="--", linewidth=1, label=f"median {median:g}")
            ax.axvline(LOW_EDIT_DISTANCE, color="red", linestyle=":", linewidth=1, label=f"low ({LOW_EDIT_DISTANCE})")
            ax.set_title(f"{source}: chosen vs rejected")
            ax.set_xlabel("token edit distance (clipped at p99)")
            ax.set_ylabel("pairs")
            ax.legend(fontsize=8)


def pair_counts(sources: dict, uri: str) -> None:
    """Per source: pairs kept (train, eval) and candidates dropped by reason, as stacked bars on two linear axes
    of their own, each segment labelled with its count, so that 2 drops beside 400 pairs are still seen (the
    pairs manifest's `sources`)."""
    names = sorted(sources)
    reasons = sorted({r for s in sources.values() for r in s["dropped"]})
    panels = [("kept", [(split, [sources[n][split] for n in names]) for split in ("train", "eval")]),
              ("dropped", [(r, [sources[n]["dropped"].get(r, 0) for n in names]) for r in reasons])]
    with figure(uri, 1, 2, figsize=(11, 2.0 + 0.6 * len(names)), sharey=True) as (fig, axes):
        color = 0
        for ax, (title, parts) in zip(axes, panels):
            left = [0] * len(names)
            for label, values in parts:
                bars = ax.barh(names, values, left=left, label=label, color=f"C{color}")
                ax.bar_label(bars, labels=[str(v) if v else "" for v in values], label_type="center", fontsize=8)
                left = [a + b for a, b in zip(left, values)]
                color += 1
            ax.set_title(f"{title}: {sum(left)}" if parts else f"{title}: none")
            ax.set_xlabel("candidate pairs")
            ax.xaxis.set_major_locator(integer_ticks())
            if parts:
                ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=len(parts),
                          frameon=False)


def sweep_heatmap(rows: list[dict], metric: str, mode: str, uri: str) -> None:
    """The ranking metric over β (columns) × the rest of each method (rows: λ, and the loss type, ε, α and learning
    rate where the sweep varies them), one cell a trial (trials.parquet rows): its value at the step whose weights
    the trial kept (the last, or with early stopping the best evaluation's), as best.json ranks them."""
    import numpy as np

    varying = [key for key in varying_keys(rows) if key != "beta"] or ["dpop_lambda"]
    row_of = lambda r: tuple(r[key] for key in varying)  # noqa: E731
    betas = sorted({r["beta"] for r in rows})
    methods = sorted({row_of(r) for r in rows})
    grid = np.full((len(methods), len(betas)), np.nan)
    labels = [["failed" for _ in betas] for _ in methods]
    for r in rows:
        i, j = methods.index(row_of(r)), betas.index(r["beta"])
        if r["kept_metric"] is not None and r["status"] != "failed":
            grid[i, j] = r["kept_metric"]
            labels[i][j] = f"{r['kept_metric']:.4g}" + ("\n(stopped)" if r["status"] == "stopped_early" else "")
    names = [method_label(next(r for r in rows if row_of(r) == m), varying) for m in methods]
    with figure(uri, figsize=(max(5.5, 1.8 * len(betas) + 4), 1.0 * len(methods) + 2)) as (fig, ax):
        image = ax.imshow(grid, cmap="viridis_r" if mode == "min" else "viridis", aspect="auto")
        for i in range(len(methods)):
            for j in range(len(betas)):
                ax.text(j, i, labels[i][j], ha="center", va="center", color="white", fontsize=9,
                        bbox={"facecolor": "black", "alpha": 0.4, "linewidth": 0})
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(methods)), names, fontsize=8)
        ax.set_xlabel("β")
        ax.set_title(f"{metric}\n(kept weights' value; {'lower' if mode == 'min' else 'higher'} is better)",
                     fontsize=10)
        fig.colorbar(image, ax=ax)


def label_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """A step-like x axis with whole ticks, the labels, a light grid and the legend, as every curve panel has."""
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(integer_ticks())
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def logps_chosen_curves(models: list[dict], curves: dict[str, list[dict]], methods: list, uri: str) -> None:
    """log p(chosen) against the reference's over steps for every trained model (dicts with name and params; {name:
    its metrics.jsonl rows}), each labelled and coloured by its method as in every other figure (`methods`:
    run_methods): on each step's training pairs, and where the runs evaluated, on the held-out pairs, the same for
    every method and step. The change is `rewards/chosen` / β, log πθ(y_w|x) − log π_ref(y_w|x) in nats: each
    batch's own pairs set the absolute log-prob (longer completions, lower sums), not the training, and DPO's
    failure mode is this change going below zero."""
    styles = method_styles(models, methods)
    beta = {m["name"]: m["params"]["beta"] for m in models}
    panels = [("rewards/chosen", "training pairs (each step's batch)")]
    if any("eval/rewards/chosen" in m for metrics in curves.values() for m in metrics):
        panels.append(("eval/rewards/chosen", "held-out pairs"))
    with figure(uri, 1, len(panels), figsize=(9 * len(panels) - 2 * (len(panels) - 1), 5), squeeze=False) \
            as (fig, axes):
        for ax, (key, title) in zip(axes[0], panels):
            ax.axhline(0.0, color="gray", linewidth=1, linestyle="--", label="reference")
            for name, metrics in sorted(curves.items(), key=lambda item: styles[item[0]].order):
                points = [(m["step"], m[key] / beta[name]) for m in metrics if key in m]
                if points:
                    ax.plot(*zip(*points), label=styles[name].label, color=styles[name].color,
                            marker="o" if key.startswith("eval/") else None, markersize=3)
            label_axes(ax, "step", "log p(chosen) − reference's (nats, summed over tokens)", title)
        fig.suptitle("Chosen log-likelihood against the reference: DPO's failure mode is this falling below 0")


def eval_results(rows: list[dict], models: list, methods: list, uri: str) -> None:
    """One panel per task's headline metric, a bar per model: the picture of 'did it get better'. `models`: the
    eval stage's models in order (each with name and params); every panel gives a model the same colour
    and label as every other figure of the run (`methods`: run_methods)."""
    headline = {"pairs": "logps/chosen_change", "multiple_choice": "acc_norm", "gsm8k": "exact_match"}
    styles = method_styles([vars(m) for m in models], methods)
    panels = list(dict.fromkeys((r["task"], r["kind"]) for r in rows))
    with figure(uri, 1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False) as (fig, axes):
        for ax, (task, kind) in zip(axes[0], panels):
            metric = headline[kind]
            values = {r["model"]: r["value"] for r in rows if r["task"] == task and r["metric"] == metric}
            names = [m.name for m in models if m.name in values]
            ax.bar(range(len(names)), [values[n] for n in names], color=[styles[n].color for n in names])
            ax.set_xticks(range(len(names)), [styles[n].label for n in names], rotation=20, fontsize=8)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_title(f"{task}: {metric}")
            ax.grid(axis="y", alpha=0.3)


class Style(NamedTuple):
    label: str
    color: str
    order: int


def run_methods(cfg: Config) -> list[tuple]:
    """Every method a run trains (a tuple of METHOD_KEYS values), sorted: the sweep's grid, and train's own where it
    is trained without a sweep or evaluated. Every figure of the run numbers its methods from this one list, so a
    method keeps its colour even in a figure where another method is missing (a trial that ASHA stopped)."""
    methods = {tuple(m[key] for key in METHOD_KEYS) for m in sweep_methods(cfg)} if cfg.tune else set()
    if cfg.tune is None or (cfg.eval is not None and "train" in cfg.eval.policies):
        methods.add(tuple(getattr(cfg.train, key) for key in METHOD_KEYS))
    return sorted(methods)


def method_styles(models: list[dict], methods: list[tuple]) -> dict[str, Style]:
    """Each model's label and colour: `reference` grey; every method coloured by its place in `methods`
    (run_methods) and labelled by its name (vocab.method_name) and the keys the run's methods differ in, with
    `train:` before the train stage's policy. `models`: dicts with name and params (METHOD_KEYS; None: the
    reference)."""
    methods = list(methods)
    for m in models:  # a method the config no longer lists (a report rebuilt after a change) still gets a colour
        key = m.get("params") and tuple(m["params"][k] for k in METHOD_KEYS)
        if key and key not in methods:
            methods.append(key)
    varying = varying_keys([dict(zip(METHOD_KEYS, m)) for m in methods])
    styles = {}
    for m in models:
        if m.get("params") is None:
            styles[m["name"]] = Style(m["name"], "gray", -1)
            continue
        index = methods.index(tuple(m["params"][key] for key in METHOD_KEYS))
        stage = "train: " if m["name"] == "train" else ""
        styles[m["name"]] = Style(stage + method_label(m["params"], varying), f"C{index % 10}", index)
    return styles


def online_rounds(rows: list[dict], curves: dict[str, list[tuple[int, float]]], methods: list[dict], uri: str) -> None:
    """Online rounds per method: each benchmark's exact match after every round (round 0: the starting model), and
    log p(chosen) against each round's reference over the rounds' training steps, one after the other. `rows`:
    {method, round, task, exact_match}; `curves`: {method: [(step counted over all rounds, nats)]}; `methods`:
    dicts with name and params, for the run's colours and labels."""
    styles = method_styles(methods, [tuple(m["params"][key] for key in METHOD_KEYS) for m in methods])
    tasks = sorted({r["task"] for r in rows})
    with figure(uri, 1, len(tasks) + 1, figsize=(5 * (len(tasks) + 1), 4), squeeze=False) as (fig, axes):
        for ax, task in zip(axes[0], tasks):
            for name, style in sorted(styles.items(), key=lambda item: item[1].order):
                points = sorted((r["round"], r["exact_match"]) for r in rows if r["task"] == task and
                                r["method"] == name)
                if points:
                    ax.plot(*zip(*points), marker="o", label=style.label, color=style.color)
            label_axes(ax, "round (0: the starting model)", "exact match", task)
        ax = axes[0][-1]
        ax.axhline(0.0, color="gray", linewidth=1, linestyle="--", label="each round's reference")
        for name, points in curves.items():
            if points:
                ax.plot(*zip(*points), label=styles[name].label, color=styles[name].color)
        label_axes(ax, "training step, rounds one after the other", "log p(chosen) − reference's (nats)",
                   "chosen log-likelihood on each step's pairs")
        fig.suptitle("Online rounds: exact match per round, and the chosen likelihood while training")
