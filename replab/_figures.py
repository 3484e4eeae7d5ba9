"""One way to get pyplot (headless) and to save a figure, for every plotting module."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def themed_pyplot():
    """``(pyplot, seaborn)`` with seaborn's whitegrid/paper theme (the geometry and probe figures)."""
    import seaborn as sns

    plt = pyplot()
    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def save(fig, path, formats: tuple[str, ...] | None = None, dpi: int = 130,
         tight_layout: bool = False) -> list[Path]:
    """Save ``fig`` and close it. ``path`` with a suffix and no ``formats``: that one file;
    otherwise ``<path without suffix>.<fmt>`` for each of ``formats`` (default PNG + SVG).
    Creates the parent directory; returns the written paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight_layout:
        fig.tight_layout()
    if formats is None and path.suffix:
        targets = [path]
    else:
        stem = path.with_suffix("") if path.suffix in (".png", ".svg", ".pdf") else path
        targets = [Path(f"{stem}.{fmt}") for fmt in (formats or ("png", "svg"))]
    for target in targets:
        fig.savefig(target, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return targets
