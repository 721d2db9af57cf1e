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
# # 05 · UniIR score fusion: CLIP_SF
#
# **Goal.** Build UniIR's first universal retriever, **CLIP_SF**
# ([Wei et al., 2023](https://arxiv.org/abs/2311.17136)): one CLIP embeds text queries, image
# queries, image+text queries and every kind of candidate into one space, by adding the image and
# text embeddings. We train it on all 16 M-BEIR tasks at once, with instructions, starting from the
# CLIP of notebook 01.
#
# **You will learn**
# - the one interface of UniIR's four models: `encode_query(batch)` and `encode_candidate(batch)`;
# - score fusion written out: the masked sum of *unnormalised* embeddings, then normalisation, as the
#   released code does it, checked against `uniir_lite.fusion`;
# - the paper's weighted sum ($w_1 \dots w_4$) versus the code's plain sum, and the four-term
#   decomposition of a fused score, measured per task;
# - UniIR's multi-task training: the union training file, instructions, the one-way in-batch
#   contrastive loss with CLIP's learned temperature;
# - the 16-row table of the paper on local pools: trained CLIP_SF vs the zero-shot CLIP vs chance.
#
# **Prerequisites.** Notebook 00 (tasks, pools, Recall@k) and 01 (CLIP). Notebook 07 studies the
# instructions used here in depth.
#
# | profile | hardware | model | data |
# |---|---|---|---|
# | `tiny` (default) | CPU, offline | CLIP_SF on notebook 01's tiny CLIP | the synthetic benchmark, tiny size |
# | `gpu` | 1 GPU | CLIP_SF on a ViT-B/32-shaped CLIP | the synthetic benchmark, large size |
# | `full` | 1 GPU + OpenAI CLIP weights | CLIP_SF on OpenAI's ViT-B/32 | real M-BEIR |
#
# Measured run times per profile are in the README's notebook table.

# %% tags=["parameters"]
PROFILE = "tiny"  # "tiny" (CPU, offline), "gpu" (real-size towers, random init) or "full" (OpenAI's CLIP, M-BEIR)
SEED = None  # None: the profile's value (so for every knob below); seeds batches and instruction draws
DEVICE = None  # "cpu", "cuda" or "auto"
DATA_DIR = None  # the synthetic benchmark's folder (its union training file, 16 pairs and pools), or M-BEIR's in full
OUT_DIR = None  # notebook 01's CLIP is loaded from here; the trained CLIP_SF (reused by 06, 07) and metrics go here
FIG_DIR = None  # where the norm, task-mix, training, table and score-term figures are saved
DATA_SIZE = None  # synthetic size ("tiny", "small", "gpu") or "full" (real M-BEIR)
MAX_STEPS = None  # multi-task training steps of CLIP_SF on the union training file
BATCH_SIZE = None  # instructed queries per batch, each with its positive: the in-batch negatives
EVAL_BATCH_SIZE = None  # queries or candidates per forward pass when embedding for evaluation
EMBED_DIM = None  # width of CLIP's shared embedding space, where image and text embeddings are summed
IMAGE_SIZE = None  # image side in pixels of CLIP's image tower
NUM_WORKERS = None  # data-loader worker processes for training and embedding
PRECISION = None  # "fp32", or "bf16" (autocast on a GPU) for training
PRETRAINED = None  # True (full): start from OpenAI's CLIP instead of notebook 01's

# %% [markdown]
# ## Setup
#
# The setup cell of every notebook: resolve the profile's knobs, seed everything, pick the device,
# print one line about the run. Then the synthetic benchmark (written once, reused).

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import uniir_lite
from uniir_lite import record_metrics
from uniir_lite.data import mbeir
from uniir_lite.data.torch_data import MBEIREmbedDataset, collator_for
from uniir_lite.evaluation import average, chance_level, evaluate_model, load_pairs
from uniir_lite.fusion import build_uniir
from uniir_lite.fusion.score import TERMS, score_fusion, score_terms
from uniir_lite.instructions import InstructionTable
from uniir_lite.losses import inbatch_contrastive_loss
from uniir_lite.metrics import paper_table
from uniir_lite.multitask import UniIRRecipe, train_dataset, train_or_load_uniir
from uniir_lite.viz import MODALITY_COLORS, save_figure

