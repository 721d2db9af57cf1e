"""One plot and table style for every notebook, figures saved where `make reproduce` collects them,
and the block diagrams of the models (BLIP's MED in notebook 02, the fusion models in notebook 06)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

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
        # wrap each line on its own: a title's own line breaks ("rank 1\n<caption>") are kept
        lines = [w for line in title.split("\n") for w in (textwrap.wrap(line, title_width) or [""])]
        ax.set_title("\n".join(lines[:7]), fontsize=7)
    fig.tight_layout()
    return fig


def interactive(show: Callable[..., None], **controls: object) -> None:
    """Call `show(**defaults)` once, and in a live Jupyter session add widgets that call it again.
    `show` draws its own output (a figure shown with `plt.show()`, a table with `display`).

    Each control is a string (a text box holding it), or `(choices, default)`: choices is a
    `(min, max, step)` tuple for a slider or a list for a dropdown. Headless runs (papermill,
    `make reproduce`: UNIIR_KIT_HEADLESS is set) and kernels without ipywidgets show the default
    call only, so the executed notebook holds the view a reader would first see.
    """
    defaults = {name: c if isinstance(c, str) else c[1] for name, c in controls.items()}
    try:
        import ipywidgets
        from IPython import get_ipython
    except ImportError:
        ipywidgets = None
    if ipywidgets is None or os.environ.get("UNIIR_KIT_HEADLESS") or get_ipython() is None:
        show(**defaults)
        return
    widgets = {}
    for name, control in controls.items():
        if isinstance(control, str):
            widgets[name] = ipywidgets.Text(value=control, description=name, continuous_update=False)
            continue
        choices, default = control
        if isinstance(choices, tuple):
            kind = ipywidgets.IntSlider if all(isinstance(v, int) for v in (*choices, default)) else ipywidgets.FloatSlider
            low, high, step = choices
            widgets[name] = kind(value=default, min=low, max=high, step=step, description=name, continuous_update=False)
        else:
            widgets[name] = ipywidgets.Dropdown(options=list(choices), value=default, description=name)
    ipywidgets.interact(show, **widgets)


# ---------------------------------------------------------------------------------------------
# Block diagrams
# ---------------------------------------------------------------------------------------------


def med_diagram(shared: bool = True) -> plt.Figure:
    """BLIP's MED as boxes: the image encoder and the text transformer in its three modes, each with
    its first token, its attention and its loss. Colours mark shared parameters. Returns the figure."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(10, 4.6))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 6.2)
    ax.axis("off")
    c_sa, c_sa_dec, c_ca, c_ff, c_vit = "#C6DBEF", "#FDD0A2", "#C7E9C0", "#DADAEB", "#F2F2F2"

    def box(x, y, w, h, text, color, fs=8, bold=False):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.03", fc=color, ec="#444444", lw=0.8))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs, weight="bold" if bold else None)

    def arrow(x0, y0, x1, y1, color="#444444"):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=9, color=color, lw=0.9))

    # image encoder
    box(0.2, 1.0, 2.0, 3.2, "image encoder\n(ViT)\n\n[CLS] + patches", c_vit, fs=9, bold=True)
    box(0.5, 0.2, 1.4, 0.5, "image", "white")
    arrow(1.2, 0.7, 1.2, 1.0)
    columns = [
        (2.8, "unimodal\ntext encoder", "[CLS] + text", "bi self-attn", c_sa, None, "ITC"),
        (5.2, "image-grounded\ntext encoder", "[ENC] + text", "bi self-attn", c_sa, "cross-attn", "ITM"),
        (7.6, "image-grounded\ntext decoder", "[DEC] + text", "causal self-attn", c_sa_dec, "cross-attn", "LM"),
    ]
    for x, title, first, sa, sa_color, ca, loss in columns:
        ax.text(x + 1.0, 5.0, title, ha="center", va="center", fontsize=9, weight="bold")
        box(x, 0.2, 2.0, 0.5, first, "white")
        arrow(x + 1.0, 0.7, x + 1.0, 1.0)
        box(x + 0.1, 1.0, 1.8, 0.8, sa, sa_color)
        if ca:
            box(x + 0.1, 2.0, 1.8, 0.8, ca, c_ca)
        else:
            ax.text(x + 1.0, 2.62, "(no image)", ha="center", va="center", fontsize=7, color="#777777")
        box(x + 0.1, 3.0, 1.8, 0.8, "feed forward", c_ff)
        box(x + 0.35, 4.15, 1.3, 0.45, loss, "#FFF3B0", fs=9, bold=True)
    # image tokens into both cross-attentions, through the gaps between the boxes
    green = "#2E7D32"
    arrow(2.2, 2.4, 5.3, 2.4, color=green)
    ax.plot([2.2, 7.5, 7.5], [1.9, 1.9, 2.4], color=green, lw=0.9)
    arrow(7.5, 2.4, 7.7, 2.4, color=green)
    ax.text(2.3, 2.15, "image tokens", fontsize=6.5, color=green)
    arrow(2.2, 3.9, 3.25, 4.35, color="#8C6D1F")  # the image's [CLS] goes to ITC
    ax.text(2.75, 4.55, "image\nfeature", fontsize=6.5, ha="center", color="#8C6D1F")
    note = ("same colour = shared parameters (BLIP shares all but the decoder's self-attention)" if shared
            else "pretrained checkpoints: the captioning model has its own copies")
    ax.text(5.0, 5.9, "BLIP's multimodal mixture of encoder-decoder (MED)", ha="center", fontsize=10, weight="bold")
    ax.text(5.0, 5.5, note, ha="center", fontsize=7.5, color="#555555")
    return fig


