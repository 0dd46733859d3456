"""What every figure shares: the non-interactive Agg backend and the atomic PNG save.

Usage:
    from .plotting import plt, save_png
    fig, ax = plt.subplots()
    ...
    save_png(fig, "results/m/plots/x.png", dpi=150)          # bbox "tight": no empty margins
    save_png(fig, path, dpi, tight=False)                     # the figure's own size (fig.tight_layout())

Each report draws its own figures in its own module (study_plots, ptq_study, finetune_study,
gradquant_study), so editing one report's figures reruns only the rules that draw them. Every drawing
function returns the figure it saved (closed, but whole: titles, labels, legends and artists), so tests
check what a reader would.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .io import atomic_path  # noqa: E402

__all__ = ["Figure", "plt", "save_png"]


def save_png(fig: Figure, path: str, dpi: int, *, tight: bool = True) -> Figure:
    """Write `fig` to `path` as PNG atomically (:func:`mpqflow.io.atomic_path`), close it and return it;
    `tight`: crop to the drawn content (savefig's bbox_inches="tight")."""
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    return fig