cfg = uniir_lite.setup(globals())  # profile + knobs, seed, device, plot style, data
root = cfg.data_root  # the synthetic benchmark (tiny, gpu) or M-BEIR (full)
test = load_pairs(root, "test")

# %% [markdown]
# ## 1. One interface for four models
#
# UniIR trains four retrievers: CLIP_SF, BLIP_SF (score fusion, this notebook) and CLIP_FF,
# BLIP_FF (feature fusion, notebook 06). In the kit they are all a `UniIRModel` with two methods:
#
# - `encode_query(batch) -> [bs, d]`, `encode_candidate(batch) -> [bs, d]`, L2-normalised;
# - `batch` is one side of what `MBEIRCollator` makes: token ids `txt`, images `img`, and two 0/1
#   masks `txt_mask`, `img_mask` that say which modality is present (a text-only query has an
#   all-zero image and `img_mask = 0`).
#
# `build_uniir("clip_sf", cfg, root)` wraps the CLIP trained in notebook 01 (loaded from its
# checkpoint, or trained now if this notebook runs alone). UniIR fine-tunes a *pre-trained* CLIP; in
# the `full` profile that is OpenAI's.

# %%
model = build_uniir("clip_sf", cfg, root)
print(type(model).__name__, "| loss:", model.loss_kind, "| embedding dim:", model.embed_dim,
      "| image size:", model.image_size)

# %% [markdown]
# A batch of M-BEIR training queries, one per task, goes through the kit's collator. We keep the
# instructed query texts (section 4 explains them) and look at the masks.

# %%
recipe = UniIRRecipe.from_config(cfg, "clip_sf", instructions=True, policy="random")
train_set = train_dataset(root, recipe)
first_of_task = {}
for i, q in enumerate(train_set.queries):
    first_of_task.setdefault(q.task_id, i)
items = [train_set[i] for i in first_of_task.values()]
batch = collator_for(model, root)(items)
pd.DataFrame({
    "task": [mbeir.TASKS[it["task_id"]].short for it in items],
    "query text": [it["query_txt"][:70] for it in items],
    "txt_mask": batch["query"]["txt_mask"].tolist(), "img_mask": batch["query"]["img_mask"].tolist(),
    "candidate": [f"[{it['pos']['modality']}] {it['pos']['txt'][:40]}" for it in items],
})

# %% [markdown]
# ## 2. Score fusion, written out
#
# CLIP_SF embeds the image and the text of an input with CLIP's two towers and **adds the two
# unnormalised embeddings**; a missing modality is multiplied by its mask, 0. Only the sum is
# L2-normalised. The released code (`clip_sf.py`) reads
# `txt_emb = encode_text(txt) * txt_mask; img_emb = encode_image(img) * img_mask; fused = img_emb + txt_emb`:
#
# $$ \mathbf{f} = \frac{m_i\,E_i(x_i) + m_t\,E_t(x_t)}{\lVert m_i\,E_i(x_i) + m_t\,E_t(x_t) \rVert} $$

# %%
q = batch["query"]
with torch.no_grad():
    img_emb = model.clip.encode_image(q["img"], normalize=False)  # [bs, d], unnormalised
    txt_emb = model.clip.encode_text(q["txt"], normalize=False)  # [bs, d], unnormalised
    fused = img_emb * q["img_mask"][:, None] + txt_emb * q["txt_mask"][:, None]  # [bs, d]
    ours = F.normalize(fused, dim=-1)  # [bs, d]
    library = model.encode_query(q)  # [bs, d]
assert torch.allclose(ours, library, atol=1e-5)
assert torch.allclose(fused, score_fusion(img_emb, txt_emb, q["img_mask"], q["txt_mask"]), atol=1e-6)
print("our fused queries == uniir_lite.fusion: True |", tuple(ours.shape))

# %% [markdown]
# Why does "unnormalised" matter? Because in a plain sum each modality counts **by its length**:
# if one tower's vectors were twice as long as the other's, a composed (image + text) query would
# be mostly that modality. The paper's figure hides this; the code lives with it. Here are the raw
# lengths of both towers' outputs on test candidates, and the ratio of their means, which is the
# effective weight of the image against the text in the sum.

# %%
norm_rows = []
for d in test:
    pool = d.pool.select(range(min(64, len(d.pool))))
    side = collator_for(model, root)([{"id": r["did"], "txt": mbeir.format_string(r["txt"]), "img_path":
                                   str(root / r["img_path"]) if r["img_path"] else None} for r in pool])
    with torch.no_grad():
        i_emb, t_emb = model.unimodal(side)  # masked, unnormalised
    for mod, emb, mask in (("image", i_emb, side["img_mask"]), ("text", t_emb, side["txt_mask"])):
        norm_rows += [{"modality": mod, "norm": float(n)} for n in emb.norm(dim=-1)[mask.bool()]]
norms = pd.DataFrame(norm_rows)
norm_summary = norms.groupby("modality")["norm"].describe()[["count", "mean", "50%", "std"]]
print(f"mean image length / mean text length = {norm_summary.loc['image', 'mean'] / norm_summary.loc['text', 'mean']:.3f}")
norm_summary

# %%
fig, ax = plt.subplots(figsize=(6, 2.8))
for mod in ("image", "text"):
    ax.hist(norms.loc[norms.modality == mod, "norm"], bins=40, alpha=0.7, color=MODALITY_COLORS[mod], label=mod)
ax.set_xlabel("length of the unnormalised CLIP embedding")
ax.set_ylabel("candidates")
ax.legend(title="tower")
ax.set_title("notebook 01's CLIP: raw embedding lengths (= weights in the sum)")
save_figure(fig, "05_embedding_norms", cfg)
plt.show()

# %% [markdown]
# ### The paper's weighted sum and its four terms
#
# The paper's figure draws learnable weights: a query is $w_1 q_i + w_2 q_t$ and a candidate
# $w_3 c_i + w_4 c_t$. The released code has none: all four weights are 1 and the raw lengths play
# their role. Either way, the fused score splits into four unimodal similarities:
#
# $$ \langle w_1 q_i + w_2 q_t,\; w_3 c_i + w_4 c_t \rangle = w_1 w_3 \langle q_i, c_i \rangle
#    + w_1 w_4 \langle q_i, c_t \rangle + w_2 w_3 \langle q_t, c_i \rangle + w_2 w_4 \langle q_t, c_t \rangle $$
#
# We write it out for our batch against the candidates, with some weights that are not 1, and check
# it against the dot product of the fused vectors and against `uniir_lite.fusion.score.score_terms`.

# %%
c = batch["pos"]
with torch.no_grad():
    q_i, q_t = model.unimodal(q)  # [bs, d] each
    c_i, c_t = model.unimodal(c)  # [bs, d] each
w1, w2, w3, w4 = 0.5, 2.0, 1.5, 0.8
terms = torch.stack([w1 * w3 * q_i @ c_i.T, w1 * w4 * q_i @ c_t.T,
                     w2 * w3 * q_t @ c_i.T, w2 * w4 * q_t @ c_t.T], dim=-1)  # [bs, bs, 4]
fused_score = (w1 * q_i + w2 * q_t) @ (w3 * c_i + w4 * c_t).T  # [bs, bs]
assert torch.allclose(terms.sum(-1), fused_score, rtol=1e-4, atol=1e-4)
library_terms = score_terms(q_i, q_t, c_i, c_t, torch.tensor([w1, w2, w3, w4]), normalize=False)
assert torch.allclose(terms, library_terms, rtol=1e-5, atol=1e-5)
# with the code's weights (all 1) and both norms divided out, the terms sum to the cosine score
with torch.no_grad():
    cos_terms = model.score_terms(q, c)  # [bs, bs, 4]
    cosine = model.encode_query(q) @ model.encode_candidate(c).T  # [bs, bs]
decomposition_error = float((cos_terms.sum(-1) - cosine).abs().max())
print(f"four terms vs fused cosine: max |difference| = {decomposition_error:.2e}")

