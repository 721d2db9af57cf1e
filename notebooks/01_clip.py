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
from PIL import Image

import uniir_lite
from uniir_lite import record_metrics
from uniir_lite.data import mbeir
from uniir_lite.data.images import ImageLoader
from uniir_lite.data.pairs import image_caption_pairs
from uniir_lite.data.synthetic.scenes import COLOURS, GARMENTS, SHAPES
from uniir_lite.evaluation import evaluate, load_pairs
from uniir_lite.metrics import paper_table, recall_at_k
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
from uniir_lite.viz import image_grid, save_figure

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
test_pairs = image_caption_pairs(root, "test")
assert len({p.img_path for p in test_pairs}) == len(test_pairs)  # one caption per test image
pd.DataFrame(
    {
        "train pairs": pd.Series([p.dataset for p in train_pairs]).value_counts(),
        "train images": pd.Series({d: len({p.img_path for p in train_pairs if p.dataset == d}) for d in {p.dataset for p in train_pairs}}),
        "test pairs": pd.Series([p.dataset for p in test_pairs]).value_counts(),
    }
).rename_axis("dataset")

# %% [markdown]
# The COCO-like set has several captions per image, so the training set has more pairs than
# images. Here are a few test pairs at the resolution the model sees (`IMAGE_SIZE`).

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
# token) and a **text encoder** (a Transformer over byte-pair-encoded tokens; the last token's state
# summarises the text). Each ends in a linear projection into the same `EMBED_DIM`-dimensional space,
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
# padded with zeros, between a start and an end token.

# %%
caption = test_pairs[0].caption
ids = tokenizer([caption])  # [1, context_length]
print(caption)
print(ids[0, : (ids[0] > 0).sum() + 2].tolist(), "...")
print(repr(tokenizer.decode(ids[0])))
assert tokenizer.vocab_size == model_cfg["text_cfg"]["vocab_size"] and ids.shape == (1, untrained.context_length)

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
# The training curves: the loss starts near $\log N$ and falls; the in-batch accuracy (how often an
# image's most similar text in its batch is its own caption) rises; the learned scale $s$ moves away
# from its starting value.

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

# %% [markdown]
# ## 6. Retrieval on the test pairs
#
# Retrieval is the same matrix as the loss, over the whole test set instead of a batch: a caption
# retrieves the images with the largest cosine (text → image), an image retrieves captions (image →
# text). Each test caption has exactly one right image among the test images, so a ranking at random
# finds it in the top $k$ with probability $k/n$. We score with UniIR's Recall@k (notebook 00), for
# the untrained model (the same initial weights) and the trained one.


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
# matrix of a dozen test images against their captions, for the untrained and the trained model.

# %%
few = test_pairs[:12]
fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
for ax, (name, clip_model) in zip(axes, [("untrained", untrained), ("trained", model)]):
    img_emb, txt_emb = embed_pairs(clip_model, few)
    sim = (img_emb @ txt_emb.T).numpy()  # [12, 12] cosines
    im = ax.imshow(sim, cmap="viridis")
    ax.grid(False)
    ax.set(title=f"{name}: cosine(image i, caption j)", xlabel="caption j", ylabel="image i")
    fig.colorbar(im, ax=ax, fraction=0.046)
fig.tight_layout()
save_figure(fig, "01_similarity_heatmap", cfg)
plt.show()

# %% [markdown]
# Before training there is no diagonal: the cosines are small, and what pattern there is (stripes of
# captions similar to every image) comes from the random towers, not from the pairs. After training
# the diagonal stands out. Off-diagonal bright cells are captions that share attributes with the
# image (a colour, a background).
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
# for the COCO-like image → text queries).


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
    tables[name] = paper_table(result.results)
mbeir_table = tables["trained"].rename(columns={"value": "trained CLIP"})
mbeir_table.insert(3, "untrained", tables["untrained"]["value"])
chance_values = [100 * chance_recall(d, d.pair.metric_k) for d in caption_pairs]
mbeir_table["chance"] = [*chance_values, np.mean(chance_values)]
mbeir_table.round(1)

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
    """Accuracy and predictions of the prompt classifier on (img_path, label) items."""
    img_emb = encode_images(clip_model, loader, [path for path, _ in items])  # [n, d]
    weights = torch.stack([encode_texts(clip_model, tokenizer, prompts).mean(0) for prompts in prompts_per_class])  # [C, d]
    weights = weights / weights.norm(dim=-1, keepdim=True)
    pred = (img_emb @ weights.T).argmax(dim=1)  # [n]
    labels = torch.tensor([label for _, label in items])  # [n]
    return (pred == labels).float().mean().item(), pred


colour_prompts = [[f"a photo of a {c} shape"] for c in colour_names]
colour_ensemble = [[f"a photo of a {c} {thing}." for thing in SHAPES + GARMENTS] for c in colour_names]
shape_prompts = [[f"a photo of a {s}."] for s in shape_names]
rows = {}
for name, clip_model in [("untrained", untrained), ("trained", model)]:
    rows[name] = {
        "colour, one prompt": zero_shot(clip_model, colour_items, colour_prompts)[0],
        "colour, prompt ensemble": zero_shot(clip_model, colour_items, colour_ensemble)[0],
        "shape, one prompt": zero_shot(clip_model, shape_items, shape_prompts)[0],
    }
rows["chance"] = {"colour, one prompt": 1 / len(colour_names), "colour, prompt ensemble": 1 / len(colour_names),
                  "shape, one prompt": 1 / len(shape_names)}
zero_shot_table = pd.DataFrame(rows)
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
# Compare the colour rows with the shape row. A contrastive model learns what tells the pairs of a
# batch apart *and* what its eyes can see: at `IMAGE_SIZE` pixels a colour covers many pixels while
# the difference between a square and a rhombus is a handful, and the tiny image tower's patches are
# coarse. In this run the colour classifier is far above chance and the shape classifier is not; a
# larger image size, finer patches or longer training are the exercises below.
#
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
# hard negatives. CLIP **learns** $t = \log s$ and clips $s$ at `MAX_LOGIT_SCALE`. We train three
# short runs from the same initial weights on the same batches, changing only the temperature: fixed
# high, fixed low (the largest scale CLIP allows), and learned from CLIP's starting value.


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
temperature_logs, temperature_rows = {}, {}
for name, tau in arms.items():
    run_recipe = ClipRecipe.from_config(cfg, steps=temperature_steps, fixed_temperature=tau)
    arm_model, _, arm_log = train_clip(cfg, root, run_recipe, pairs=train_pairs, loader=loader)
    img_emb, txt_emb = embed_pairs(arm_model, test_pairs)
    final_scale = arm_log["logit_scale"].iloc[-1]
    temperature_logs[name] = arm_log
    temperature_rows[name] = {
        "final s": final_scale, "first loss": arm_log["loss"].iloc[0], "final loss": arm_log["loss"].iloc[-1],
        "loss floor": loss_floor(final_scale),
        "text → image R@5": recall_curve(txt_emb, img_emb, 5)[-1], "image → text R@5": recall_curve(img_emb, txt_emb, 5)[-1],
    }
temperature_table = pd.DataFrame(temperature_rows).T
temperature_table["mean R@5"] = temperature_table[["text → image R@5", "image → text R@5"]].mean(axis=1)
temperature_table.round(3)

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.3), gridspec_kw={"width_ratios": [1.6, 1]})
for (name, arm_log), color in zip(temperature_logs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
    axes[0].plot(arm_log["step"], arm_log["loss"], c=color, label=name)
    axes[0].axhline(temperature_rows[name]["loss floor"], c=color, ls=":", lw=1)
axes[0].axhline(math.log(cfg.batch_size), c="grey", ls="--", lw=1, label="log N")
axes[0].set(xlabel="step", ylabel="training loss", title=r"loss (dotted: the floor $\log(1 + (N-1)e^{-2s})$)")
axes[0].legend()
temperature_table[["text → image R@5", "image → text R@5"]].plot.bar(ax=axes[1], rot=0)
axes[1].axhline(5 / n_test, c="grey", ls=":", label="chance")
axes[1].set(ylabel="Recall@5 on the test pairs", title=f"after {temperature_steps} steps", ylim=(0, 1))
axes[1].legend(fontsize=7)
fig.tight_layout()
save_figure(fig, "01_temperature", cfg)
plt.show()

# %% [markdown]
# Read the figure with the equation in mind. The fixed high temperature's loss flattens early and
# stays above its floor, which no amount of training can cross, while the learned temperature's loss
# keeps falling. The fixed low temperature starts far above $\log N$ (a near-max over almost equal
# cosines) and spends its first steps recovering. Which arm *retrieves* best after so few steps is a
# closer race: a high temperature spreads the gradient over all negatives and ranks well early on,
# even though its loss is stuck. The ranking of this run:

# %%
print(" > ".join(temperature_table["mean R@5"].sort_values(ascending=False).index), f"(mean Recall@5 after {temperature_steps} steps)")

# %% [markdown]
# Exercise 4 asks what happens to that ranking with a longer budget.
#
# Finally, the temperature our main model learned during its longer training:

# %%
learned_scale = model.logit_scale.exp().item()
print(f"learned s = {learned_scale:.2f} (τ = {1 / learned_scale:.4f}); started at s = {1 / INIT_TEMPERATURE:.2f}; "
      f"clipped at s = {MAX_LOGIT_SCALE:.0f}")

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
#   see (colour here) and not for what it did not.
# - The temperature bounds how sharp the softmax can be: fixed too high, the loss has a floor; fixed
#   too low, early training struggles; CLIP learns it.
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
# 4. **Predict, then run.** Give the temperature runs the main run's budget
#    (`temperature_steps = recipe.steps`). Which arm retrieves best now, and does the fixed high
#    temperature's loss get any closer to its floor?
#
# ## Next
#
# Notebook **02 · BLIP** adds two more objectives on top of the contrastive one: image–text matching
# with hard negatives and an image-grounded language model, and uses them to clean noisy captions.
