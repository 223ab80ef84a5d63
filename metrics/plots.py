"""TPR-FPR curves in the style of the paper's Fig. 6: FPR on x, TPR on y, one marked line per method
through the points n = 10..100, one panel per denominator variant (separate and shared)."""
from __future__ import annotations

import io
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402

from genloc.files import atomic_path  # noqa: E402

__all__ = ["plot_curves", "figure_to_array"]

VARIANTS = {"separate": ("fpr", "tpr", "separate denominators"),
            "shared": ("fpr_shared", "tpr_shared", "shared denominator (all labelled boxes)")}


def plot_curves(curves: Mapping[str, Mapping], out_path=None, variants=("separate", "shared"), title=None):
    """Draw ``{label: curve}`` where a curve is a ``result_curves`` dict (keys n, tpr, fpr, ...).

    Writes a PNG when ``out_path`` is given (atomically: a failed write keeps the previous file) and
    returns the matplotlib Figure (caller closes it).
    """
    if not curves:
        raise ValueError("no curves to plot")
    fig, axes = plt.subplots(1, len(variants), figsize=(5.2 * len(variants), 4.4), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        fx, fy, name = VARIANTS[variant]
        for label, curve in curves.items():
            x, y = curve[fx], curve[fy]
            (line,) = ax.plot(x, y, marker="o", markersize=3.5, linewidth=1.5, label=label)
            # Label the first and last n so the direction of the curve is readable.
            for i in {0, len(x) - 1}:
                ax.annotate(f"n={curve['n'][i]}", (x[i], y[i]), textcoords="offset points", xytext=(4, -10),
                            fontsize=7, color=line.get_color())
        ax.set_xlabel("FPR")
        ax.set_ylabel("TPR")
        ax.set_title(name, fontsize=10)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if out_path is not None:
        with atomic_path(out_path) as partial:
            fig.savefig(partial, format="png", dpi=120)
    return fig


def figure_to_array(fig) -> np.ndarray:
    """Render a Figure to an ``HxWx3`` uint8 array (for TensorBoard ``add_image``) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    image = plt.imread(buf, format="png")[..., :3]
    return (image * 255).round().astype(np.uint8)