# %% [markdown]
# For a text query and an image candidate only one term is non-zero ($\langle q_t, c_i \rangle$);
# for a composed query against an image+text candidate all four can be. Retrieval ranks by their sum.
#
# ## 3. The zero-shot baseline
#
# The paper's zero-shot rows use off-the-shelf CLIP with the same score fusion and no training on
# M-BEIR. We do the same with notebook 01's CLIP (trained only on image–caption pairs), on each
# pair's local pool, without instructions. The chance level is the exact expectation of a random
# ranking (notebook 00).

# %%
zero_shot = evaluate_model(model, cfg, root, test, instructions=False, pools=("local",))["local"]
chance = chance_level(test)
zs_table = paper_table(zero_shot.results).rename(columns={"value": "zero-shot CLIP_SF"})
zs_table["chance"] = [100 * chance[p.name] for p in mbeir.EVAL_PAIRS if p.name in chance] + [100 * np.mean(list(chance.values()))]
zs_table.round(1)

# %% [markdown]
# ## 4. Multi-task training with instructions
#
# UniIR trains one model on the **union** of all M-BEIR training sets
# (`query/union_train/mbeir_union_up_train.jsonl`, small sets upsampled), against the union training
# pool. Each step draws a batch of queries from all tasks mixed, one positive candidate each.
# Every query text is prefixed with an instruction that names the task and the wanted modality,
# chosen at random among the four of its (dataset, task) — notebook 07 takes that apart.

# %%
task_mix = pd.Series([mbeir.TASKS[q.task_id].short for q in train_set.queries]).value_counts()
fig, ax = plt.subplots(figsize=(6, 2.6))
task_mix.plot.bar(ax=ax, color="#4C72B0")
ax.set_ylabel("training queries")
ax.set_title("the union training file: queries per task")
ax.tick_params(axis="x", rotation=30)
save_figure(fig, "05_union_task_mix", cfg)
plt.show()

# %% [markdown]
# The loss is **one-directional**: each query must pick its positive among all candidates of the
# batch (the other queries' positives are the negatives); there is no candidate → query term as in
# CLIP's pre-training. $\tau$ is CLIP's learned temperature (`logit_scale` $= 1/\tau$):
#
# $$ \mathcal{L} = -\frac{1}{B}\sum_{j=1}^{B} \log \frac{\exp(\langle \mathbf{q}_j, \mathbf{c}_j\rangle/\tau)}{\sum_{k=1}^{B} \exp(\langle \mathbf{q}_j, \mathbf{c}_k\rangle/\tau)} $$
#
# Written out on our small batch and checked against `uniir_lite.losses`:

# %%
with torch.no_grad():
    q_emb, c_emb = model.encode_query(q), model.encode_candidate(c)  # [bs, d] each
    logit_scale = model.logit_scale()
    logits = logit_scale * q_emb @ c_emb.T  # [bs, bs]
    ours = F.cross_entropy(logits, torch.arange(len(q_emb)))
    library = inbatch_contrastive_loss(q_emb, c_emb, logit_scale)["loss"]
assert torch.allclose(ours, library)
print(f"in-batch loss on {len(q_emb)} queries: {ours.item():.3f} (uniform guess: {np.log(len(q_emb)):.3f})")

# %% [markdown]
# Now the training run, through the kit's one trainer (`uniir_lite.train.fit`) with UniIR's
# optimiser (AdamW, betas (0.9, 0.98), weight decay 0.2 except gains, biases and the temperature,
# cosine schedule). The model is saved under `OUT_DIR/checkpoints/uniir/` and loaded from there on
# later runs (notebook 07 reuses it). The recipe of this profile:

# %%
print({k: v for k, v in vars(recipe).items() if k != "model"})
trained, log = train_or_load_uniir("clip_sf", cfg, root, instructions=True, policy="random")

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
axes[0].plot(log["step"], log["loss"], color="#4C72B0")
axes[0].set_xlabel("step"); axes[0].set_ylabel("in-batch loss")
axes[1].plot(log["step"], log["accuracy"], color="#55A868", label="in-batch accuracy")
axes[1].axhline(1 / recipe.batch_size, color="grey", ls=":", label="chance (1 / batch)")
axes[1].set_xlabel("step"); axes[1].legend(fontsize=7)
fig.suptitle("CLIP_SF multi-task training with instructions")
fig.tight_layout()
save_figure(fig, "05_training", cfg)
plt.show()

