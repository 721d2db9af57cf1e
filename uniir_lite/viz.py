"""One plot and table style for every notebook, and figures saved where `make reproduce` collects them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from uniir_lite.config import Config

# Colours by modality, shared by every figure that shows candidates or queries.
MODALITY_COLORS = {"text": "#4C72B0", "image": "#DD8452", "image,text": "#55A868"}


def use_style() -> None:
    """Seaborn's clean grid and readable sizes; the first plotting cell of each notebook calls it."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.9)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 130, "savefig.bbox": "tight", "axes.titlesize": 10})


def save_figure(fig: plt.Figure, name: str, cfg: Config) -> Path:
    """Save to `FIG_DIR/<name>.png` (figures/<profile>/ by default) and return the path."""
    path = Path(cfg.fig_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def image_grid(
    images: Sequence[np.ndarray | None],
    titles: Sequence[str],
    ncols: int,
    cell: float = 1.6,
    title_width: int = 28,
) -> plt.Figure:
    """A grid of images with wrapped titles; `None` draws an empty cell (a text-only item)."""
    import textwrap

    nrows = max(1, -(-len(images) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows * 1.35), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        if img is not None:
            ax.imshow(img)
        ax.set_title("\n".join(textwrap.wrap(title, title_width)[:7]), fontsize=7)
    fig.tight_layout()
    return fig