_FUSION_COLORS = {"image": "#DD8452", "text": "#4C72B0", "fuse": "#55A868", "out": "#8C8C8C"}


def fusion_diagram() -> plt.Figure:
    """Three block diagrams side by side: score fusion (CLIP_SF), CLIP_FF and BLIP_FF, from the
    query's image and text to its embedding. Returns the matplotlib figure."""
    from matplotlib.patches import FancyBboxPatch

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))

    def box(ax, x, y, text, kind, w=0.36, h=0.085):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.01",
                                    fc=_FUSION_COLORS[kind], ec="none", alpha=0.9))
        ax.text(x, y, text, ha="center", va="center", fontsize=7.5, color="white", weight="bold")
        return (x, y, w, h)

    def arrow(ax, a, b, label=None, style="-|>"):
        (xa, ya, _, ha), (xb, yb, _, hb) = a, b
        start, end = (xa, ya - ha / 2), (xb, yb + hb / 2)
        ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle=style, color="#444444", lw=1.1))
        if label:
            ax.text((start[0] + end[0]) / 2 + 0.02, (start[1] + end[1]) / 2, label, fontsize=6.5, color="#444444",
                    ha="left", va="center")

    # (a) score fusion
    ax = axes[0]
    i0, t0 = box(ax, 0.25, 0.92, "query image", "image", w=0.3), box(ax, 0.75, 0.92, "query text", "text", w=0.3)
    i1, t1 = box(ax, 0.25, 0.74, "CLIP ViT", "image", w=0.3), box(ax, 0.75, 0.74, "CLIP text", "text", w=0.3)
    i2, t2 = box(ax, 0.25, 0.56, "[CLS] @ proj", "image", w=0.3), box(ax, 0.75, 0.56, "[EOT] @ proj", "text", w=0.3)
    s = box(ax, 0.5, 0.34, "img_emb + txt_emb", "fuse", w=0.5)
    o = box(ax, 0.5, 0.12, "normalise -> q_emb [d]", "out", w=0.5)
    for a, b in ((i0, i1), (i1, i2), (t0, t1), (t1, t2)):
        arrow(ax, a, b)
    arrow(ax, i2, s, "1 vector")
    arrow(ax, t2, s, "1 vector")
    arrow(ax, s, o)
    ax.set_title("score fusion (CLIP_SF, notebook 05)\nthe modalities meet only in the sum")

    # (b) CLIP_FF
    ax = axes[1]
    i0, t0 = box(ax, 0.25, 0.92, "query image", "image", w=0.3), box(ax, 0.75, 0.92, "query text", "text", w=0.3)
    i1, t1 = box(ax, 0.25, 0.74, "CLIP ViT, every token\nln_post @ proj", "image", w=0.34), \
        box(ax, 0.75, 0.74, "CLIP text, every token\nln_final", "text", w=0.34)
    c = box(ax, 0.5, 0.52, "concatenate  [L + 1 + P, d]", "fuse", w=0.6)
    t5 = box(ax, 0.5, 0.34, "T5 encoder x 2 (self-attention\nacross both modalities)", "fuse", w=0.6, h=0.1)
    o = box(ax, 0.5, 0.12, "mean over all tokens, normalise\n-> q_emb [d]", "out", w=0.6)
    for a, b in ((i0, i1), (t0, t1), (c, t5), (t5, o)):
        arrow(ax, a, b)
    arrow(ax, i1, c, "1 + P tokens")
    arrow(ax, t1, c, "L tokens")
    ax.set_title("CLIP_FF\nimage and text tokens attend to each other")

    # (c) BLIP_FF
    ax = axes[2]
    i0, t0 = box(ax, 0.25, 0.92, "query image", "image", w=0.3), box(ax, 0.75, 0.92, "[CLS] query text", "text", w=0.3)
    i1 = box(ax, 0.25, 0.66, "BLIP ViT\n1 + P tokens", "image", w=0.3, h=0.1)
    t1 = box(ax, 0.75, 0.52, "BERT layer x N:\nself-attn, cross-attn\nto image, FFN", "text", w=0.36, h=0.16)
    p = box(ax, 0.75, 0.3, "pooler: tanh(W h[CLS] + b)", "fuse", w=0.46)
    o = box(ax, 0.75, 0.12, "normalise -> q_emb [d]", "out", w=0.46)
    arrow(ax, i0, i1)
    arrow(ax, t0, t1)
    arrow(ax, t1, p)
    arrow(ax, p, o)
    ax.annotate("", xy=(0.57, 0.52), xytext=(0.4, 0.66),
                arrowprops=dict(arrowstyle="-|>", color=_FUSION_COLORS["image"], lw=1.6))
    ax.text(0.36, 0.55, "keys and values\nof cross-attention", fontsize=6.5, color=_FUSION_COLORS["image"], ha="center")
    ax.set_title("BLIP_FF\ntext tokens cross-attend to image tokens")

    for ax in axes:
        ax.set_xlim(0, 1)
        ax.set_ylim(0.02, 1.0)
        ax.axis("off")
    fig.tight_layout()
    return fig


