"""Loss-curve figures of the convergence report (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path


def _plt():
    """matplotlib.pyplot on the Agg backend; imported here because matplotlib is optional and slow to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def smooth(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Trailing moving average over `window` points (the first points average what exists)."""
    out, acc = [], []
    for step, v in points:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append((step, sum(acc) / len(acc)))
    return out


def curves(path: Path, title: str, panels: dict[str, dict[str, dict]], band: dict | None = None,
           window: int = 10, cols: int | None = None) -> str:
    """One panel per key of `panels`; each maps a label to {"train": [(step, loss)], "val": [...]}.
    Panels fill rows of `cols` (default: one row).

    Training loss is drawn smoothed (solid), validation loss as markers joined by dashes. `band`,
    when given, shades {"low": x, "high": y} on every panel's last validation step: the baseline's
    seed range.
    """
    try:
        plt = _plt()
    except ImportError:
        return f"matplotlib is not installed: {path.name} not written"
    n = len(panels)
    cols = min(cols or n, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (ptitle, series) in zip(axes.flat, panels.items()):
        for i, (label, c) in enumerate(series.items()):
            color = f"C{i % 10}"
            tr = smooth(c.get("train", []), window)
            if tr:
                ax.plot([s for s, _ in tr], [v for _, v in tr], color=color, lw=1.2, label=label)
            va = c.get("val", [])
            if va:
                ax.plot([s for s, _ in va], [v for _, v in va], color=color, ls="--", marker="o", ms=3, lw=0.8,
                        label=None if tr else label)
        if band is not None:
            last = max((s for c in series.values() for s, _ in c.get("val", [])), default=None)
            if last is not None:
                ax.fill_between([last * 0.9, last * 1.02], band["low"], band["high"], color="grey", alpha=0.3,
                                label="baseline seed range (val)")
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel("step")
        has_train = any(c.get("train") for c in series.values())
        ax.set_ylabel(f"loss (train: mean of {window} steps; val: dashed)" if has_train else "validation loss")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path.name}"


def zoom_val(path: Path, title: str, finals: dict[str, float], band: dict) -> str:
    """Final validation loss per arm as dots, with the baseline's mean +- 2 sigma band."""
    try:
        plt = _plt()
    except ImportError:
        return f"matplotlib is not installed: {path.name} not written"
    labels = list(finals)
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(labels) + 1.6))
    ax.axvspan(band["mean"] - 2 * band["std"], band["mean"] + 2 * band["std"], color="grey", alpha=0.25,
               label="baseline mean +- 2 sigma")
    ax.axvline(band["mean"], color="k", lw=0.8)
    ax.scatter([finals[k] for k in labels], range(len(labels)), color="C0", zorder=3)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("final validation loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path.name}"