# %% [markdown]
# ## 5. The 16-row table on local pools
#
# Each pair's queries are searched among its own candidates (M-BEIR_local), with the paper's metric
# per row: Recall@5, or Recall@10 for Fashion200K and FashionIQ. At evaluation every query gets one
# instruction (UniIR's random choice, seeded here so the run repeats).

# %%
trained_eval = evaluate_model(trained, cfg, root, test, instructions=True, policy="random", pools=("local",))["local"]
table = paper_table(trained_eval.results).rename(columns={"value": "UniIR CLIP_SF"})
table["zero-shot"] = zs_table["zero-shot CLIP_SF"]
table["chance"] = zs_table["chance"]
table["Δ vs zero-shot"] = table["UniIR CLIP_SF"] - table["zero-shot"]
table.round(1)

# %%
rows = table[table.dataset != "Average"]
labels = [f"{t.split('.')[0]}. {d}" for t, d in zip(rows.task, rows.dataset)]
y = np.arange(len(rows))
fig, ax = plt.subplots(figsize=(7, 5))
ax.barh(y - 0.27, rows["UniIR CLIP_SF"], height=0.27, color="#4C72B0", label="UniIR CLIP_SF (trained)")
ax.barh(y, rows["zero-shot"], height=0.27, color="#8C8C8C", label="zero-shot CLIP_SF")
ax.barh(y + 0.27, rows["chance"], height=0.27, color="#DDDDDD", label="chance")
ax.set_yticks(y, labels, fontsize=8)
ax.invert_yaxis()
ax.set_xlabel("paper metric (Recall@5; @10 for the fashion sets), %")
ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
ax.set_title("M-BEIR_local (synthetic): the 16 rows of the paper")
save_figure(fig, "05_local_table", cfg)
plt.show()

# %% [markdown]
# Notebook 01 pre-trained the CLIP on the image–caption pairs of the MSCOCO, VisualNews and
# Fashion200K sets, so tasks 1 and 4 (caption ↔ image) are its home ground, and the zero-shot model
# is already strong there; the gains of multi-task training are largest on the tasks CLIP never saw
# (questions, passages, composed queries). Per task (the mean over the task's datasets):

# %%
per_task = rows.assign(task_no=[int(t.split(".")[0]) for t in rows.task]).groupby("task_no")[
    ["UniIR CLIP_SF", "zero-shot", "chance"]].mean()
short_of = {t.paper_number: t.short for t in mbeir.TASKS.values()}
per_task.index = [f"task {n}: {short_of[n]}" for n in per_task.index]
per_task.round(1)

# %% [markdown]
# ## 6. Which of the four terms scores a positive?
#
# With the trained model, we split the score of each test query with its (first) positive into the
# four terms of section 2 and average them per pair. Rows with a text query and an image candidate
# can only use $\langle q_t, c_i \rangle$; the composed rows show how the two query modalities share
# the work.

# %%
table_of = InstructionTable.from_root(root)
collate = collator_for(trained, root)
modality_of = mbeir.pool_modalities(mbeir.read_pool(mbeir.global_pool_path(root, "test")))
term_rows = []
for d in test:
    queries = d.queries[:32]
    q_items = MBEIREmbedDataset.from_queries(queries, root=root, instructions=table_of,
                                             modality_of=modality_of.__getitem__, policy="random", seed=cfg.seed)
    row_of = {did: i for i, did in enumerate(d.pool["did"])}
    positives = [next(did for did in qq.pos if did in row_of) for qq in queries]
    c_items = MBEIREmbedDataset.from_pool(d.pool.select([row_of[did] for did in positives]), root=root)
    q_side = collate([q_items[i] for i in range(len(q_items))])
    c_side = collate([c_items[i] for i in range(len(c_items))])
    t = trained.score_terms(q_side, c_side, pairwise=True).mean(0)  # [4]
    term_rows.append({"pair": f"{mbeir.TASKS[d.pair.task_id].paper_number}. {d.pair.dataset}",
                      **dict(zip(TERMS, t.tolist()))})