def qformer_diagram() -> plt.Figure:
    """BLIP-2's two stages as boxes (taught in notebook 03). Left, stage 1: the learned queries and the
    text share the Q-Former's self-attention; only the queries cross-attend to the frozen image
    encoder's tokens; the ITC, ITM and ITG heads read the outputs. Right, stage 2: the query outputs,
    through one linear layer, become a soft prompt of a frozen language model. Returns the figure."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.45, 1]})
    frozen, train_c, head, tokens = "#E0E0E0", "#C6DBEF", "#FFF3B0", "white"

    def box(ax, x, y, w, h, text, color, fs=7.5, bold=False, ls="-"):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.03", fc=color, ec="#444444", lw=0.8, ls=ls))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs, weight="bold" if bold else None)

    def arrow(ax, x0, y0, x1, y1, color="#444444"):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=9, color=color, lw=0.9))

    # (a) stage 1
    ax = axes[0]
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 6.4)
    box(ax, 0.1, 0.2, 1.9, 0.5, "image", tokens)
    box(ax, 0.1, 1.1, 1.9, 2.2, "frozen image\nencoder\n(notebook 01's\nCLIP ViT)", frozen, fs=8, bold=True)
    arrow(ax, 1.05, 0.7, 1.05, 1.1)
    box(ax, 2.6, 0.2, 2.3, 0.5, "learned queries (Lq)", train_c)
    box(ax, 5.3, 0.2, 2.3, 0.5, "text: [CLS] / [DEC] ...", tokens)
    # the Q-Former: one layer drawn, queries left, text right
    ax.add_patch(FancyBboxPatch((2.45, 0.95), 5.3, 3.45, boxstyle="round,pad=0.05", fc="none", ec="#4C72B0", lw=1.2, ls="--"))
    ax.text(7.65, 4.25, "Q-Former layer x N", ha="right", fontsize=7.5, color="#4C72B0")
    box(ax, 2.6, 1.1, 5.0, 0.75, "self-attention, shared by queries and text\n(the mask: ITC unimodal / ITG causal / ITM bidirectional)", train_c)
    box(ax, 2.6, 2.1, 2.3, 0.75, "cross-attention\nto the image", "#C7E9C0")
    ax.text(6.45, 2.47, "(text: no cross-attention)", ha="center", va="center", fontsize=6.5, color="#777777")
    box(ax, 2.6, 3.1, 2.3, 0.75, "feed forward\n(queries)", "#DADAEB")
    box(ax, 5.3, 3.1, 2.3, 0.75, "feed forward\n(text)", "#DADAEB")
    arrow(ax, 3.75, 0.7, 3.75, 1.1)
    arrow(ax, 6.45, 0.7, 6.45, 1.1)
    arrow(ax, 2.0, 2.47, 2.6, 2.47, color="#2E7D32")
    ax.text(2.3, 2.7, "image\ntokens", fontsize=6.5, ha="center", color="#2E7D32")
    for x, name, what in [(2.45, "ITC", "max over queries\nof cosine(z_q, t)"), (4.55, "ITM", "match? head on\nquery outputs"),
                          (6.65, "ITG", "next word from\nqueries + text")]:
        box(ax, x, 4.8, 1.25, 0.45, name, head, fs=9, bold=True)
        ax.text(x + 0.62, 5.55, what, ha="center", va="bottom", fontsize=6.5)
        arrow(ax, x + 0.62, 4.45, x + 0.62, 4.8)
    ax.text(5.0, 6.3, "stage 1: the Q-Former learns to read the frozen image", ha="center", va="top", fontsize=10, weight="bold")
    ax.text(8.0, 1.1, "blue: trained\ngrey: frozen", fontsize=7, color="#555555")

    # (b) stage 2
    ax = axes[1]
    ax.set_xlim(0, 7)
    ax.set_ylim(0, 6.4)
    box(ax, 0.2, 0.2, 1.9, 0.5, "image", tokens)
    box(ax, 0.2, 1.1, 1.9, 1.2, "frozen image\nencoder", frozen, fs=8, bold=True)
    box(ax, 0.2, 2.7, 1.9, 1.0, "Q-Former\n(from stage 1)", train_c, fs=8, bold=True)
    box(ax, 0.2, 4.1, 1.9, 0.55, "linear projection", train_c)
    arrow(ax, 1.15, 0.7, 1.15, 1.1)
    arrow(ax, 1.15, 2.3, 1.15, 2.7)
    arrow(ax, 1.15, 3.7, 1.15, 4.1)
    box(ax, 3.0, 1.1, 3.7, 3.55, "frozen language model\n(BLIP-2: OPT, decoder-only,\nor FlanT5, encoder-decoder;\nhere a tiny OPT)", frozen, fs=8, bold=True)
    arrow(ax, 2.1, 4.37, 3.0, 3.6)
    ax.text(2.55, 4.45, "Lq soft-\nprompt\nvectors", fontsize=6.5, ha="center")
    box(ax, 3.3, 0.2, 3.1, 0.5, "caption so far", tokens)
    arrow(ax, 4.85, 0.7, 4.85, 1.1)
    box(ax, 3.9, 4.95, 1.9, 0.45, "next word", head, fs=9, bold=True)
    arrow(ax, 4.85, 4.65, 4.85, 4.95)
    ax.text(3.5, 6.3, "stage 2: the queries become a soft prompt", ha="center", va="top", fontsize=10, weight="bold")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig
