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
# # 06 · UniIR feature fusion: CLIP_FF and BLIP_FF
#
# **Goal.** Build UniIR's two *feature-fusion* retrievers, in which a query's image and text interact
# inside the encoder, and compare them with score fusion (notebook 05) at an equal training budget:
# the paper's 2 x 2 (CLIP or BLIP towers, score or feature fusion), accuracy per task, parameters
# and latency.
#
# **You will learn**
# - CLIP_FF: CLIP's text and image *token* features, concatenated and mixed by a small T5 encoder,
#   then mean-pooled, written out and checked against the kit's `uniir_lite.fusion.feature`;
# - BLIP_FF: BLIP's text encoder cross-attending to every image token, and BERT's pooler;
# - what the released code does that the paper does not say: no attention mask (a missing modality
#   is still encoded), the pooler that is not in BLIP's checkpoints, a separate learning rate for T5;
# - how to compare retrievers fairly: same data, instructions, steps and batch; and what the paper
#   found: which fusion wins depends on the backbone (Table 2);
# - the price of fusing early: every candidate goes through the fusion module too.
#
# **Prerequisites.** Notebooks 01 (CLIP), 02 (BLIP) and 05 (score fusion, UniIR's training recipe).
#
# | profile | hardware | models | data |
# |---|---|---|---|
# | `tiny` (default) | CPU, offline | tiny CLIP (01) and BLIP (02) towers + new fusion modules, trained here | the synthetic benchmark, tiny size |
# | `gpu` | 1 GPU | ViT-B/32-shaped CLIP and BLIP-base-shaped towers, UniIR's T5 mixer | the synthetic benchmark, large size |
# | `full` | 1 GPU + OpenAI CLIP and Salesforce BLIP weights | CLIP ViT-B/32, BLIP base | real M-BEIR |
#
# Measured run times per profile are in the README's notebook table.

# %% tags=["parameters"]
PROFILE = "tiny"  # "tiny" (CPU, offline), "gpu" (real-size towers, random init) or "full" (CLIP/BLIP weights, M-BEIR)
SEED = None  # None: the profile's value (so for every knob below); seeds the mixer, pooler, batches and draws
DEVICE = None  # "cpu", "cuda" or "auto"; also where the latency is measured
DATA_DIR = None  # the synthetic benchmark's folder (its union training file, 16 pairs and pools), or M-BEIR's in full
OUT_DIR = None  # notebook 01's CLIP and 02's BLIP are loaded from here; the four trained models and metrics go here
FIG_DIR = None  # where the architecture, token-budget, training, FF-vs-SF and latency figures are saved
DATA_SIZE = None  # synthetic size ("tiny", "small", "gpu") or "full" (real M-BEIR)
MAX_STEPS = None  # sets BUDGET_STEPS when that is None (and the steps of 01's CLIP or 02's BLIP if trained here)
BATCH_SIZE = None  # instructed queries per batch for each of the four models
EVAL_BATCH_SIZE = None  # queries or candidates per forward pass when embedding for evaluation
EMBED_DIM = None  # width of the shared embedding space of all four models
IMAGE_SIZE = None  # image side in pixels of the CLIP and BLIP image towers
NUM_WORKERS = None  # data-loader worker processes for training and embedding
PRECISION = None  # "fp32", or "bf16" (autocast on a GPU) for training
PRETRAINED = None  # True (full): start from OpenAI's CLIP and Salesforce's BLIP instead of notebooks 01 and 02
BUDGET_STEPS = None  # training steps of every model compared here; None: MAX_STEPS // 5 in tiny, MAX_STEPS otherwise

# %% [markdown]
# ## Setup
#
# The setup cell of every notebook: resolve the profile's knobs, seed, pick the device, print one
# line about the run, and make sure the synthetic benchmark is on disk.

# %%
import statistics
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display
from PIL import Image

import uniir_lite
from uniir_lite import record_metrics
from uniir_lite.data import mbeir
from uniir_lite.data.torch_data import MBEIREmbedDataset, collator_for
from uniir_lite.evaluation import average, chance_level, evaluate_model, load_pairs, paper_hits
from uniir_lite.fusion import PAPER_NAMES, build_uniir
from uniir_lite.fusion.feature import TINY_MOMENTUM, count_parameters
from uniir_lite.instructions import InstructionTable
from uniir_lite.metrics import bootstrap_average, paper_numbers, paper_table
from uniir_lite.multitask import UniIRRecipe, train_or_load_at_budget
from uniir_lite.recipes.clip import train_or_load_clip
from uniir_lite.viz import MODALITY_COLORS, fusion_diagram, image_grid, interactive, save_figure

cfg = uniir_lite.setup(globals())  # profile + knobs, seed, device, plot style, data
root = cfg.data_root  # the synthetic benchmark (tiny, gpu) or M-BEIR (full)
test = load_pairs(root, "test")
by_name = {d.pair.name: d for d in test}
steps = BUDGET_STEPS or (cfg.max_steps // 5 if cfg.profile == "tiny" else cfg.max_steps)
print(f"training budget of every model: {steps} steps of {cfg.batch_size} queries")

# %% [markdown]
# ## 1. Where do the modalities meet?
#
# A query of task 7 (CIRR-like: *"this picture, but with two squares instead of one"*) has an image
# **and** a text, and the right candidate depends on both *together*. Score fusion (notebook 05)
# embeds the image and the text separately and adds the two vectors; the only place they meet is the
# sum. Feature fusion lets them meet earlier, *inside* the encoder, before anything is pooled:
#
# - **CLIP_FF** keeps every token of both CLIP towers, concatenates the two sequences and runs a
#   small T5 encoder over them: each text token can attend to each image patch and vice versa. The
#   embedding is the mean over all output tokens.
# - **BLIP_FF** uses BLIP's *image-grounded* text encoder (notebook 02's ITM encoder): every text
#   layer cross-attends to all image tokens, and the embedding is BERT's pooler on the [CLS] state.
#
# The same encoder embeds the candidates (an image, a text, or both), so query and candidate live in
# one space, as in score fusion.

# %%
fig = fusion_diagram()
save_figure(fig, "06_architectures", cfg)
plt.show()

# %% [markdown]
# ## 2. CLIP_FF, step by step
#
# We start from notebook 01's CLIP (loaded from its checkpoint, or trained now if this notebook
# runs alone). `build_uniir("clip_ff", ...)` wraps a copy of it with a new, randomly initialised T5
# mixer: this untrained CLIP_FF is our starting point and, later, the "before training" baseline.
#
# A batch of composed test queries (task 7, CIRR-like) with their instructions goes through the
# model's collator: token ids, images and the two modality masks.

# %%
clip, clip_tokenizer = train_or_load_clip(cfg, root)  # notebook 01's CLIP, with its text projection
clip_ff = build_uniir("clip_ff", cfg, root).eval()
table_of = InstructionTable.from_root(root)
modality_of = mbeir.pool_modalities(mbeir.read_pool(mbeir.global_pool_path(root, "test")))


def query_items(d, n=None):
    """Instructed test queries of one pair, as the evaluation embeds them (UniIR's random choice, seeded)."""
    dataset = MBEIREmbedDataset.from_queries(d.queries[:n], root=root, instructions=table_of,
                                             modality_of=modality_of.__getitem__, policy="random", seed=cfg.seed)
    return [dataset[i] for i in range(len(dataset))]


composed = query_items(by_name["cirr_task7"], 8)
side = collator_for(clip_ff, root)(composed)
txt, img = side["txt"].to(cfg.device), side["img"].to(cfg.device)  # [n, L], [n, 3, S, S]
print(composed[0]["txt"])
print("txt", tuple(txt.shape), "img", tuple(img.shape), "txt_mask", side["txt_mask"].tolist(), "img_mask", side["img_mask"].tolist())

# %% [markdown]
# **Text tokens.** CLIP's text tower embeds the token ids, adds positions, runs a transformer with a
# causal mask and a final layer norm. CLIP itself then keeps only the end-of-text token and projects
# it; CLIP_FF keeps *every* token and drops the projection (UniIR deletes `text_projection`):
#
# $$H^{t} = \mathrm{LN}_{\text{final}}\big(\mathrm{Transformer}_{\text{causal}}(E[t] + P)\big) \in \mathbb{R}^{L \times d}$$

# %%
c = clip_ff.clip
with torch.no_grad():
    x = c.token_embedding(txt) + c.positional_embedding  # [n, L, d]
    H_t = c.ln_final(c.transformer(x, attn_mask=c.attn_mask))  # [n, L, d]
    assert torch.allclose(H_t, clip_ff.text_tokens(txt), atol=1e-6)
    # the EOT token, projected, is exactly CLIP's text embedding
    eot = txt.argmax(dim=-1)  # the EOT id is the largest in CLIP's vocabulary
    assert torch.allclose(H_t[torch.arange(len(txt)), eot] @ clip.text_projection, clip.encode_text(txt), atol=1e-5)
print("H_t", tuple(H_t.shape))

# %% [markdown]
# **Image tokens.** CLIP's ViT cuts the image into $P$ patches, prepends a class token and runs a
# transformer. CLIP normalises and projects only the class token; UniIR's
# `VisionTransformerWithoutPooling` applies `ln_post` and the projection to *every* token:
#
# $$H^{i} = \mathrm{LN}_{\text{post}}\big(\mathrm{ViT}(x)\big)\, W_{\text{proj}} \in \mathbb{R}^{(1+P) \times d}$$
#
# Its first row is CLIP's image embedding.

# %%
v = c.visual
with torch.no_grad():
    H_i = v.ln_post(v.transformer(v._embeds(img))) @ v.proj  # [n, 1+P, d]
    assert torch.allclose(H_i, clip_ff.image_tokens(img), atol=1e-6)
    assert torch.allclose(H_i[:, 0], clip.encode_image(img), atol=1e-5)
print("H_i", tuple(H_i.shape), f"= 1 class token + {H_i.shape[1] - 1} patches")

# %% [markdown]
# **The mixer.** The two sequences are concatenated and passed through a 2-layer T5 *encoder*
# (`transformers`' `T5Stack`), built from a config with CLIP's width as `d_model` and initialised at
# random. A T5 layer is pre-norm self-attention with relative position biases, then a ReLU
# feed-forward block, both residual, with RMS norms (no biases anywhere). The fused embedding is the
# **mean over all output tokens**, then L2-normalised:
#
# $$Z = \mathrm{T5}\big([H^{t}; H^{i}]\big) \in \mathbb{R}^{(L+1+P) \times d}, \qquad
#   e = \frac{1}{L+1+P} \sum_{k} Z_k, \qquad q = \frac{e}{\lVert e \rVert}$$
#
# The mixer's shape, next to UniIR's for ViT-L/14:

# %%
t5c = clip_ff.t5.config
pd.DataFrame(
    {"this run": [t5c.num_layers, t5c.d_model, t5c.num_heads, t5c.d_kv, t5c.d_ff, t5c.dropout_rate,
                  count_parameters(clip_ff, "t5.")],
     "UniIR CLIP_FF (ViT-L/14)": [2, 768, 12, 64, 2048, 0.1, None]},
    index=["layers", "d_model", "heads", "d_kv", "d_ff", "dropout", "parameters"],
).astype(object)

# %%
with torch.no_grad():
    Z = clip_ff.t5(inputs_embeds=torch.cat([H_t, H_i], dim=1), attention_mask=None).last_hidden_state  # [n, L+1+P, d]
    q_emb = F.normalize(Z.mean(dim=1), dim=-1)  # [n, d]
    assert torch.allclose(q_emb, clip_ff.encode_query({**side, "txt": txt, "img": img}), atol=1e-6)
print("Z", tuple(Z.shape), "-> q_emb", tuple(q_emb.shape))

# %% [markdown]
# **No mask.** The released CLIP_FF passes `attention_mask=None` and its modality masks are commented
# out. So the padding of the text, and for a text-only query an all-zero image, are encoded and
# averaged like everything else. How much of the mean is real content? We count, per task, the
# tokens of the instructed query text, its padding, and the image tokens (real or of the zero image).

# %%
context = clip_ff.text_tokens(txt[:1]).shape[1]
n_img_tokens = H_i.shape[1]
rows = []
for task_id in sorted({d.pair.task_id for d in test}):
    items = [it for d in test if d.pair.task_id == task_id for it in query_items(d, 16)]
    ids = clip_ff.tokenize([it["txt"] for it in items])  # [n, L]
    real = (ids > 0).sum(dim=1).float().mean().item()
    has_image = np.mean([it["img_path"] is not None for it in items])
    rows.append({"task": f"{mbeir.TASKS[task_id].paper_number}. {mbeir.TASKS[task_id].short}",
                 "text tokens": real, "text padding": context - real,
                 "image tokens": has_image * n_img_tokens, "zero-image tokens": (1 - has_image) * n_img_tokens})
budget = pd.DataFrame(rows).set_index("task")

fig, ax = plt.subplots(figsize=(7, 3.2))
budget.plot.barh(stacked=True, ax=ax, color=[MODALITY_COLORS["text"], "#B8C7E0", MODALITY_COLORS["image"], "#F2CDB3"])
ax.invert_yaxis()
ax.set_xlabel("tokens in CLIP_FF's mean (average query)")
ax.set_title("what CLIP_FF averages over, per task")
ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
save_figure(fig, "06_token_budget", cfg)
plt.show()
print(f"share of the mean that is real query content: {(budget['text tokens'] + budget['image tokens']).div(context + n_img_tokens).round(2).to_dict()}")

# %% [markdown]
# **The modalities interact.** In score fusion the text embedding cannot depend on the image. In
# CLIP_FF the T5 output at a *text* position changes when only the image changes, because
# self-attention runs across both. We swap the images of the batch (a roll by one) and measure how
# much the text part of $Z$ moves, relative to its size. For score fusion (notebook 05's CLIP_SF on
# the same CLIP) we measure the text embedding of its `unimodal` split the same way.

# %%
clip_sf_untrained = build_uniir("clip_sf", cfg, root).eval()  # score fusion on notebook 01's CLIP
with torch.no_grad():
    rolled = img.roll(1, dims=0)
    n_txt = txt.shape[1]
    Z_rolled = clip_ff.t5(inputs_embeds=torch.cat([H_t, clip_ff.image_tokens(rolled)], dim=1)).last_hidden_state
    change_ff = ((Z_rolled[:, :n_txt] - Z[:, :n_txt]).norm() / Z[:, :n_txt].norm()).item()
    sf_side = {**side, "txt": txt, "img": img}
    _, txt_emb = clip_sf_untrained.unimodal(sf_side)
    _, txt_emb_rolled = clip_sf_untrained.unimodal({**sf_side, "img": rolled})
    change_sf = ((txt_emb_rolled - txt_emb).norm() / txt_emb.norm()).item()
pd.Series({"CLIP_SF text embedding": change_sf, "CLIP_FF text positions of Z": change_ff},
          name="relative change when only the image changes").to_frame().round(4)

# %% [markdown]
# ## 3. BLIP_FF, step by step
#
# BLIP_FF starts from notebook 02's BLIP: its ViT and its text encoder *with* the cross-attention
# layers (the image-grounded encoder BLIP trains with image-text matching). It adds BERT's pooler,
# a dense layer and a tanh on the [CLS] state, which BLIP's checkpoints do not have; UniIR loads
# BLIP's weights and the pooler starts at random. The [CLS] token stays first, as in the released
# code (BLIP's ITM uses [ENC] there). Every text layer $\ell$ runs self-attention over the text, then
# cross-attention from the text to all image tokens $V$, then a feed-forward block:
#
# $$h^{\ell+1} = \mathrm{FFN}\Big(\mathrm{CrossAttn}\big(\mathrm{SelfAttn}(h^{\ell}),\; V\big)\Big), \qquad
#   e = \tanh\big(W\, h^{L}_{[\mathrm{CLS}]} + b\big), \qquad q = \frac{e}{\lVert e \rVert}$$

# %%
blip_ff = build_uniir("blip_ff", cfg, root).eval()
b_side = collator_for(blip_ff, root)(composed)
ids, b_img = b_side["txt"].to(cfg.device), b_side["img"].to(cfg.device)  # [n, L], [n, 3, S, S]
with torch.no_grad():
    V = blip_ff.vision_model(pixel_values=b_img).last_hidden_state  # [n, 1+P, w]: every image token
    out = blip_ff.text_encoder(
        input_ids=ids, attention_mask=(ids != 0).long(),  # [PAD] = 0
        encoder_hidden_states=V, encoder_attention_mask=torch.ones(V.shape[:-1], dtype=torch.long, device=V.device),
    )
    h_cls = out.last_hidden_state[:, 0]  # [n, w]
    pooler = blip_ff.text_encoder.pooler.dense
    q_blip = F.normalize(torch.tanh(h_cls @ pooler.weight.T + pooler.bias), dim=-1)  # [n, w]
    assert torch.allclose(q_blip, blip_ff.encode_query(b_side | {"txt": ids, "img": b_img}), atol=1e-6)
print(blip_ff.tokenize(["x"])[0, 0].item() == 101, "| V", tuple(V.shape), "| h_cls", tuple(h_cls.shape), "-> q", tuple(q_blip.shape))

# %% [markdown]
# ## 4. Four models, one budget
#
# The paper trains all four UniIR models: CLIP_SF, BLIP_SF (score fusion, notebook 05), CLIP_FF and
# BLIP_FF. So do we, at one budget. For the comparison to mean anything, everything but the fusion
# is the same: UniIR's recipe (`uniir_lite.multitask.train_uniir`), the union training file,
# instructions with UniIR's random choice, the batch size, the seed and the number of steps. Each
# family keeps UniIR's own loss: the one-way in-batch contrastive loss for the CLIP models, BLIP's
# momentum-queue loss for the BLIP models.
#
# The score-fusion models here are **not** notebook 05's: they are the same recipe retrained for
# this notebook's budget (printed in the setup cell; notebook 05 trains longer). An equal budget is
# the point of the comparison, and four runs of notebook 05's length would not fit the tiny
# profile's minute. Each run is saved under its own `<setting>-<steps>steps` folder, so notebook
# 05's checkpoint is never overwritten.
#
# How big is each model? Score fusion adds nothing to the towers; CLIP_FF drops CLIP's text
# projection and adds the T5 mixer; BLIP_FF adds the pooler to BLIP's towers (and uses the
# cross-attention layers that BLIP_SF leaves out).

# %%
blip_sf_untrained = build_uniir("blip_sf", cfg, root).eval()  # BLIP_SF trains BLIP without its cross-attention
params = pd.DataFrame(
    {
        "CLIP_SF": {"towers": count_parameters(clip_sf_untrained), "fusion module": 0},
        "BLIP_SF": {"towers": sum(p.numel() for p in blip_sf_untrained.parameters() if p.requires_grad), "fusion module": 0},
        "CLIP_FF": {"towers": count_parameters(clip_ff) - count_parameters(clip_ff, "t5."),
                    "fusion module": count_parameters(clip_ff, "t5.")},
        "BLIP_FF": {"towers": count_parameters(blip_ff) - count_parameters(blip_ff.text_encoder.pooler),
                    "fusion module": count_parameters(blip_ff.text_encoder.pooler)},
    }
).T
params["total"] = params.sum(axis=1)
params["fusion share"] = (params["fusion module"] / params["total"]).round(3)
params

# %% [markdown]
# Two details of the recipe matter for a run this short:
#
# - UniIR trains CLIP_FF's T5 layers with their own, larger learning rate (`t5_learning_rate`),
#   because they start from scratch while the towers are pre-trained. The model declares that ratio
#   as a learning-rate multiplier per module (`lr_groups()`, printed below). The tiny profile's
#   towers already train far above UniIR's rate, and there the multiplier is one.
# - BLIP's momentum encoder (BLIP_SF and BLIP_FF) is updated as $\theta_m \leftarrow m\,\theta_m + (1-m)\,\theta$, with
#   UniIR's $m$ chosen for tens of thousands of steps. After a short run the momentum encoder, whose
#   features are the loss's targets, has hardly left its start:

# %%
recipe = UniIRRecipe.from_config(cfg, "blip_ff", steps=steps)
momentum = TINY_MOMENTUM if cfg.profile == "tiny" else recipe.momentum
print({k: v for k, v in vars(recipe).items() if k not in ("model",)})
print(f"share of the momentum encoder still at its start after {steps} steps: m = {recipe.momentum} -> "
      f"{recipe.momentum ** steps:.2f}; m = {momentum} -> {momentum ** steps:.2g}")
print("CLIP_FF learning-rate multipliers:", clip_ff.lr_groups(), "| BLIP_FF:", blip_ff.lr_groups() or "none")

# %% [markdown]
# So in the tiny profile both BLIP models use the smaller momentum printed above; the `gpu` and
# `full` profiles keep UniIR's. The four runs (each loaded from `OUT_DIR/checkpoints/uniir/` if an
# earlier run saved it):

# %%
models, logs = {}, {}
for kind in ("clip_sf", "blip_sf", "clip_ff", "blip_ff"):
    overrides = {"momentum": momentum} if kind.startswith("blip") else {}
    models[kind], logs[kind] = train_or_load_at_budget(kind, cfg, root, steps, **overrides)

fig, axes = plt.subplots(1, 4, figsize=(13, 2.8))
for ax, (kind, log) in zip(axes, logs.items()):
    ax.plot(log["step"], log["loss"], color="#4C72B0")
    ax.set_title(f"{PAPER_NAMES[kind]} ({models[kind].loss_kind} loss)")
    ax.set_xlabel("step")
axes[0].set_ylabel("training loss")
fig.suptitle(f"equal budget: {steps} steps of {cfg.batch_size} instructed queries each")
fig.tight_layout()
save_figure(fig, "06_training", cfg)
plt.show()

# %% [markdown]
# ## 5. The 16-row table on local pools
#
# Each pair's queries are searched in the pair's own pool with the paper's metric per row (Recall@5,
# Recall@10 for the fashion sets), exactly as in notebook 05. Beside the four trained models: the
# CLIP_SF, CLIP_FF and BLIP_FF *before* this training (pre-trained towers; for feature fusion a new
# random mixer or pooler) and chance.

# %%
KINDS = ("clip_sf", "blip_sf", "clip_ff", "blip_ff")
evals = {kind: evaluate_model(m, cfg, root, test, pools=("local",))["local"] for kind, m in models.items()}
untrained = {kind: evaluate_model(m, cfg, root, test, pools=("local",))["local"]
             for kind, m in (("clip_sf", clip_sf_untrained), ("clip_ff", clip_ff), ("blip_ff", blip_ff))}
chance = chance_level(test)

table = paper_table(evals["clip_sf"].results)[["task", "dataset"]].copy()
for kind in KINDS:
    table[PAPER_NAMES[kind]] = paper_table(evals[kind].results)["value"]
for kind, ev in untrained.items():
    table[f"{PAPER_NAMES[kind]} untrained"] = paper_table(ev.results)["value"]
table["chance"] = [100 * chance[p.name] for p in mbeir.EVAL_PAIRS if p.name in chance] + [100 * np.mean(list(chance.values()))]
table["FF − SF (CLIP)"] = table["CLIP_FF"] - table["CLIP_SF"]
table["FF − SF (BLIP)"] = table["BLIP_FF"] - table["BLIP_SF"]
table.round(1)

# %% [markdown]
# **Untrained CLIP_SF is not notebook 05's zero-shot baseline.** Both are score fusion on notebook
# 01's CLIP, but here every query carries an instruction (as all models of this comparison are
# evaluated), while notebook 05's zero-shot baseline has none (and keeps one query modality on tasks
# 6 and 8). An instruction the untrained CLIP never saw is just more words in the query text. The
# same untrained model, without instructions:

# %%
plain = evaluate_model(clip_sf_untrained, cfg, root, test, instructions=False, pools=("local",))["local"]
instr_effect = pd.DataFrame({"with instructions": table["CLIP_SF untrained"],
                             "without": paper_table(plain.results)["value"]})
instr_effect.index = [f"{t.split('.')[0]}. {d}" if t else d for t, d in zip(table.task, table.dataset)]
instr_effect["instructions add"] = instr_effect["with instructions"] - instr_effect["without"]
worst = instr_effect.drop("Average")["instructions add"].idxmin()
best = instr_effect.drop("Average")["instructions add"].idxmax()
display(Markdown(
    f"On average the instructions move the untrained CLIP_SF by {instr_effect.loc['Average', 'instructions add']:+.1f} points. "
    f"The largest loss is {worst} ({instr_effect.loc[worst, 'without']:.1f} → {instr_effect.loc[worst, 'with instructions']:.1f})"
    + (f", the largest gain {best} ({instr_effect.loc[best, 'without']:.1f} → {instr_effect.loc[best, 'with instructions']:.1f})"
       if instr_effect.loc[best, "instructions add"] > 0 else "")
    + ". " + ("That row's queries are images alone, so their text is the instruction alone: the untrained model adds "
              "the embedding of one of a few sentences about the task to every query, nearly the same vector for all of "
              "them, which drowns the picture that tells the queries apart. " if int(worst.split(".")[0]) in (4, 5) else
              "To the untrained model an instruction is text it never saw, added to every query of a row. ")
    + "Training (section 4) teaches the model what an instruction is for; notebook 07 measures it."
))
instr_effect.round(1)

# %% [markdown]
# ### The 2 x 2 against the paper
#
# The paper's Table 2 (global pool, all four models trained with instructions) is the comparison we
# mirror: with CLIP towers feature fusion is *below* score fusion, with BLIP towers it is *above*.
# Which fusion is better depends on the backbone. Our averages over the 16 local rows (local pools,
# tiny towers, an equal short budget) beside the paper's global ones:

# %%
paper_avg = {kind: float(np.mean(list(paper_numbers("table2_mbeir_global_5p6M", f"UniIR_{PAPER_NAMES[kind]}").values())))
             for kind in KINDS}
hits = {kind: paper_hits(ev, test) for kind, ev in evals.items()}
two_by_two = pd.DataFrame(
    [{"backbone": b, "fusion": f, "this run (local)": table.loc[table.dataset == "Average", f"{b}_{f}"].item(),
      "paper Table 2 (global)": paper_avg[f"{b.lower()}_{f.lower()}"]} for b in ("CLIP", "BLIP") for f in ("SF", "FF")]
).pivot(index="backbone", columns="fusion").loc[["CLIP", "BLIP"]]
two_by_two.round(1)

# %% [markdown]
# The lesson is in the differences: FF − SF per backbone, and the interaction (how much more FF gains
# with BLIP than with CLIP), each with a paired bootstrap interval over queries.

# %%
def ff_minus_sf(backbone):
    return bootstrap_average(hits[f"{backbone}_ff"], hits[f"{backbone}_sf"])


interaction_hits = {p: hits["blip_ff"][p] - hits["blip_sf"][p] - hits["clip_ff"][p] + hits["clip_sf"][p] for p in hits["clip_sf"]}
diffs = {"FF − SF, CLIP": ff_minus_sf("clip"), "FF − SF, BLIP": ff_minus_sf("blip"),
         "interaction (BLIP's FF − SF minus CLIP's)": bootstrap_average(interaction_hits)}
paper_diffs = {"FF − SF, CLIP": paper_avg["clip_ff"] - paper_avg["clip_sf"], "FF − SF, BLIP": paper_avg["blip_ff"] - paper_avg["blip_sf"]}
paper_diffs["interaction (BLIP's FF − SF minus CLIP's)"] = paper_diffs["FF − SF, BLIP"] - paper_diffs["FF − SF, CLIP"]
diff_table = pd.DataFrame({name: {"this run": 100 * v, "low": 100 * lo, "high": 100 * hi, "paper": paper_diffs[name]}
                           for name, (v, lo, hi) in diffs.items()}).T
diff_table.round(1)

# %%
def verdict(low, high):
    return "above zero" if low > 0 else ("below zero" if high < 0 else "not told apart from zero")


clip_d, blip_d, inter = (diff_table.loc[n] for n in diff_table.index)
shows_clip = clip_d["high"] < 0
shows_blip = blip_d["low"] > 0
shows_inter = inter["low"] > 0
display(Markdown(
    f"In this run, FF − SF is {clip_d['this run']:+.1f} points with CLIP towers ({verdict(clip_d['low'], clip_d['high'])}; "
    f"paper {clip_d['paper']:+.1f}) and {blip_d['this run']:+.1f} with BLIP towers ({verdict(blip_d['low'], blip_d['high'])}; "
    f"paper {blip_d['paper']:+.1f}); the interaction is {inter['this run']:+.1f} (interval {inter['low']:+.1f} to "
    f"{inter['high']:+.1f}; paper {inter['paper']:+.1f}). "
    + ("This run shows the paper's finding: the backbone decides which fusion wins." if shows_clip and shows_blip else
       ("This run shows the paper's interaction (feature fusion gains more with BLIP than with CLIP) but not both of its "
        "signs. " if shows_inter else "This run does **not** show the paper's interaction. ")
       + ("With CLIP towers feature fusion is below score fusion, as in the paper. " if shows_clip else "")
       + ("With BLIP towers feature fusion is above score fusion, as in the paper. " if shows_blip else
          "With BLIP towers feature fusion does not beat score fusion here, unlike the paper. ")
       + "Section 7 says why a run this small can differ.")
))

# %% [markdown]
# Row by row, the difference to score fusion on the same towers (right of zero: feature fusion wins).
# Composed queries, tasks 6 to 8, are where the two query modalities must be combined.

# %%
rows = table[table.dataset != "Average"]
labels = [f"{t.split('.')[0]}. {d}" for t, d in zip(rows.task, rows.dataset)]
composed_row = np.array([int(t.split(".")[0]) >= 6 for t in rows.task])
y = np.arange(len(rows))
fig, ax = plt.subplots(figsize=(7, 4.8))
for name, color, dy in (("CLIP", "#55A868", -0.2), ("BLIP", "#8172B2", 0.2)):
    ax.barh(y + dy, rows[f"{name}_FF"] - rows[f"{name}_SF"], height=0.4, color=color, label=f"{name}_FF − {name}_SF")
ax.axvline(0, color="black", lw=0.7)
ax.axhspan(composed_row.argmax() - 0.5, len(rows) - 0.5, color="#F4F1DE", zorder=-1, label="composed queries (tasks 6-8)")
ax.set_yticks(y, labels, fontsize=8)
ax.invert_yaxis()
ax.set_xlabel("difference in the paper metric, points (equal training budget)")
ax.legend(fontsize=7, loc="upper right")
ax.set_title("feature fusion vs score fusion on the same towers, per row")
save_figure(fig, "06_ff_vs_sf", cfg)
plt.show()

# %% [markdown]
# The same, per group of tasks: cross-modal (tasks 1 and 4), same modality (2 and 5), text to
# image–text (3) and composed queries (6, 7, 8). A group holds 2 to 5 rows of a test split's queries, so a few
# points between two models is within the noise.

# %%
groups = {"cross-modal (1, 4)": (1, 4), "same modality (2, 5)": (2, 5), "text -> image+text (3)": (3,),
          "composed (6, 7, 8)": (6, 7, 8)}
task_no = rows.task.map(lambda t: int(t.split(".")[0]))
columns = ["CLIP_SF", "BLIP_SF", "CLIP_FF", "BLIP_FF", "CLIP_SF untrained", "CLIP_FF untrained", "BLIP_FF untrained", "chance"]
per_group = pd.DataFrame({g: rows[task_no.isin(ts)][columns].mean() for g, ts in groups.items()}).T
ax = per_group[["CLIP_SF", "BLIP_SF", "CLIP_FF", "BLIP_FF", "chance"]].plot.bar(
    figsize=(8, 3.2), color=["#4C72B0", "#DD8452", "#55A868", "#8172B2", "#DDDDDD"], rot=0)
ax.set_ylabel("mean paper metric, %")
ax.set_title("per task group, equal training budget")
ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
ax.tick_params(axis="x", labelsize=8)
save_figure(ax.figure, "06_task_groups", cfg)
plt.show()
per_group.round(1)

# %% [markdown]
# ### Try it: one query, score fusion against feature fusion
#
# Pick a composed test query (CIRR-like, task 7) and a backbone: the top 5 of its local pool for the
# score-fusion and the feature-fusion model on the same towers, the positive marked. A headless run
# shows the first query with CLIP towers.

# %%
cirr = by_name["cirr_task7"]
cirr_items = query_items(cirr)
cirr_pool = MBEIREmbedDataset.from_pool(cirr.pool, root=root)
pool_items = [cirr_pool[i] for i in range(len(cirr_pool))]
cirr_dids = list(cirr.pool["did"])
with torch.no_grad():
    cirr_c = {kind: m.encode_candidate({k: v.to(cfg.device) if torch.is_tensor(v) else v
                                        for k, v in collator_for(m, root)(pool_items).items()}) for kind, m in models.items()}


def show_query(query=0, backbone="CLIP"):
    item, positives = cirr_items[query], set(cirr.queries[query].pos)
    # one row per model, 5 results and a blank; the query on the first row
    images = [np.asarray(Image.open(item["img_path"]).convert("RGB"))] + [None] * 5
    titles = [f"query\n{cirr.queries[query].txt}"] + [""] * 5
    for fusion in ("sf", "ff"):
        kind = f"{backbone.lower()}_{fusion}"
        side = {k: v.to(cfg.device) if torch.is_tensor(v) else v for k, v in collator_for(models[kind], root)([item]).items()}
        with torch.no_grad():
            order = (models[kind].encode_query(side) @ cirr_c[kind].T)[0].argsort(descending=True).tolist()
        rank = next(r + 1 for r, i in enumerate(order) if cirr_dids[i] in positives)
        for r, i in enumerate(order[:5]):
            images.append(np.asarray(Image.open(pool_items[i]["img_path"]).convert("RGB")))
            titles.append(f"{PAPER_NAMES[kind]} #{r + 1}" + (" ✓" if cirr_dids[i] in positives else "")
                          + (f"\n(positive at {rank})" if r == 0 else ""))
        images.append(None)
        titles.append("")
    image_grid(images, titles, ncols=6, cell=1.4)
    plt.show()


interactive(show_query, query=((0, len(cirr_items) - 1, 1), 0), backbone=(["CLIP", "BLIP"], "CLIP"))

# %% [markdown]
# ## 6. The cost: latency per query
#
# Score fusion embeds a composed query with two tower passes and a sum. CLIP_FF runs the same towers
# without pooling and then the T5 mixer over every token; BLIP_FF runs the ViT and a text encoder
# whose every layer also attends to the image. The same holds for every *candidate* of the pool, so
# fusion cost is paid at indexing time too. We time one composed query at a time (the latency a
# user waits for) and a batch of them (the cost per query when embedding in bulk), on this machine.

# %%
def median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


all_composed = query_items(by_name["cirr_task7"])
ONE, BATCH = "1 query (ms)", "per query in a batch (ms)"
latency = {}
for kind, m in models.items():
    full = {k: v.to(cfg.device) if torch.is_tensor(v) else v for k, v in collator_for(m, root)(all_composed).items()}
    one = {k: v[:1] for k, v in full.items()}
    with torch.no_grad():
        latency[PAPER_NAMES[kind]] = {ONE: median_ms(lambda: m.encode_query(one), 15),
                                      BATCH: median_ms(lambda: m.encode_query(full), 5) / len(all_composed)}
latency = pd.DataFrame(latency).T
fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
colors = ["#4C72B0", "#DD8452", "#55A868", "#8172B2"]
for ax, col in zip(axes, (ONE, BATCH)):
    ax.bar(latency.index, latency[col], color=colors)
    ax.set_title(col if col == ONE else f"{col} of {len(all_composed)}")
axes[0].set_ylabel("milliseconds per composed query")
fig.suptitle(f"query embedding time on {cfg.device}")
fig.tight_layout()
save_figure(fig, "06_latency", cfg)
plt.show()
latency.round(2)

# %% [markdown]
# For a single query, fixed costs per call (Python, many small matrix products) weigh much; in a
# batch the compute per query shows. The ratios to CLIP_SF:

# %%
ratio = latency / latency.loc["CLIP_SF"]
display(ratio.round(2))


def cost_phrase(name, col):
    r = ratio.loc[name, col]
    return f"{name} {r:.2f}x" + (" (cheaper)" if r < 1 else "")


display(Markdown(
    f"Measured on {cfg.device} in this run: one query at a time, " + ", ".join(cost_phrase(n, ONE) for n in ratio.index if n != "CLIP_SF")
    + " the time of CLIP_SF; per query in a batch, " + ", ".join(cost_phrase(n, BATCH) for n in ratio.index if n != "CLIP_SF")
    + ". " + ("Every fusion model costs more than CLIP_SF in bulk." if (ratio[BATCH].drop("CLIP_SF") > 1).all() else
              "Not every model costs more than CLIP_SF in bulk: with towers this small the cost depends on the towers' "
              "widths and sequence lengths (BLIP's text is cut at 64 tokens, CLIP's at its context length) as much as on "
              "the fusion; at real sizes the fusion module's share of the work decides.")
))

# %% [markdown]
# ## 7. Reading the results
#
# Composed queries are where feature fusion should help: the query's image and text interact
# before pooling, so "the same dress but in red" can become one vector about a *red dress*, not the
# sum of "a dress" and "red". The paper's Table 2 shows the effect depends on the towers: BLIP_FF
# beats BLIP_SF, while CLIP_FF stays below CLIP_SF (section 5's 2 x 2). Per group of tasks, FF − SF on
# each backbone in this run:

# %%
gap = pd.DataFrame({b: {g: per_group.loc[g, f"{b}_FF"] - per_group.loc[g, f"{b}_SF"] for g in groups} for b in ("CLIP", "BLIP")})
gap.loc["all 16 rows"] = [table.loc[table.dataset == "Average", f"FF − SF ({b})"].item() for b in ("CLIP", "BLIP")]
gap.round(1)

# %% [markdown]
# Several things work against feature fusion in a run this small; the table shows how much they
# cost here:
#
# - **The fusion module starts from scratch.** Score fusion uses the two towers' embeddings as they
#   were pre-trained for text–image similarity. CLIP_FF feeds the same token features into a random
#   T5 and BLIP_FF reads a random pooler, so at the start their embeddings are *worse* than the
#   towers' (compare the untrained columns), and a short budget is spent first on recovering what
#   score fusion gets for free.
# - **Mean pooling dilutes the signal.** CLIP summarises a text in its end-of-text token; CLIP_FF
#   averages it with the padding and, for a text-only query, with the tokens of an all-zero image
#   (the token-budget figure). Cross-modal rows (tasks 1 and 4), where one side is a single modality,
#   pay for this most.
# - **The BLIP models learn slower still.** The momentum-queue loss compares each query with
#   *momentum* features of candidates, which trail the model, and with a queue that fills during the
#   first steps (each entry one more negative: its loss curve is not comparable step to step).
#   BLIP_FF's advantage in the paper comes from BLIP's cross-attention layers, pre-trained on
#   web-scale image–text pairs for image–text matching; notebook 02's were trained for minutes (and with [ENC], not the
#   [CLS] BLIP_FF uses), so the pre-training that makes BLIP_FF strong is mostly missing here.
#
# More steps (and the `gpu` profile's larger towers) narrow these gaps; the exercises ask you to
# test that.

# %% [markdown]
# ## Recorded metrics
#
# The local averages and per-group numbers of the three models at the same budget, each feature-fusion
# model beside its untrained self and chance, parameters, and the latency ratio to score fusion.

# %%
avg = {kind: average(ev.results) for kind, ev in evals.items()}
avg_untrained = {kind: average(ev.results) for kind, ev in untrained.items()}
chance_avg = float(np.mean(list(chance.values())))
metrics = {
    "budget_steps": steps,
    "chance_local_avg": chance_avg,
    **{f"{kind}_local_avg": avg[kind] for kind in KINDS},
    **{f"{kind}_untrained_local_avg": v for kind, v in avg_untrained.items()},
    "clip_sf_untrained_noinstruct_local_avg": average(plain.results),
    "clip_ff_minus_clip_sf_local_avg": avg["clip_ff"] - avg["clip_sf"],
    "blip_ff_minus_blip_sf_local_avg": avg["blip_ff"] - avg["blip_sf"],
    "interaction_local_avg": diff_table.iloc[2]["this run"] / 100,
    "interaction_low": diff_table.iloc[2]["low"] / 100,
}
for group, key in zip(groups, ("crossmodal", "samemodality", "text2pair", "composed")):
    for name in ("CLIP_SF", "BLIP_SF", "CLIP_FF", "BLIP_FF"):
        metrics[f"{name.lower()}_{key}"] = per_group.loc[group, name] / 100
    metrics[f"chance_{key}"] = per_group.loc[group, "chance"] / 100
metrics["clip_ff_minus_clip_sf_composed"] = metrics["clip_ff_composed"] - metrics["clip_sf_composed"]
for name in params.index:
    metrics[f"{name.lower()}_params"] = int(params.loc[name, "total"])
metrics["clip_ff_mixer_params"] = int(params.loc["CLIP_FF", "fusion module"])
for name in latency.index:
    metrics[f"{name.lower()}_ms_per_query"] = latency.loc[name, ONE]
    metrics[f"{name.lower()}_ms_per_query_batched"] = latency.loc[name, BATCH]
for name in ("BLIP_SF", "CLIP_FF", "BLIP_FF"):
    metrics[f"{name.lower()}_batched_cost_ratio_to_clip_sf"] = latency.loc[name, BATCH] / latency.loc["CLIP_SF", BATCH]
record_metrics("06_uniir_feature_fusion", metrics, cfg)

# %% [markdown]
# ## Summary
#
# - Feature fusion mixes a query's image and text *before* pooling: CLIP_FF with a T5 encoder over
#   both towers' token sequences, BLIP_FF with the text encoder's cross-attention to every image token.
# - UniIR's code has details the paper does not state: no attention mask in CLIP_FF (padding and an
#   all-zero image are averaged in), a random pooler in BLIP_FF, a separate learning rate for the T5
#   mixer.
# - The paper's finding is an interaction: feature fusion loses to score fusion on CLIP towers and
#   wins on BLIP towers. The 2 x 2 of section 5, at an equal budget with bootstrap intervals, says
#   how much of that this small run reproduces.
# - Fusing early has a price at query *and* indexing time: the latency plot and its generated
#   sentence measure it on this machine.
#
# ## Exercises
#
# 1. *Predict, then run:* set `BUDGET_STEPS` to the value of `MAX_STEPS`. Which model gains most, and
#    does the interaction of the 2 x 2 move towards the paper's?
# 2. Give CLIP_FF an attention mask and mask-aware pooling (average only real text tokens and, when
#    `img_mask` is 1, image tokens). Which rows change? Why might UniIR have left the mask out?
# 3. Replace BLIP_FF's first token by [ENC] (`uniir_lite.models.blip.enc_token_id()`), the token
#    notebook 02 trained the cross-attention path with. Does the untrained BLIP_FF start better?
# 4. Time the *candidate* side: embed one local pool with each model. How does indexing cost scale
#    with the pool size for score fusion and for feature fusion?
#
# **Next:** [07 · Instruction tuning](07_instruction_tuning.ipynb): what the instructions do, and the
# modality errors in the global pool without them.