term_table = pd.DataFrame(term_rows).set_index("pair")

fig, ax = plt.subplots(figsize=(7, 4.6))
left_pos = np.zeros(len(term_table))
left_neg = np.zeros(len(term_table))
colors = ["#DD8452", "#C44E52", "#55A868", "#4C72B0"]
for name, color in zip(TERMS, colors):
    v = term_table[name].to_numpy()
    ax.barh(term_table.index, np.where(v > 0, v, 0), left=left_pos, color=color, label=name)
    ax.barh(term_table.index, np.where(v < 0, v, 0), left=left_neg, color=color)
    left_pos += np.where(v > 0, v, 0)
    left_neg += np.where(v < 0, v, 0)
ax.axvline(0, color="black", lw=0.6)
ax.invert_yaxis()
ax.set_xlabel("mean contribution to the cosine score of (query, positive)")
ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="term")
ax.set_title("trained CLIP_SF: the four terms of the fused score, per pair")
save_figure(fig, "05_score_terms", cfg)
plt.show()

# %%
term_table.round(3)

# %% [markdown]
# Image → text rows (task 4) are worth a second look: their queries have no text of their own, yet
# the $\langle q_t, c_t \rangle$ term is there. The query's text is the instruction alone, and
# after training it points towards the text candidates: the instruction itself carries part of the
# score.
#
# ## Recorded metrics
#
# The averages and per-task numbers of the trained model beside the zero-shot model and chance, and
# the check of the four-term decomposition.

# %%
local_avg, zs_avg, chance_avg = average(trained_eval.results), average(zero_shot.results), float(np.mean(list(chance.values())))
metrics = {
    "decomposition_max_abs_error": decomposition_error,
    "train_loss_first": float(log["loss"].iloc[0]),
    "train_loss_last": float(log["loss"].iloc[-1]),
    "trained_local_avg": local_avg,
    "zeroshot_local_avg": zs_avg,
    "chance_local_avg": chance_avg,
}
for name, r in per_task.iterrows():
    key = name.split(":")[0].replace(" ", "")
    metrics[f"{key}_trained"] = r["UniIR CLIP_SF"] / 100
    metrics[f"{key}_zeroshot"] = r["zero-shot"] / 100
record_metrics("05_uniir_score_fusion", metrics, cfg)

# %% [markdown]
# ## Summary
#
# - UniIR's four models share one interface: `encode_query` / `encode_candidate` on a collated batch
#   with modality masks, returning normalised embeddings.
# - Score fusion adds the *unnormalised* image and text embeddings and normalises the sum; the raw
#   lengths act as the fusion weights that the paper's figure draws as $w_1 \dots w_4$.
# - A fused score is the sum of four unimodal similarities; the masks switch off the terms of a
#   missing modality, and the figure of section 6 shows which terms carry each task.
# - Multi-task training on the union file with instructions and a one-way in-batch loss turns
#   notebook 01's CLIP into one retriever for all 16 pairs; the table of section 5 compares it with
#   the zero-shot CLIP and chance, row by row.
#
# ## Exercises
#
# 1. *Predict, then run:* halve `MAX_STEPS`. Which rows of the table lose most, and does the
#    average stay above the zero-shot model? (Delete `OUT_DIR/checkpoints/uniir/` or the recipe
#    check will train a new model anyway.)
# 2. Build the model with `build_uniir("clip_sf", cfg, root, fusion_weights=True)` and train it with
#    `train_or_load_uniir(..., fusion_weights=True)`. Where do $w_1 \dots w_4$ end up? Compare with
#    the image/text length ratio of section 2.
# 3. Normalise the image and text embeddings *before* adding them (edit `score_fusion` in a copy).
#    Which rows change in the zero-shot table, and why mostly the composed ones?
# 4. Train BLIP_SF instead (`train_or_load_uniir("blip_sf", ...)`): it uses BLIP's momentum-queue
#    loss (`uniir_lite.losses.MomentumQueueLoss`). Compare its table with CLIP_SF's.
#
# **Next:** [06 · feature fusion](06_uniir_feature_fusion.ipynb): let the image and the text
# interact before pooling.
