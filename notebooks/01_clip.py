# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · CLIP: contrastive pre-training
#
# **Goal.** Train the first retriever of the kit: [CLIP](https://arxiv.org/abs/2103.00020) (Radford
# et al., 2021), an image tower and a text tower trained so that an image and its caption land close
# together in one vector space. UniIR's CLIP_SF and CLIP_FF (notebooks 05 and 06) start from it.
#
# **You will learn**
# - the two towers and the joint embedding space, built with [open_clip](https://github.com/mlfoundations/open_clip);
# - the symmetric InfoNCE loss, written out from the paper and checked against open_clip's `ClipLoss`;
# - the training loop, written out once and checked against the kit's trainer `uniir_lite.train.fit`;
# - text → image and image → text retrieval with Recall@k, against the untrained model and chance;
# - zero-shot classification: class names turned into prompts, prompts into a classifier;
# - what the temperature does: fixed high, fixed low, learned.
#
# **Prerequisites.** Notebook 00 (the data, Recall@k, the chance level). A little PyTorch.
#
# | profile | hardware | model | data |
# |---|---|---|---|
# | `tiny` (default) | CPU, offline | tiny CLIP from a config, trained here | the synthetic benchmark, tiny size |
# | `gpu` | 1 GPU | ViT-B/32-shaped CLIP, trained from scratch | the synthetic benchmark, large size |
# | `full` | 1 GPU + OpenAI CLIP weights | OpenAI's ViT-B/32 (`pretrained="openai"`) | real M-BEIR |
#
# Measured run times per profile are in the README's notebook table.

# %% tags=["parameters"]
PROFILE = "tiny"  # "tiny" (CPU, offline), "gpu" (real-size towers, random init) or "full" (OpenAI's CLIP)
SEED = None  # None: the profile's value (so for every knob below); seeds the initial weights and the batch order
DEVICE = None  # "cpu", "cuda" or "auto"
DATA_DIR = None  # the synthetic benchmark's folder (its image-caption pairs), or M-BEIR's in full
OUT_DIR = None  # the trained CLIP (checkpoints/01_clip, reused by notebooks 02-07) and the recorded metrics
FIG_DIR = None  # where the training, retrieval, zero-shot and temperature figures are saved
DATA_SIZE = None  # synthetic size ("tiny", "small", "gpu") or "full" (real M-BEIR)
MAX_STEPS = None  # the CLIP trains MAX_STEPS // 2 steps in tiny (all otherwise), each temperature run MAX_STEPS // 8
BATCH_SIZE = None  # pairs per batch: N, so N - 1 in-batch negatives and an untrained loss of about log N
EMBED_DIM = None  # width of the shared image-text embedding space
IMAGE_SIZE = None  # image side in pixels (at 32, colours are easy to see and shapes are not)
NUM_WORKERS = None  # data-loader worker processes for the training batches
PRECISION = None  # "fp32", or "bf16" (autocast on a GPU) for training
PRETRAINED = None  # True (full): OpenAI's trained CLIP instead of training a random init here

# %% [markdown]
# ## Setup
#
# The same setup cell as in every notebook: resolve the knobs of the profile, seed everything, pick
# the device, print one line about the run. Then we make sure the synthetic benchmark is on disk
# (it is written once and reused).

# %%
import copy
import dataclasses
import itertools
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import open_clip
import pandas as pd
import torch
from IPython.display import Markdown, display
from PIL import Image

import uniir_lite
from uniir_lite import record_metrics
from uniir_lite.data import mbeir
from uniir_lite.data.images import ImageLoader
from uniir_lite.data.pairs import image_caption_pairs
from uniir_lite.data.synthetic.scenes import COLOURS, GARMENTS, SHAPES
from uniir_lite.evaluation import evaluate, load_pairs
from uniir_lite.metrics import bootstrap_average, diagonal_hits, paper_numbers, paper_table, recall_at_k, wilson_interval
from uniir_lite.models.clip import (
    INIT_TEMPERATURE,
    MAX_LOGIT_SCALE,
    build_clip,
    clip_loss,
    clip_loss_fn,
    encode_images,
    encode_texts,
)
from uniir_lite.recipes.clip import ClipRecipe, clip_training_log, pair_batches, train_clip, train_or_load_clip
from uniir_lite.retrieval import search
from uniir_lite.train import TrainConfig, cosine_schedule, fit, param_groups, to_device
from uniir_lite.viz import image_grid, interactive, save_figure

cfg = uniir_lite.setup(globals())  # profile + knobs, seed, device, plot style, data
root = cfg.data_root  # the synthetic benchmark (tiny, gpu) or M-BEIR (full)

# %% [markdown]
# ## 1. Image–caption pairs
#
# CLIP learns from pairs: an image and a text that describes it, and nothing else. No labels, no
# boxes. M-BEIR's text → image queries (a caption whose positive is its image) and image → text
# queries (an image whose positives are its captions) are exactly such pairs, so we read them from
# the benchmark's own files: the caption datasets (the news-like, COCO-like and fashion-like sets).
# Training uses the training queries; we evaluate on the test queries, whose images the model never
# sees during training.

# %%
train_pairs = image_caption_pairs(root, "train")
# a fashion caption can have several positive images, so two test captions may share one: we keep the
# first caption of each image, so that caption i's image is image i and no other test pair's
first_caption = {}
for pair in image_caption_pairs(root, "test"):
    first_caption.setdefault(pair.img_path, pair)
test_pairs = list(first_caption.values())
assert len({p.img_path for p in test_pairs}) == len(test_pairs)  # one caption per test image
pd.DataFrame(
    {
        "train pairs": pd.Series([p.dataset for p in train_pairs]).value_counts(),
        "train images": pd.Series({d: len({p.img_path for p in train_pairs if p.dataset == d}) for d in {p.dataset for p in train_pairs}}),
        "test pairs": pd.Series([p.dataset for p in test_pairs]).value_counts(),
    }
).rename_axis("dataset")

# %% [markdown]
# An image appears in more than one training pair: a dataset's text → image and image → text
# queries share their images, and the COCO-like set has five captions per image. The fashion-like
# test set has fewer pairs than queries: a fashion caption can have several positive images, and we
# keep one caption per test image (the code above). Here are a few test pairs at the resolution the
# model sees (`IMAGE_SIZE`).

