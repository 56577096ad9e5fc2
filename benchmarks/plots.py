"""One bar chart, the shape every small benchmark here plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def bar_chart(labels: list[str], values: list[float], ylabel: str, title: str, path: Path, highlight: list[bool] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    colors = ["#4a7" if h else "#888" for h in highlight] if highlight else "#4a7"
    ax.bar(labels, values, color=colors)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
