"""``curves.png``: the paper's Figure 5 for a comparison: accuracy, log loss and AUC against iterations."""
from __future__ import annotations

from pathlib import Path


def plot_curves(curves: list[dict], path: Path) -> None:
    """Training and validation (else held-out) accuracy, log loss and AUC against iterations,
    one line per model and optimizer, averaged over seeds, as the DLRM paper's Figure 5.

    Training accuracy and log loss are means over the batches since the previous point;
    training AUC is Keras's running AUC of the epoch so far (bucketed); the other panels
    are exact, over the whole split.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[tuple, list[list[dict]]] = {}
    for c in curves:
        if c["points"]:
            groups.setdefault((c["model"], c["optimizer"]), []).append(c["points"])
    held_out = "validation" if all(c.get("eval_split", "test") == "val" for c in curves if c["points"]) \
        else "held-out"
    panels = [("train_accuracy", "training accuracy"), ("eval_accuracy", f"{held_out} accuracy"),
              ("train_logloss", "training log loss"), ("eval_logloss", f"{held_out} log loss"),
              ("train_auc", "training AUC (running, per epoch)"), ("eval_auc", f"{held_out} AUC")]
    fig, axes = plt.subplots(3, 2, figsize=(11, 10.5), sharex=True)
    for (model, optimizer), runs in groups.items():
        length = min(len(r) for r in runs)
        x = np.array([p["step"] for p in runs[0][:length]])
        for ax, (key, _) in zip(axes.flat, panels):
            y = np.mean([[p.get(key, np.nan) for p in r[:length]] for r in runs], axis=0)
            ax.plot(x, y, marker="o", markersize=2.5, label=f"{model.upper()} {optimizer}")
    for ax, (_, title) in zip(axes.flat, panels):
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("iterations (batches)")
    axes[0][0].legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