# %%
loader = ImageLoader(root, cfg.image_size)
examples = test_pairs[:: len(test_pairs) // 8][:8]


def show(img_path, size=None):
    """An image as a NumPy array, resized to `size` pixels (the model's view) if given."""
    img = Image.open(root / img_path).convert("RGB")
    return np.asarray(img.resize((size, size), Image.BICUBIC) if size else img)


fig = image_grid([show(p.img_path, cfg.image_size) for p in examples], [p.caption for p in examples], ncols=8, cell=1.7)
save_figure(fig, "01_pairs", cfg)
plt.show()

# %% [markdown]
# ## 2. Two towers, one space
#
# CLIP has an **image encoder** (a Vision Transformer: the image is cut into patches, each patch is a
# token, and the state of an extra class token summarises the image) and a **text encoder** (a causal
# Transformer over byte-pair-encoded tokens; the state at the end-of-text token, EOT, which has
# attended to every word before it, summarises the text). Each ends in a linear projection into the same `EMBED_DIM`-dimensional space,
# and a similarity is a cosine there. The profile decides the size (section *Profiles* in notebook
# 00): here, a tiny custom open_clip configuration that ships with the kit; in `full`, OpenAI's
# weights. One function, `build_clip`, makes that choice. We seed first so the untrained model below
# is exactly the starting point of the training in section 5.

# %%
torch.manual_seed(cfg.seed)
untrained, tokenizer = build_clip(dataclasses.replace(cfg, pretrained=False))
model_cfg = untrained.uniir_model_cfg
vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
n_params = lambda module: sum(p.numel() for p in module.parameters())
pd.DataFrame(
    {
        "image tower": {"input": f"{vision['image_size']} px image, patches of {vision['patch_size']} px",
                        "tokens": (vision["image_size"] // vision["patch_size"]) ** 2 + 1,
                        "width": vision["width"], "layers": vision["layers"], "parameters": n_params(untrained.visual)},
        "text tower": {"input": f"BPE tokens, vocabulary of {text['vocab_size']}", "tokens": text["context_length"],
                       "width": text["width"], "layers": text["layers"],
                       "parameters": n_params(untrained) - n_params(untrained.visual) - untrained.logit_scale.numel()},
    }
).T.assign(embed_dim=model_cfg["embed_dim"])

# %% [markdown]
# Most of the text tower's parameters are the token embedding table: we keep the real CLIP
# vocabulary (its BPE ships inside open_clip, so it works offline) even for a tiny model, so that
# the tokenizer is the one a real CLIP uses. A caption becomes a fixed-length row of token ids,
# padded with zeros, between a start and an end token. EOT has the largest id of the vocabulary, so
# open_clip finds the pooled position as the row's `argmax` (its `text_pool_type = "argmax"`) and
# never pools a padding token.

# %%
caption = test_pairs[0].caption
ids = tokenizer([caption])  # [1, context_length]
print(caption)
print(ids[0, : (ids[0] > 0).sum() + 2].tolist(), "...")
print(repr(tokenizer.decode(ids[0])))
eot_position = int(ids[0].argmax())
print(f"EOT (id {int(ids[0, eot_position])}) at position {eot_position}: the text embedding is the state there")
assert tokenizer.vocab_size == model_cfg["text_cfg"]["vocab_size"] and ids.shape == (1, untrained.context_length)
assert untrained.text_pool_type == "argmax" and int(ids[0, eot_position]) == tokenizer.vocab_size - 1

# %% [markdown]
# Both towers map a batch to one vector per item. We embed a small batch of test pairs and check the
# shapes.

# %%
images = torch.stack([loader(p.img_path) for p in examples]).to(cfg.device)  # [b, 3, S, S]
tokens = tokenizer([p.caption for p in examples]).to(cfg.device)  # [b, L]
with torch.no_grad():
    img_emb = untrained.encode_image(images)  # [b, d]
    txt_emb = untrained.encode_text(tokens)  # [b, d]
assert img_emb.shape == txt_emb.shape == (len(examples), model_cfg["embed_dim"])
print("image batch", tuple(images.shape), "-> img_emb", tuple(img_emb.shape), "| tokens", tuple(tokens.shape), "-> txt_emb", tuple(txt_emb.shape))

# %% [markdown]
# ## 3. The loss: symmetric InfoNCE
#
# Take a batch of $N$ pairs. Normalise every embedding to unit length, $\hat I_i = I_i/\lVert I_i\rVert$,
# $\hat T_j = T_j/\lVert T_j\rVert$, and compare every image with every text. The $N\times N$ matrix of
# logits is
#
# $$\ell_{ij} = s\,\hat I_i^\top \hat T_j, \qquad s = e^{t} = 1/\tau,$$
#
# where $\tau$ is a **temperature** (CLIP learns $t$, the log of the scale). Row $i$ is a classification
# problem over the $N$ texts whose right answer is text $i$; column $j$ is one over the $N$ images. The
# loss is the cross-entropy of both, averaged:
#
# $$\mathcal{L} = \frac{1}{2}\left[\frac{1}{N}\sum_{i=1}^{N} -\log\frac{e^{\ell_{ii}}}{\sum_{j} e^{\ell_{ij}}}
# \;+\; \frac{1}{N}\sum_{j=1}^{N} -\log\frac{e^{\ell_{jj}}}{\sum_{i} e^{\ell_{ij}}}\right].$$
#
# Every other item of the batch is a negative: the batch *is* the set of negatives, which is why CLIP
# trains with very large batches. We type it out with an explicit log-softmax.


# %%
def our_clip_loss(img_emb, txt_emb, logit_scale):
    img_emb = img_emb / img_emb.norm(dim=-1, keepdim=True)  # [N, d]
    txt_emb = txt_emb / txt_emb.norm(dim=-1, keepdim=True)  # [N, d]
    # $\ell_{ij} = s\,\hat I_i^\top \hat T_j$
    logits = logit_scale * img_emb @ txt_emb.T  # [N, N]
    # $-\log\, \mathrm{softmax}$ over texts (rows) and over images (columns); the positives are on the diagonal
    image_to_text = -torch.log_softmax(logits, dim=1).diagonal().mean()
    text_to_image = -torch.log_softmax(logits, dim=0).diagonal().mean()
    return (image_to_text + text_to_image) / 2


# %% [markdown]
# We check it against the kit's `clip_loss` and against open_clip's own `ClipLoss` (which expects
# normalised features and the scale $s$), on the embeddings of the batch above.

# %%
logit_scale = untrained.logit_scale.exp().detach()  # [] = s
ours = our_clip_loss(img_emb, txt_emb, logit_scale)
theirs = open_clip.ClipLoss()(img_emb / img_emb.norm(dim=-1, keepdim=True), txt_emb / txt_emb.norm(dim=-1, keepdim=True), logit_scale)
assert torch.allclose(ours, clip_loss(img_emb, txt_emb, logit_scale), atol=1e-6)
assert torch.allclose(ours, theirs, atol=1e-6)
print(f"our loss {ours.item():.5f} | uniir_lite.clip_loss {clip_loss(img_emb, txt_emb, logit_scale).item():.5f} | open_clip.ClipLoss {theirs.item():.5f}")

# %% [markdown]
# What should the loss be before training? A model that knows nothing scores about $\log N$: exactly
# $\log N$ if all its similarities were equal (each softmax uniform over the $N$ candidates), somewhat
# more when its random similarities happen to be confidently wrong. We check it on a training batch
# of `BATCH_SIZE` pairs.

# %%
recipe = ClipRecipe.from_config(cfg)
batches = pair_batches(train_pairs, loader, tokenizer, cfg.batch_size, cfg.seed)
first_batch = to_device(next(iter(batches)), cfg.device)  # {"image": [N, 3, S, S], "text": [N, L]}
with torch.no_grad():
    init_loss = clip_loss_fn(untrained, first_batch)["loss"].item()
print(f"untrained loss on a batch of N = {cfg.batch_size}: {init_loss:.3f}   log N = {math.log(cfg.batch_size):.3f}")

# %% [markdown]
# ## 4. The training loop, written out
#
# Training is plain gradient descent on this loss, with CLIP's choices (which UniIR keeps): AdamW
# with its $\beta_2$ lowered, no weight decay on gains, biases and the temperature, a cosine learning
# rate schedule after a short linear warm-up, and gradient clipping. The learned scale $s$ is clipped
# at `MAX_LOGIT_SCALE` so the logits cannot blow up. We write a few steps out by hand, then run the
# kit's trainer `fit` (which every later notebook uses) on the same batches from the same weights:
# both must end with the same parameters.

# %%
steps_by_hand = 3
demo_batches = [to_device(b, cfg.device) for b in itertools.islice(iter(batches), steps_by_hand)]
demo_cfg = TrainConfig(max_steps=steps_by_hand, lr=recipe.lr, warmup_steps=1, progress=False, log_every=1)
by_hand = copy.deepcopy(untrained).train()
optimizer = torch.optim.AdamW(param_groups(by_hand, demo_cfg.weight_decay), lr=demo_cfg.lr, betas=demo_cfg.betas, eps=demo_cfg.eps)
hand_losses = []
for step, batch in enumerate(demo_batches):
    for group in optimizer.param_groups:  # warm-up, then cosine
        group["lr"] = demo_cfg.lr * cosine_schedule(step, demo_cfg.max_steps, demo_cfg.warmup_steps)
    img_emb = by_hand.encode_image(batch["image"])  # [N, d]
    txt_emb = by_hand.encode_text(batch["text"])  # [N, d]
    loss = our_clip_loss(img_emb, txt_emb, by_hand.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(by_hand.parameters(), demo_cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad()
    hand_losses.append(loss.item())

with_fit = copy.deepcopy(untrained)
fit_log = fit(with_fit, clip_loss_fn, demo_batches, demo_cfg, cfg.device)
assert np.allclose(hand_losses, fit_log["loss"], atol=1e-5)
assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(by_hand.parameters(), with_fit.parameters()))
pd.DataFrame({"step": fit_log["step"], "loss by hand": hand_losses, "loss with fit": fit_log["loss"]}).set_index("step")

# %% [markdown]
# ## 5. Train (or load) the tiny CLIP
#
# `train_or_load_clip` trains with exactly this loop through `fit` and saves the model (safetensors
# weights and a JSON config with the recipe and the training log) under `OUT_DIR/checkpoints/01_clip`.
# A second run, or a later notebook that needs CLIP, loads it instead of training again. In the
# `tiny` profile it trains for half of `MAX_STEPS` so that every notebook that needs this model stays
# within its minute; in `full`, OpenAI's CLIP is already trained and is returned as is.

# %%
model, tokenizer = train_or_load_clip(cfg, root)
print(f"recipe: {recipe}")
log = clip_training_log(cfg) if not cfg.pretrained else pd.DataFrame()
log.tail(3)

# %% [markdown]
# The training curves: the loss against $\log N$, the in-batch accuracy (how often an image's most
# similar text in its batch is its own caption) against chance $1/N$, and the learned scale $s$.
# Each point is the mean over a window of steps.

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3))
axes[0].plot(log["step"], log["loss"], label="training loss")
axes[0].axhline(math.log(cfg.batch_size), ls="--", c="grey", label="log N (chance)")
axes[0].set(xlabel="step", ylabel="symmetric InfoNCE", title="loss")
axes[0].legend()
axes[1].plot(log["step"], log["batch_i2t_acc"])
axes[1].axhline(1 / cfg.batch_size, ls="--", c="grey", label="chance 1/N")
axes[1].set(xlabel="step", ylabel="accuracy", title="in-batch image → text accuracy", ylim=(0, 1))
axes[1].legend()
axes[2].plot(log["step"], log["logit_scale"])
axes[2].axhline(1 / INIT_TEMPERATURE, ls="--", c="grey", label="initial s")
axes[2].set(xlabel="step", ylabel="s = 1/τ", title="learned logit scale")
axes[2].legend()
fig.tight_layout()
save_figure(fig, "01_training_curves", cfg)
plt.show()
if len(log):
    display(Markdown(
        f"The loss goes from {log['loss'].iloc[0]:.2f} (first window; $\\log N$ = {math.log(cfg.batch_size):.2f}) to "
        f"{log['loss'].iloc[-1]:.2f}, the in-batch accuracy from {log['batch_i2t_acc'].iloc[0]:.2f} to {log['batch_i2t_acc'].iloc[-1]:.2f} "
        f"(chance {1 / cfg.batch_size:.3f}), and $s$ from {1 / INIT_TEMPERATURE:.1f} to {log['logit_scale'].iloc[-1]:.1f}: "
        "it barely moves, and section 8 says why."
        if log["logit_scale"].iloc[-1] < 2 / INIT_TEMPERATURE else
        f"The loss goes from {log['loss'].iloc[0]:.2f} to {log['loss'].iloc[-1]:.2f}, and $s$ from {1 / INIT_TEMPERATURE:.1f} to "
        f"{log['logit_scale'].iloc[-1]:.1f}."
    ))

# %% [markdown]
# ## 6. Retrieval on the test pairs
#
# Retrieval is the same matrix as the loss, over the whole test set instead of a batch: a caption
# retrieves the images with the largest cosine (text → image), an image retrieves captions (image →
# text). Each test caption has exactly one right image among the test images, so a ranking at random
# finds it in the top $k$ with probability $k/n$. We score with UniIR's Recall@k (notebook 00), for
# the untrained model (the same initial weights) and the trained one; `R@5 low` and `R@5 high` are
# the 95 % Wilson interval of Recall@5 over the test queries.


# %%
def embed_pairs(clip_model, pairs):
    img_emb = encode_images(clip_model, loader, [p.img_path for p in pairs])  # [n, d], normalised
    txt_emb = encode_texts(clip_model, tokenizer, [p.caption for p in pairs])  # [n, d], normalised
    return img_emb, txt_emb


def recall_curve(q_emb, c_emb, k_max):
    """Recall@k for k = 1..k_max when query i's only positive is candidate i."""
    _, idx = search(q_emb, c_emb, k_max)  # [n, k_max], best first
    run = {str(i): [(str(j), 0.0) for j in row] for i, row in enumerate(idx.tolist())}
    qrels = {str(i): {str(i): 1} for i in range(len(q_emb))}
    return np.array([recall_at_k(run, qrels, k) for k in range(1, k_max + 1)])


K_MAX = 20
n_test = len(test_pairs)
curves = {}
for name, clip_model in [("untrained", untrained), ("trained", model)]:
    img_emb, txt_emb = embed_pairs(clip_model, test_pairs)
    curves[("text → image", name)] = recall_curve(txt_emb, img_emb, K_MAX)
    curves[("image → text", name)] = recall_curve(img_emb, txt_emb, K_MAX)
chance_curve = np.arange(1, K_MAX + 1) / n_test
recall_table = pd.DataFrame(
    {f"R@{k}": {**{key: c[k - 1] for key, c in curves.items()}, ("either", "chance"): chance_curve[k - 1]} for k in (1, 5, 10)}
)
r5_intervals = [wilson_interval(v, n_test) if key[1] != "chance" else (np.nan, np.nan) for key, v in recall_table["R@5"].items()]
recall_table.insert(2, "R@5 low", [low for low, _ in r5_intervals])  # 95 % Wilson interval over the n test queries
recall_table.insert(3, "R@5 high", [high for _, high in r5_intervals])
(100 * recall_table).round(1)

# %% [markdown]
# The same numbers as curves over $k$:

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
for ax, direction in zip(axes, ["text → image", "image → text"]):
    for name, style in [("trained", "-"), ("untrained", "--")]:
        ax.plot(range(1, K_MAX + 1), curves[(direction, name)], style, marker=".", label=name)
    ax.plot(range(1, K_MAX + 1), chance_curve, ":", c="grey", label="chance k/n")
    ax.set(xlabel="k", title=f"{direction} (n = {n_test})", ylim=(0, 1.02))
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
axes[0].set_ylabel("Recall@k")
axes[0].legend()
fig.tight_layout()
save_figure(fig, "01_recall_at_k", cfg)
plt.show()

# %% [markdown]
# ### The similarity matrix, before and after
#
# The loss asks for a bright diagonal: each image most similar to its own caption. Here is the cosine
# matrix of a dozen test images against their captions, for the untrained and the trained model,
# on **one colour scale** (cosines from -1 to 1), so the two panels can be compared cell by cell.

# %%
few = test_pairs[:12]
sims = {}
for name, clip_model in [("untrained", untrained), ("trained", model)]:
    img_emb, txt_emb = embed_pairs(clip_model, few)
    sims[name] = (img_emb @ txt_emb.T).numpy()  # [12, 12] cosines
fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
for ax, (name, sim) in zip(axes, sims.items()):
    im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.grid(False)
    ax.set(title=f"{name}: cosine(image i, caption j)", xlabel="caption j", ylabel="image i")
fig.colorbar(im, ax=axes, fraction=0.046, label="cosine")
save_figure(fig, "01_similarity_heatmap", cfg)
plt.show()

# %% [markdown]
# How much brighter is the diagonal than the rest? The gap between the mean cosine of the matching
# pairs and that of the others, and how often an image's most similar caption is its own:

# %%
eye = np.eye(len(few), dtype=bool)
diagonal = pd.DataFrame({
    name: {"mean cosine, matching": sim[eye].mean(), "mean cosine, others": sim[~eye].mean(),
           "gap": sim[eye].mean() - sim[~eye].mean(), "cosine spread (std)": sim.std(),
           "own caption is the best": (sim.argmax(axis=1) == np.arange(len(few))).mean()}
    for name, sim in sims.items()
})
gap_gain = diagonal.loc["gap", "trained"] - diagonal.loc["gap", "untrained"]
display(Markdown(
    f"Before training the mean cosine of the matching pairs differs from that of the others by {diagonal.loc['gap', 'untrained']:+.2f}, with all cosines "
    f"spread by {diagonal.loc['cosine spread (std)', 'untrained']:.2f}: whatever pattern the left panel shows comes from the random towers, "
    f"not from the pairs. After training the gap is {diagonal.loc['gap', 'trained']:+.2f} "
    + ("and the diagonal stands out. Bright cells off the diagonal are captions that share attributes with the image (a colour, a "
       "background)." if gap_gain > 0.1 else "— training has not opened a clear gap on these twelve pairs.")
))
diagonal.round(2)
#
# ### What the trained model retrieves
#
# A few test captions (left) and the top five images the trained model returns for them, best first
# (the true image is marked ✓).

# %%
img_emb, txt_emb = embed_pairs(model, test_pairs)
queries = [0, n_test // 3, 2 * n_test // 3, n_test - 1]
_, top = search(txt_emb[queries], img_emb, 5)  # [4, 5]
cells, titles = [], []
for q, row in zip(queries, top):
    cells.append(None)  # an empty cell titled with the query caption
    titles.append(f"query: {test_pairs[q].caption}")
    for rank, j in enumerate(row):
        cells.append(show(test_pairs[j].img_path))
        titles.append(f"#{rank + 1}" + (" ✓" if j == q else ""))
fig = image_grid(cells, titles, ncols=6, cell=1.6, title_width=26)
save_figure(fig, "01_text_to_image_examples", cfg)
plt.show()

# %% [markdown]
# ### The M-BEIR rows
#
# Notebook 00 ended with a trivial model at the chance level on the cross-modal rows of M-BEIR's
# table (text → image and image → text), because nothing tied words to pixels. CLIP ties them. We
# evaluate these rows with the kit's M-BEIR pipeline, each query searched in its pair's local pool,
# and the exact chance level beside them (one positive among the pool's $n$ candidates, or several
# for the COCO-like image → text queries). `low` and `high` are the 95 % Wilson interval of our row.
#
# The last column is the paper's: zero-shot OpenAI CLIP ViT-L/14 on the real M-BEIR local pools
# (UniIR, Table 6). What compares is the *shape*, not the level: a CLIP trained on 400M real pairs
# against a tiny one trained for a few minutes on synthetic drawings, real pools far larger than ours.


# %%
def embed_items(clip_model, txts, img_paths):
    """One embedding per M-BEIR record of these pairs: its image if it has one, else its text."""
    is_img = [p is not None for p in img_paths]
    parts = {}
    if any(is_img):
        parts[True] = iter(encode_images(clip_model, loader, [p for p in img_paths if p is not None]))
    if not all(is_img):
        parts[False] = iter(encode_texts(clip_model, tokenizer, [t for t, i in zip(txts, is_img) if not i]))
    return torch.stack([next(parts[i]) for i in is_img]).numpy()  # [n, d]


from uniir_lite.metrics import chance_recall  # noqa: E402


caption_pairs = load_pairs(root, "test", [p for p in mbeir.EVAL_PAIRS if p.task_id in (0, 3)])
tables = {}
for name, clip_model in [("untrained", untrained), ("trained", model)]:
    result = evaluate(
        caption_pairs,
        lambda queries, m=clip_model: embed_items(m, [q.txt for q in queries], [q.img_path for q in queries]),
        lambda pool, m=clip_model: embed_items(m, list(pool["txt"]), list(pool["img_path"])),
    )
    tables[name] = paper_table(result.results, paper=paper_numbers("table6_mbeir_local", "zeroshot_CLIP_L"))
mbeir_table = tables["trained"].rename(columns={"value": "trained CLIP", "paper": "paper: zero-shot CLIP-L"})
mbeir_table.insert(6, "untrained", tables["untrained"]["value"])
chance_values = [100 * chance_recall(d, d.pair.metric_k) for d in caption_pairs]
mbeir_table.insert(7, "chance", [*chance_values, np.mean(chance_values)])
display(mbeir_table.round(1))

rows_only = mbeir_table.iloc[:-1].assign(row=lambda t: t["dataset"] + " " + t["task"].str.split(" ").str[1])
paper_low = set(rows_only.nsmallest(2, "paper: zero-shot CLIP-L")["row"])
our_low = set(rows_only.nsmallest(2, "trained CLIP")["row"])
display(Markdown(
    f"The paper's two lowest rows are {' and '.join(sorted(paper_low))}; ours are {' and '.join(sorted(our_low))}"
    + (": the same rows, the fine-grained fashion sets, where captions differ by a detail." if paper_low == our_low
       else ". The shapes differ here: our synthetic fashion set is not the hardest for this model (and its rows are "
            "scored at R@10, the others at R@5).")
))

# %% [markdown]
# ## 7. Zero-shot classification
#
# CLIP's most famous trick: classify images into classes it was never trained on as classes. Write
# each class name into a **prompt** ("a photo of a red shape"), embed the prompts with the text
# tower, and the normalised prompt embeddings *are* the weights of a linear classifier: an image goes
# to the class whose prompt is most similar. No labelled example is used.
#
# Our classes are the colours of the benchmark. The ground truth comes from the attributes the
# generator stored in `src_content`; we keep the held-out images (test and validation) whose objects
# are all of one colour, so each has one right answer. Chance is one over the number of classes.

# %%
colour_names, shape_names = list(COLOURS), list(SHAPES)


def attributes(pair):
    """The drawing's attributes stored in `src_content` (real M-BEIR records have none of these)."""
    try:
        attrs = json.loads(pair.src_content or "{}")
    except json.JSONDecodeError:
        return {}
    return attrs if isinstance(attrs, dict) else {}


heldout = {p.img_path: attributes(p) for p in test_pairs + image_caption_pairs(root, "val")}


def single(attrs, key):
    """The one value of `key` (colour or shape) over all objects of the picture, else None."""
    objects = attrs.get("groups", [attrs])
    values = {o.get(key) for o in objects}
    return values.pop() if len(values) == 1 else None


colour_items = [(path, colour_names.index(c)) for path, attrs in heldout.items() if (c := single(attrs, "colour")) in colour_names]
shape_items = [(path, shape_names.index(s)) for path, attrs in heldout.items() if (s := single(attrs, "shape")) in shape_names]
print(f"{len(colour_items)} images with one colour ({len(colour_names)} classes), "
      f"{len(shape_items)} with one shape ({len(shape_names)} classes)")

# %% [markdown]
# The classifier: class weights $W_c = \mathrm{normalise}\big(\tfrac{1}{|P_c|}\sum_{p\in P_c} \hat T(p)\big)$ over
# the prompts $P_c$ of class $c$, and the prediction $\arg\max_c \hat I^\top W_c$. With one prompt per class the
# mean is that prompt's embedding; with several it is **prompt ensembling**, which the CLIP paper
# found to help.


# %%
def zero_shot(clip_model, items, prompts_per_class):
    """Accuracy and predictions ([n] class ids) of the prompt classifier on (img_path, label) items."""
    img_emb = encode_images(clip_model, loader, [path for path, _ in items])  # [n, d]
    weights = torch.stack([encode_texts(clip_model, tokenizer, prompts).mean(0) for prompts in prompts_per_class])  # [C, d]
    weights = weights / weights.norm(dim=-1, keepdim=True)
    pred = (img_emb @ weights.T).argmax(dim=1)  # [n]
    labels = torch.tensor([label for _, label in items])  # [n]
    return (pred == labels).float().mean().item(), pred


colour_prompts = [[f"a photo of a {c} shape"] for c in colour_names]
colour_ensemble = [[f"a photo of a {c} {thing}." for thing in SHAPES + GARMENTS] for c in colour_names]
shape_prompts = [[f"a photo of a {s}."] for s in shape_names]
setups = {"colour, one prompt": (colour_items, colour_prompts), "colour, prompt ensemble": (colour_items, colour_ensemble),
          "shape, one prompt": (shape_items, shape_prompts)}
rows, correct = {}, {}  # correct[setup]: [n] 1.0 where the trained model is right, for the intervals
for name, clip_model in [("untrained", untrained), ("trained", model)]:
    rows[name] = {}
    for setup, (items, prompts) in setups.items():
        accuracy, pred = zero_shot(clip_model, items, prompts)
        rows[name][setup] = accuracy
        if name == "trained":
            correct[setup] = (pred == torch.tensor([label for _, label in items])).float().numpy()
rows["chance"] = {"colour, one prompt": 1 / len(colour_names), "colour, prompt ensemble": 1 / len(colour_names),
                  "shape, one prompt": 1 / len(shape_names)}
zero_shot_table = pd.DataFrame(rows)
intervals = {setup: wilson_interval(zero_shot_table.loc[setup, "trained"], len(setups[setup][0])) for setup in setups}
zero_shot_table.insert(2, "trained low", [intervals[s][0] for s in zero_shot_table.index])
zero_shot_table.insert(3, "trained high", [intervals[s][1] for s in zero_shot_table.index])
(100 * zero_shot_table).round(1)

# %% [markdown]
# Which colours does the trained model confuse? The confusion matrix of the one-prompt classifier:

# %%
colour_acc, colour_pred = zero_shot(model, colour_items, colour_prompts)
confusion = np.zeros((len(colour_names), len(colour_names)), dtype=int)
for (_, label), pred in zip(colour_items, colour_pred.tolist()):
    confusion[label, pred] += 1
fig, ax = plt.subplots(figsize=(4.6, 4))
ax.imshow(confusion, cmap="Blues")
ax.grid(False)
for i, j in itertools.product(range(len(colour_names)), repeat=2):
    if confusion[i, j]:
        ax.text(j, i, confusion[i, j], ha="center", va="center", fontsize=7, color="white" if confusion[i, j] > confusion.max() / 2 else "black")
ax.set_xticks(range(len(colour_names)), colour_names, rotation=60)
ax.set_yticks(range(len(colour_names)), colour_names)
ax.set(xlabel="predicted", ylabel="true", title=f"zero-shot colour, accuracy {colour_acc:.2f}")
save_figure(fig, "01_zero_shot_confusion", cfg)
plt.show()

# %% [markdown]
# **Does the prompt ensemble help?** The CLIP paper found that it does: on ImageNet, averaging the
# embeddings of 80 prompt templates ("a photo of a big {}", "a drawing of a {}", ...) added about 3.5
# points over the single default prompt. Our ensemble averages one template over the shape and
# garment names. Both classifiers label the same images, so we bootstrap the *paired* difference.

# %%
ens_gain, ens_low, ens_high = bootstrap_average({"colour": correct["colour, prompt ensemble"]},
                                                {"colour": correct["colour, one prompt"]})
verdict = ("helps here too" if ens_low > 0 else "hurts here" if ens_high < 0 else
           "makes no difference we can measure here: the interval contains zero, so the difference is in the noise")
display(Markdown(
    f"On {len(colour_items)} images the ensemble scores {100 * zero_shot_table.loc['colour, prompt ensemble', 'trained']:.1f} % and the "
    f"single prompt {100 * zero_shot_table.loc['colour, one prompt', 'trained']:.1f} %: a difference of {100 * ens_gain:+.1f} points "
    f"(95 % paired bootstrap interval {100 * ens_low:+.1f} to {100 * ens_high:+.1f}). The ensemble {verdict}. "
    "One reason to expect less here than in the paper: our captions come from a few templates, so there is little "
    "wording noise for an ensemble to average out, while CLIP's web captions are worded every which way."
))

# %% [markdown]
# Compare the colour rows with the shape row. A contrastive model learns what tells the pairs of a
# batch apart *and* what its eyes can see: at `IMAGE_SIZE` pixels a colour covers many pixels while
# the difference between a square and a rhombus is a handful, and the tiny image tower's patches are
# coarse.

# %%
colour_low = zero_shot_table.loc["colour, one prompt", "trained low"]
shape_low, shape_high = zero_shot_table.loc["shape, one prompt", ["trained low", "trained high"]]
shape_chance = zero_shot_table.loc["shape, one prompt", "chance"]
colour_text = ("far above chance" if colour_low > 2 * zero_shot_table.loc["colour, one prompt", "chance"] else
               "above chance" if colour_low > zero_shot_table.loc["colour, one prompt", "chance"] else "not clearly above chance")
shape_text = ("not distinguishable from chance (its interval contains it)" if shape_low <= shape_chance <= shape_high else
              "above chance" if shape_low > shape_chance else "below chance")
display(Markdown(
    f"In this run the colour classifier is {colour_text} (its 95 % interval starts at {100 * colour_low:.1f} % against "
    f"{100 * zero_shot_table.loc['colour, one prompt', 'chance']:.1f} %), and the shape classifier is {shape_text}: "
    f"{100 * zero_shot_table.loc['shape, one prompt', 'trained']:.1f} % [{100 * shape_low:.1f}, {100 * shape_high:.1f}] against "
    f"{100 * shape_chance:.1f} %. A larger image size, finer patches or longer training are the exercises below."
))

# %% [markdown]
# ## 8. The temperature
#
# The scale $s = 1/\tau$ sets how peaked the softmax over the batch can get. Cosines lie in $[-1, 1]$,
# so a logit lies in $[-s, s]$, and even a perfect model (positive cosine 1, all negatives $-1$) has a
# per-row loss of at least
#
# $$\mathcal{L}_{\min}(s) = \log\!\left(1 + (N-1)\,e^{-2s}\right).$$
#
# A **high** temperature (small $s$) puts a floor under the loss and keeps pushing embeddings even
# when the ranking is already right. A **low** temperature (large $s$) makes the softmax nearly a
# max: at the start, when all cosines look alike, the loss is large and its gradient comes from a few
# hard negatives. CLIP **learns** $t = \log s$ and clips $s$ at `MAX_LOGIT_SCALE`.
#
# First, what $s$ does to one row of the loss. Below is the softmax over `BATCH_SIZE` captions for
# one test image, with the trained model's cosines: the image's own caption is the red bar. Move the
# slider (in a live notebook; the executed copy shows the scale our model learned): at small $s$ the
# distribution is nearly flat whatever the cosines, at large $s$ it collapses onto the best few.
# The *effective number of candidates*, $e^{H}$ with $H$ the entropy, says how many captions share
# the probability.

# %%
img_emb, txt_emb = embed_pairs(model, test_pairs)
row_cosines = (img_emb[0] @ txt_emb[: cfg.batch_size].T).numpy()  # [N]: image 0 against the first N captions (its own is 0)


def show_softmax(logit_scale):
    p = torch.softmax(torch.tensor(logit_scale * row_cosines), dim=0).numpy()  # [N]
    effective = math.exp(-(p * np.log(p.clip(1e-12))).sum())
    fig, ax = plt.subplots(figsize=(9, 2.6))
    ax.bar(range(len(p)), p, color=["#C44E52"] + ["#4C72B0"] * (len(p) - 1))
    ax.axhline(1 / len(p), c="grey", ls=":", lw=1, label="uniform 1/N")
    ax.set(xlabel="caption j (0: the image's own)", ylabel="softmax probability", ylim=(0, 1),
           title=f"s = {logit_scale:.1f} (τ = {1 / logit_scale:.3f}): p(own caption) = {p[0]:.2f}, "
                 f"effective number of candidates {effective:.1f} of {len(p)}")
    ax.legend(fontsize=7)
    plt.show()


interactive(show_softmax, logit_scale=((1.0, MAX_LOGIT_SCALE, 0.5), round(model.logit_scale.exp().item() * 2) / 2))

# %% [markdown]
# Now we train three short runs from the same initial weights on the same batches, changing only the
# temperature: fixed high, fixed low (the largest scale CLIP allows), and learned from CLIP's
# starting value. We log every step.


# %%
def loss_floor(scale, n=cfg.batch_size):
    # $\mathcal{L}_{\min}(s) = \log(1 + (N-1)\,e^{-2s})$
    return math.log1p((n - 1) * math.exp(-2 * scale))


temperature_steps = max(1, cfg.max_steps // 8)
arms = {"fixed high τ": 1.0, "fixed low τ": 1 / MAX_LOGIT_SCALE, "learned τ": None}
pd.DataFrame(
    {name: {"τ at start": tau or INIT_TEMPERATURE, "s at start": 1 / (tau or INIT_TEMPERATURE), "learned": tau is None,
            "loss floor at start": loss_floor(1 / (tau or INIT_TEMPERATURE))} for name, tau in arms.items()}
).transpose()

# %%
temperature_logs, temperature_rows, temperature_hits = {}, {}, {}
for name, tau in arms.items():
    run_recipe = ClipRecipe.from_config(cfg, steps=temperature_steps, fixed_temperature=tau)
    arm_model, _, arm_log = train_clip(cfg, root, run_recipe, pairs=train_pairs, loader=loader, log_every=1)
    img_emb, txt_emb = embed_pairs(arm_model, test_pairs)
    final_scale = arm_log["logit_scale"].iloc[-1]
    temperature_logs[name] = arm_log
    temperature_hits[name] = {f"{direction} R@{k}": diagonal_hits(q @ c.T, k) for k in (1, 5, 10)
                              for direction, q, c in [("text → image", txt_emb, img_emb), ("image → text", img_emb, txt_emb)]}
    temperature_rows[name] = {"final s": final_scale, "first loss": arm_log["loss"].iloc[0], "final loss": arm_log["loss"].iloc[-1],
                              "loss floor": loss_floor(final_scale),
                              **{key: hits.mean() for key, hits in temperature_hits[name].items()}}
temperature_table = pd.DataFrame(temperature_rows).T
for k in (1, 5, 10):
    temperature_table[f"mean R@{k}"] = temperature_table[[f"text → image R@{k}", f"image → text R@{k}"]].mean(axis=1)
temperature_table.round(3)

# %% [markdown]
# The losses of the three arms are **not comparable** with each other: each is measured at its own
# scale $s$, and the floor alone differs by nats between them. What compares is retrieval: Recall@k
# of each arm's towers on the test pairs, the same measure as section 6. The left panel shows it; the
# right panel shows each arm's loss against its *own* floor and $\log N$.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
ks = [1, 5, 10]
for name in arms:
    axes[0].plot(ks, temperature_table.loc[name, [f"mean R@{k}" for k in ks]], marker="o", c=colors[name], label=name)
    axes[1].plot(temperature_logs[name]["step"], temperature_logs[name]["loss"], c=colors[name], label=name)
    axes[1].axhline(temperature_rows[name]["loss floor"], c=colors[name], ls=":", lw=1)
axes[0].plot(ks, [k / n_test for k in ks], ":", c="grey", label="chance k/n")
axes[0].set(xlabel="k", ylabel="Recall@k (mean of both directions)", title=f"retrieval after {temperature_steps} steps", xticks=ks)
axes[0].legend(fontsize=7)
axes[1].axhline(math.log(cfg.batch_size), c="grey", ls="--", lw=1, label="log N")
axes[1].set(xlabel="step", ylabel="training loss (each at its own s)", title=r"loss; dotted: its floor $\log(1 + (N-1)e^{-2s})$")
axes[1].legend(fontsize=7)
fig.tight_layout()
save_figure(fig, "01_temperature", cfg)
plt.show()

# %% [markdown]
# Which temperature retrieves best after so few steps? We compare the learned arm with each fixed one
# on the same test queries (both directions, Recall@5), with a paired bootstrap interval.

# %%
def r5_hits(name):
    return {direction: temperature_hits[name][f"{direction} R@5"] for direction in ("text → image", "image → text")}


ranking = temperature_table["mean R@5"].sort_values(ascending=False)
lines = [" > ".join(f"{name} ({100 * value:.1f} %)" for name, value in ranking.items()) + f": mean Recall@5 after {temperature_steps} steps."]
temperature_gaps = {}
for other in ("fixed high τ", "fixed low τ"):
    gain, low, high = bootstrap_average(r5_hits("learned τ"), r5_hits(other))
    temperature_gaps[other] = gain
    verdict = "retrieves better" if low > 0 else "retrieves worse" if high < 0 else "is within the noise of"
    lines.append(f"The learned temperature {verdict} {'than ' if low > 0 or high < 0 else ''}the {other}: "
                 f"{100 * gain:+.1f} points (95 % interval {100 * low:+.1f} to {100 * high:+.1f}).")
high_log = temperature_logs["fixed high τ"]
lines.append(f"The fixed high temperature's loss ends at {high_log['loss'].iloc[-1]:.2f}, "
             f"{high_log['loss'].iloc[-1] - temperature_rows['fixed high τ']['loss floor']:.2f} above its floor of "
             f"{temperature_rows['fixed high τ']['loss floor']:.2f}, which no training can cross; the fixed low one starts at "
             f"{temperature_logs['fixed low τ']['loss'].iloc[0]:.2f}, {temperature_logs['fixed low τ']['loss'].iloc[0] - math.log(cfg.batch_size):.1f} "
             f"nats above $\\log N$ (a near-max over almost equal cosines).")
display(Markdown("\n\n".join(lines)))

# %% [markdown]
# ### The floor bites later
#
# A short run cannot tell the whole story: the fixed high temperature's cost builds up as the ranking
# gets good. We give it the main run's budget (`recipe.steps` steps) and compare it with the main
# model, which *is* the learned arm at that budget: same initial weights, same batches.

# %%
if cfg.pretrained:  # full: the main model is OpenAI's CLIP, not a run of this recipe
    long_r5 = {"fixed high τ": float("nan"), "learned τ": float("nan")}
    long_gain = (float("nan"),) * 3
else:
    long_high, _, long_high_log = train_clip(cfg, root, dataclasses.replace(recipe, fixed_temperature=1.0),
                                             pairs=train_pairs, loader=loader)
    long_hits = {}
    for name, clip_model in [("fixed high τ", long_high), ("learned τ", model)]:
        img_emb, txt_emb = embed_pairs(clip_model, test_pairs)
        long_hits[name] = {"text → image": diagonal_hits(txt_emb @ img_emb.T, 5), "image → text": diagonal_hits(img_emb @ txt_emb.T, 5)}
    long_r5 = {name: float(np.mean([h.mean() for h in hits.values()])) for name, hits in long_hits.items()}
    long_gain = bootstrap_average(long_hits["learned τ"], long_hits["fixed high τ"])
    p_max = math.e / (math.e + (cfg.batch_size - 1) / math.e)  # softmax of the positive at s = 1, cosines +1 and -1
    gain, low, high = (100 * v for v in long_gain)
    verdict = ("retrieves better than" if low > 0 else "retrieves worse than" if high < 0 else "is within the noise of")
    display(Markdown(
        f"After {recipe.steps} steps the fixed high temperature reaches a mean Recall@5 of {100 * long_r5['fixed high τ']:.1f} %, the "
        f"learned one {100 * long_r5['learned τ']:.1f} %: the learned temperature {verdict} the fixed high one, by {gain:+.1f} points "
        f"(95 % paired interval {low:+.1f} to {high:+.1f}). The fixed high arm's loss ends at {long_high_log['loss'].iloc[-1]:.2f}, "
        f"above its floor of {loss_floor(1.0):.2f}. At $s = 1$ even a perfect model puts at most {100 * p_max:.0f} % of a row's "
        f"softmax on the right caption among {cfg.batch_size}, so the loss never stops pulling, and its gradient weighs every "
        "negative almost alike, hard or easy: little of it goes to the few look-alike captions that decide the top 5."
    ))

# %% [markdown]
# Exercise 4 asks whether the fixed low temperature catches up with a longer budget.
#
# ### The learned temperature of the main run
#
# CLIP's learned scale climbs from $1/0.07 \approx 14.3$ to the cap of 100 during pre-training. Ours?

# %%
learned_scale = model.logit_scale.exp().item()
# Adam moves a parameter by about its learning rate per step at most, so t = log s can move by at most
# the sum of the learning rates of the schedule
sum_lr = sum(recipe.lr * cosine_schedule(step, recipe.steps, recipe.steps // 10 if recipe.warmup_steps is None else recipe.warmup_steps)
             for step in range(recipe.steps))
reachable = math.exp(math.log(1 / INIT_TEMPERATURE) + sum_lr)
clip_steps = 32 * 400e6 / 32768  # the CLIP paper's schedule: 32 epochs of 400M pairs, batches of 32,768
display(Markdown(
    f"OpenAI's CLIP comes with $s$ = {learned_scale:.1f}: its scale climbed to the cap during pre-training." if cfg.pretrained else
    f"Our scale went from $s$ = {1 / INIT_TEMPERATURE:.1f} to **{learned_scale:.1f}** (τ = {1 / learned_scale:.3f}) in "
    f"{recipe.steps} steps, far from CLIP's cap of {MAX_LOGIT_SCALE:.0f}. That is the optimiser, not a lesson about "
    f"temperatures: Adam moves each parameter by at most about its learning rate per step, and $t = \\log s$ is one "
    f"parameter, so over this schedule (peak learning rate {recipe.lr:g}, warm-up then cosine decay) $t$ can move by at most "
    f"$\\sum_\\text{{steps}} \\text{{lr}}$ = {sum_lr:.2f}, i.e. $s$ can reach about {reachable:.1f}. "
    f"CLIP trained for about {clip_steps / 1000:.0f}K steps (32 epochs of 400M pairs in batches of 32,768), {clip_steps / recipe.steps:,.0f} "
    "times as many, which is time enough to reach the cap. For $s$ to move far here, it would need many more steps or a "
    "learning rate of its own."
))
# %% [markdown]
# ## Metrics
#
# The recorded metrics, each trained number beside its untrained or chance baseline, checked against
# `results/expected_tiny.json`.

# %%
r5 = recall_table["R@5"]
metrics = {
    "t2i_recall@5": r5[("text → image", "trained")],
    "t2i_recall@5_untrained": r5[("text → image", "untrained")],
    "i2t_recall@5": r5[("image → text", "trained")],
    "i2t_recall@5_untrained": r5[("image → text", "untrained")],
    "recall@5_chance": r5[("either", "chance")],
    "mbeir_caption_rows_avg": mbeir_table["trained CLIP"].iloc[-1] / 100,
    "mbeir_caption_rows_avg_untrained": mbeir_table["untrained"].iloc[-1] / 100,
    "zero_shot_colour_acc": zero_shot_table.loc["colour, one prompt", "trained"],
    "zero_shot_colour_acc_untrained": zero_shot_table.loc["colour, one prompt", "untrained"],
    "zero_shot_colour_chance": zero_shot_table.loc["colour, one prompt", "chance"],
    "zero_shot_colour_ensemble_acc": zero_shot_table.loc["colour, prompt ensemble", "trained"],
    "zero_shot_shape_acc": zero_shot_table.loc["shape, one prompt", "trained"],
    "zero_shot_shape_chance": zero_shot_table.loc["shape, one prompt", "chance"],
    "loss_first": log["loss"].iloc[0],
    "loss_last": log["loss"].iloc[-1],
    "temp_steps": temperature_steps,
    "temp_high_final_loss": temperature_table.loc["fixed high τ", "final loss"],
    "temp_high_loss_floor": temperature_table.loc["fixed high τ", "loss floor"],
    "temp_low_first_loss": temperature_table.loc["fixed low τ", "first loss"],
    "log_batch_size": math.log(cfg.batch_size),  # the untrained InfoNCE loss
    "temp_low_final_loss": temperature_table.loc["fixed low τ", "final loss"],
    "temp_learned_final_loss": temperature_table.loc["learned τ", "final loss"],
    "temp_high_recall@5": temperature_table.loc["fixed high τ", "mean R@5"],
    "temp_learned_minus_high_recall@5": temperature_gaps["fixed high τ"],
    "temp_long_steps": recipe.steps,
    "temp_long_high_recall@5": long_r5["fixed high τ"],
    "temp_long_learned_recall@5": long_r5["learned τ"],
    "temp_long_learned_minus_high_low": long_gain[1],
    "temp_learned_minus_low_recall@5": temperature_gaps["fixed low τ"],
    "zero_shot_ensemble_gain": ens_gain,
    "zero_shot_ensemble_gain_low": ens_low,
    "zero_shot_ensemble_gain_high": ens_high,
    "temp_low_recall@5": temperature_table.loc["fixed low τ", "mean R@5"],
    "temp_learned_recall@5": temperature_table.loc["learned τ", "mean R@5"],
    "learned_logit_scale": learned_scale,
    "initial_logit_scale": 1 / INIT_TEMPERATURE,
}
record_metrics("01_clip", metrics, cfg)

# %% [markdown]
# ## Summary
#
# - CLIP embeds images and texts into one space with two towers and trains them with a symmetric
#   InfoNCE loss: each image must pick its caption among the batch, and each caption its image.
# - The batch is the set of negatives; the loss of a model that knows nothing is about $\log N$.
# - Trained for a short while on the synthetic pairs, the tiny CLIP retrieves far above the untrained
#   model and chance in both directions, and fills the cross-modal rows of M-BEIR's table.
# - Prompts turn the text tower into a zero-shot classifier; it works for what the model learned to
#   see (colour here) and not for what it did not (shape). Whether a prompt ensemble helps (about
#   3.5 points on ImageNet in the CLIP paper) is a paired comparison with an interval (section 7).
# - The temperature bounds how sharp the softmax can be. Compare temperatures by retrieval, not by
#   losses measured at different scales: fixed too low, early training struggles and retrieves worse
#   than the learned one after a short run; fixed too high, the loss has a floor, and with the main
#   run's budget it retrieves far worse. CLIP learns it; in our short run it barely moves, as Adam's
#   step size bounds it, while CLIP's climbs to the cap of 100.
#
# ## Exercises
#
# 1. **Predict, then run.** Set `BATCH_SIZE` to a quarter of its value in the parameters cell. What
#    happens to the loss at the start ($\log N$), to the floor of the fixed-high-temperature run, and
#    to test recall? Delete `OUT_DIR/checkpoints/01_clip` first, or the saved model is loaded.
# 2. Make the shape classifier work: try `IMAGE_SIZE = 64` (finer detail, same patch size) or a longer
#    training. Which costs less time for the same gain?
# 3. Replace the colour prompts by bare class names (`"red"`) and by the caption style of the news-like
#    set. Does the zero-shot accuracy change? Why would the wording of the training captions matter?
# 4. **Predict, then run.** Give the fixed low temperature the main run's budget, as section 8 did
#    for the fixed high one (`dataclasses.replace(recipe, fixed_temperature=1 / MAX_LOGIT_SCALE)`).
#    Does it catch up with the learned one? Predict from its loss curve first.
#
# ## Next
#
# Notebook **02 · BLIP** adds two more objectives on top of the contrastive one: image–text matching
# with hard negatives and an image-grounded language model, and uses them to clean noisy captions.
