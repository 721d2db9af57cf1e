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
# # 00 · Welcome to uniir-kit, and the data
#
# **Goal.** Get the kit running, meet M-BEIR (the benchmark of
# [UniIR](https://arxiv.org/abs/2311.17136)) through its files, and run a first retrieval end to end:
# embed, search, score.
#
# **You will learn**
# - how the notebooks are driven: profiles, the `parameters` cell, the setup cell;
# - M-BEIR's 8 tasks, 10 datasets and 16 (dataset, task) evaluation pairs, and the two numberings of
#   its tasks;
# - the on-disk format, record by record, with a real M-BEIR record beside a synthetic one;
# - the synthetic benchmark this kit trains on in the `tiny` profile;
# - UniIR's metric (Recall@k, a hit rate), the chance level, local vs global candidate pools, and the
#   *modality error* that motivates instruction tuning.
#
# **Prerequisites.** Python and a little PyTorch. No GPU.
#
# | profile | hardware | data |
# |---|---|---|
# | `tiny` (default) | CPU, offline | the synthetic benchmark, tiny size |
# | `gpu` | CPU is enough for this notebook | the synthetic benchmark, large size |
# | `full` | CPU | real M-BEIR files in `DATA_DIR` |
#
# Measured run times per profile are in the README's notebook table.

# %% tags=["parameters"]
PROFILE = "tiny"  # "tiny" (CPU, offline), "gpu" (the large synthetic benchmark) or "full" (real M-BEIR files)
SEED = None  # None: the profile's value (so for every knob below); seeds the benchmark and the projections
DEVICE = None  # "cpu", "cuda" or "auto"; this notebook computes with NumPy, on the CPU
DATA_DIR = None  # where the synthetic benchmark is written, or M-BEIR's folder in full
OUT_DIR = None  # the recorded metrics (this notebook trains nothing)
FIG_DIR = None  # where the example, pool-size and local-vs-global figures are saved
DATA_SIZE = None  # synthetic size ("tiny", "small", "gpu") or "full" (real M-BEIR)
EMBED_DIM = None  # width of the trivial model's random projections and of the random vectors

# %% [markdown]
# ## Setup
#
# Every notebook starts the same way. The cell above holds the knobs; `None` means "the profile's
# value" (`profiles/tiny.yaml` here). `make reproduce` runs this notebook with papermill, which
# injects the profile's values right after that cell. The setup cell, `uniir_lite.setup(globals())`,
# reads those knobs, seeds Python, NumPy and torch, picks the device, applies the plot style, finds
# the data and prints one line about the run. One knob can be changed for one run without editing a
# profile: `make reproduce SET="MAX_STEPS=20"` or `uniir-lite reproduce --set MAX_STEPS=20`.

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

import uniir_lite
from uniir_lite import record_metrics
from uniir_lite.config import load_profile, profile_names
from uniir_lite.data import mbeir
from uniir_lite.data.validate import validate_dir
from uniir_lite.env import environment
from IPython.display import Markdown, display

from uniir_lite.evaluation import average, chance_level, evaluate, load_pairs, paper_hits
from uniir_lite.metrics import bootstrap_average, paper_table, wilson_interval
from uniir_lite.viz import MODALITY_COLORS, image_grid, save_figure

cfg = uniir_lite.setup(globals())  # profile + knobs, seed, device, plot style, data

# %% [markdown]
# ## 1. Environment check
#
# The versions below are the pinned ones of `requirements.lock`; every report of `make reproduce`
# records them too, with the git commit, so a number can always be traced to the code that made it.

# %%
pd.DataFrame(environment().items(), columns=["component", "version"]).set_index("component")

# %% [markdown]
# ## 2. Profiles
#
# The same notebooks run at three scales. Knob names are shared by all notebooks, so one YAML file
# shrinks or grows all of them at once.

# %%
pd.DataFrame({name: load_profile(name) for name in profile_names()}).drop(index="PROFILE")

# %% [markdown]
# ## 3. M-BEIR: 8 tasks, 10 datasets, 16 pairs
#
# M-BEIR unifies ten retrieval datasets into one benchmark. A *task* is a pair of modalities:
# the query's and the candidate's, each `text`, `image` or both (`image,text`). A word of warning
# that costs people hours: **the code numbers tasks from 0 (and skips 5), the paper from 1**.
# File names and the `task_id` field use the code's ids; the paper's tables use 1–8.

# %%
pd.DataFrame(
    [
        {"code task_id": t.task_id, "paper task": t.paper_number, "short": t.short,
         "query modality": t.query_modality, "candidate modality": t.cand_modality}
        for t in mbeir.TASKS.values()
    ]
).set_index("code task_id")

# %% [markdown]
# The 16 (dataset, task) pairs, in the row order of the paper's tables. The paper reports Recall@5,
# except Recall@10 for the fine-grained fashion sets (Fashion200K and FashionIQ).

# %%
pairs_table = pd.DataFrame(
    [
        {"pair": p.name, "dataset": p.dataset, "dataset_id": p.dataset_id,
         "domain": mbeir.DATASET_DOMAINS[mbeir.DATASET_NAMES[p.dataset_id]],
         "paper task": mbeir.TASKS[p.task_id].paper_number, "task": mbeir.TASKS[p.task_id].short,
         "metric": f"R@{p.metric_k}"}
        for p in mbeir.EVAL_PAIRS
    ]
)
assert len(pairs_table) == 16 and pairs_table.dataset_id.nunique() == 10
pairs_table

# %% [markdown]
# ## 4. The files
#
# M-BEIR is a folder of JSON-lines files (one record per line), TSV instructions and TREC-style
# qrels:
#
# ```
# M-BEIR/
#   query/{train,val,test}/mbeir_<pair>_<split>.jsonl     queries, one file per pair (train: per dataset)
#   query/union_train/mbeir_union_up_train.jsonl          all training queries, small sets upsampled
#   cand_pool/local/mbeir_<pair>_cand_pool.jsonl          each pair's own candidates ("M-BEIR_local")
#   cand_pool/global/mbeir_union_test_cand_pool.jsonl     the union of all 16 test pools (5.6M)
#   qrels/test/mbeir_<pair>_test_qrels.txt                "qid 0 did 1 task_id", positives only
#   instructions/query_instructions.tsv                   4 instructions per pair
#   mbeir_images/<dataset>_images/...                     JPEG images, short side 256 px
# ```
#
# Here is a **real** M-BEIR test query (MSCOCO, text → image) and the top candidates a UniIR CLIP_SF
# model retrieved for it from the global pool (published by the castorini/UniIR authors).

# %%
real = [json.loads(line) for line in open("assets/mbeir_real_records.jsonl")]
real_query = real[0]["record"]
real_candidates = [r for r in real if r["kind"] == "candidate" and r["query"] == real_query["qid"]]
print(json.dumps(real_query, indent=1))
pd.DataFrame([{"rank": c["rank"], **c["record"], "has src_content key": "src_content" in c["record"]}
              for c in real_candidates[:5]])

# %% [markdown]
# Things to notice, each of which the kit's readers handle:
# - ids are strings `"<dataset_id>:<n>"` (`"9:1"` is MSCOCO's first query); query and candidate ids
#   are separate number spaces;
# - a text query has `query_img_path: null`, an image query has `query_txt: null`;
# - `pos_cand_list` holds candidate ids; image → text queries of MSCOCO have five positives;
# - the VisualNews candidates have **no** `src_content` key at all, the MSCOCO ones have it as `null`;
# - rank 1 is a *text* candidate, `9:2`: the very caption of the query. The query asked for an image.
#   That is a **modality error**, the failure that UniIR's instructions are designed to fix.
#
# UniIR also normalises every text with `format_string`, and turns ids into integers for the
# search index (`dataset_id × 10⁷ + n` for candidates). Small details; they change results.

# %%
for text in ["  a man on a moped ", '"Quoted caption"', "What colour is it?", None]:
    print(repr(text), "->", repr(mbeir.format_string(text)))
print("hash_did('9:2') =", mbeir.hash_did("9:2"), "  unhash ->", mbeir.unhash_did(mbeir.hash_did("9:2")))

# %% [markdown]
# ## 5. The synthetic benchmark
#
# Real M-BEIR needs about 170 GB of images and a GPU. To learn the ideas on a laptop, the kit writes
# a **synthetic benchmark in exactly the M-BEIR layout**: procedurally drawn images (shapes with a
# colour, size, position, count and pattern on a background) with captions, questions, encyclopedia
# passages about invented entities, and modification texts. The ten datasets keep their M-BEIR ids
# and roles (a news-like caption set, a COCO-like set with five captions per image, a fine-grained
# fashion set, ...), so every loader, metric and table of the kit works on both.
#
# It is deterministic: the same seed gives byte-identical files. The setup cell wrote it (once: later
# runs find it complete and return at once); `cfg.data_root` is its folder. In the `full` profile the
# same attribute is the real M-BEIR directory, and a missing download is one message saying what to fetch.

# %%
root = cfg.data_root  # the synthetic benchmark (tiny, gpu) or M-BEIR (full)
problems = validate_dir(root)
print(f"{root}: {len(problems)} problems")
assert problems == [], problems[:5]

# %% [markdown]
# The validator is the same one you can run on a real M-BEIR download
# (`uniir-lite data validate DIR`): it checks every record, every cross-file reference (positives
# in the pool, qrels agreeing with queries, instructions for every pair) and every image path, and
# names the file and line of each problem.
#
# A synthetic record has the very same fields as the real one:

# %%
test = load_pairs(root, "test")
by_name = {d.pair.name: d for d in test}
synthetic_query = next(iter(mbeir.iter_jsonl(mbeir.query_path(root, "test", "mscoco_task0"))))[1]
print(json.dumps(synthetic_query, indent=1))
assert set(synthetic_query) == set(real_query)

# %% [markdown]
# ## 6. One example per task
#
# Each column is a task; the top row is a query, the bottom row its first positive candidate.
# Composed queries (tasks 6–8) carry an image *and* a text.


# %%
def load_img(path):
    return None if path is None else np.asarray(Image.open(root / path).convert("RGB"))


def caption(kind, txt, modality):
    return f"{kind} [{modality}]: {txt}" if txt else f"{kind} [{modality}]"


example_pairs = ["mscoco_task0", "webqa_task1", "edis_task2", "visualnews_task3", "nights_task4",
                 "oven_task6", "cirr_task7", "infoseek_task8"]
images, titles = [], []
for name in example_pairs:
    d = by_name[name]
    q = d.queries[0]
    pool_index = {did: i for i, did in enumerate(d.pool["did"])}
    c = d.pool[pool_index[q.pos[0]]]
    images += [load_img(q.img_path), load_img(c["img_path"])]
    titles += [f"task {mbeir.TASKS[q.task_id].paper_number} · {d.pair.dataset}\n" + caption("query", q.txt, q.modality),
               caption("positive", c["txt"], c["modality"])]
# two rows: queries on top, positives below
order = [i for i in range(0, len(images), 2)] + [i for i in range(1, len(images), 2)]
fig = image_grid([images[i] for i in order], [titles[i] for i in order], ncols=len(example_pairs), cell=2.1, title_width=30)
save_figure(fig, "00_examples_per_task", cfg)
plt.show()

# %% [markdown]
# ## 7. Statistics
#
# How big is each test set and pool, and how many positives does a query have? The global pool is
# the union of the 16 local pools, as in M-BEIR.

# %%
stats = pd.DataFrame(
    [
        {"pair": d.pair.name, "task": mbeir.TASKS[d.pair.task_id].short, "queries": len(d.queries),
         "pool": len(d.pool), "positives / query": np.mean([len(q.pos) for q in d.queries]),
         "hard negatives / query": np.mean([len(q.neg) for q in d.queries]),
         "pool modality": "/".join(sorted(set(d.pool["modality"])))}
        for d in test
    ]
).set_index("pair")
global_pool_size = int(stats["pool"].sum())
pool_modalities = pd.Series([m for d in test for m in d.pool["modality"]]).value_counts()
MODALITY_NAMES = {"image": "images", "text": "texts", "image,text": "image–text pairs"}
per_pair = (f"{stats.queries.min()} per pair" if stats.queries.min() == stats.queries.max()
            else f"{stats.queries.min()} to {stats.queries.max()} per pair")
display(Markdown(
    f"{len(test)} pairs, {int(stats.queries.sum()):,} test queries ({per_pair}); "
    f"local pools of {stats.pool.min():,} to {stats.pool.max():,} candidates, and a global pool of **{global_pool_size:,}** "
    f"(" + ", ".join(f"{n:,} {MODALITY_NAMES.get(m, m)}" for m, n in pool_modalities.items()) + "). M-BEIR's global pool has 5.6M."
))
stats

# %%
fig, ax = plt.subplots(figsize=(8, 3.2))
colors = [MODALITY_COLORS[m.split("/")[0]] for m in stats["pool modality"]]
ax.bar(stats.index, stats["pool"], color=colors)
ax.set_ylabel("candidates in local pool")
ax.tick_params(axis="x", rotation=70)
handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in MODALITY_COLORS.values()]
ax.legend(handles, MODALITY_COLORS.keys(), title="candidate modality", fontsize=7)
save_figure(fig, "00_pool_sizes", cfg)
plt.show()

# %% [markdown]
# ## 8. Instructions
#
# Every pair comes with four human-style instructions, stored in
# `instructions/query_instructions.tsv`. UniIR prefixes one of them to the query text
# (`"<instruction> <query>"`): the instruction is how the model learns *what kind of candidate* to
# return. Notebook 07 is about them; here is what they look like.

# %%
instructions = mbeir.read_instructions(mbeir.instructions_path(root))
n_prompts = {key: len(prompts) for key, prompts in instructions.items()}
rows = []
for p in mbeir.EVAL_PAIRS[:4]:
    t = mbeir.TASKS[p.task_id]
    for prompt in instructions[(p.dataset_id, t.query_modality, t.cand_modality)]:
        rows.append({"pair": p.name, "instruction": prompt})
pd.DataFrame(rows)

# %% [markdown]
# ## 9. A first retrieval
#
# Retrieval in UniIR is: embed every query and every candidate into one vector space, L2-normalise,
# and return the top-k candidates by inner product (exact search, as UniIR's flat index). A query or
# candidate with both an image and a text is embedded by **score fusion**: the sum of its image and
# text embeddings (notebook 05).
#
# We have no trained model yet, so we write a *trivial* one: a text is a hashed bag of words, an
# image is its 8×8 thumbnail, and each is mapped to `EMBED_DIM` dimensions by a fixed random
# projection. It matches words with words and pixels with pixels, but has no idea that the word
# "red" and red pixels belong together.

# %%
rng = np.random.default_rng(cfg.seed)
N_BUCKETS, THUMB = 1024, 8
text_proj = rng.standard_normal((N_BUCKETS, cfg.embed_dim)) / np.sqrt(cfg.embed_dim)  # [buckets, d]
image_proj = rng.standard_normal((3 * THUMB * THUMB, cfg.embed_dim)) / np.sqrt(cfg.embed_dim)  # [pixels, d]


def embed_texts(texts):
    """Hashed bag of words (a stable hash, not Python's salted one), then the random projection."""
    import zlib

    bags = np.zeros((len(texts), N_BUCKETS))  # [n, buckets]
    for i, text in enumerate(texts):
        for word in mbeir.format_string(text).lower().replace(".", " ").replace("?", " ").split():
            bags[i, zlib.crc32(word.encode()) % N_BUCKETS] += 1
    bags /= np.linalg.norm(bags, axis=1, keepdims=True).clip(1e-6)
    return bags @ text_proj  # [n, d]


def embed_images(paths):
    thumbs = np.stack([
        np.asarray(Image.open(root / p).convert("RGB").resize((THUMB, THUMB), Image.BILINEAR), dtype=np.float32).ravel()
        if p else np.zeros(3 * THUMB * THUMB, np.float32)
        for p in paths
    ]) / 255.0  # [n, 3*8*8]
    thumbs -= thumbs.mean(axis=1, keepdims=True)  # centre, so the background does not dominate
    thumbs /= np.linalg.norm(thumbs, axis=1, keepdims=True).clip(1e-6)
    return thumbs @ image_proj  # [n, d]


def fuse(txts, img_paths):
    """Score fusion: text embedding + image embedding, a missing side counts zero."""
    txt_mask = np.array([bool(t) for t in txts], dtype=np.float32)[:, None]  # [n, 1]
    img_mask = np.array([p is not None for p in img_paths], dtype=np.float32)[:, None]  # [n, 1]
    return embed_texts(txts) * txt_mask + embed_images(img_paths) * img_mask  # [n, d]


def embed_queries(queries):
    return fuse([q.txt for q in queries], [q.img_path for q in queries])


def embed_candidates(pool):
    return fuse(list(pool["txt"]), list(pool["img_path"]))


# %% [markdown]
# UniIR's **Recall@k** is a *hit rate*: a query scores 1 if **any** of its positives is among the
# top k, else 0, averaged over queries. (It is what trec_eval calls success@k; trec_eval's
# recall@k is the *fraction* of positives found, which is lower when a query has several.)
#
# A model that ranks at random finds one positive among $N$ candidates in the top $k$ with
# probability $k/N$; with $P$ positives, $1 - \binom{N-P}{k} / \binom{N}{k}$. That is the chance
# level every later model must beat. We compute it exactly per pair and check the metric code
# against it with a model of random vectors.

# %%
random_dim = cfg.embed_dim
random_eval = evaluate(
    test,
    lambda queries: rng.standard_normal((len(queries), random_dim)),
    lambda pool: rng.standard_normal((len(pool), random_dim)),
)
chance = chance_level(test)  # per pair: the mean over queries of 1 - C(N - P, k) / C(N, k)
random_avg, chance_avg = average(random_eval.results), float(np.mean(list(chance.values())))
print(f"random vectors: average paper recall {random_avg:.3f}; exact chance level {chance_avg:.3f}")

# %% [markdown]
# The random model lands on the chance level, as it must. Now the trivial model, on the **local**
# pools: each pair's queries searched among that pair's own candidates (M-BEIR_local).

# %%
local = evaluate(test, embed_queries, embed_candidates, pool="local")
local_table = paper_table(local.results).rename(columns={"value": "trivial model"})
local_table["chance"] = [100 * chance[p.name] for p in mbeir.EVAL_PAIRS if p.name in chance] + [100 * chance_avg]
local_table["above chance"] = local_table["low"] > local_table["chance"]  # the whole 95 % interval is above it
local_table.round(1)

# %% [markdown]
# Read the table row by row, with its interval in mind. Each row is measured on its own test
# queries only (section 7), so a row's recall is known to within a few points: `low` and `high` are its 95 %
# [Wilson interval](https://en.wikipedia.org/wiki/Binomial_proportion_confidence_interval#Wilson_score_interval)
# (`uniir_lite.metrics.wilson_interval`). We call a row *above chance* only when the whole interval
# is. For the average over rows, we resample each row's queries (a bootstrap, `bootstrap_average`).
# We split the rows in two: those where query and candidate share a modality (a text on both
# sides, or an image on both sides), and the six cross-modal rows (text → image, image → text).

# %%
row_names = [p.name for p in mbeir.EVAL_PAIRS if p.name in chance]
rows_local = local_table.iloc[:-1].rename(columns={"trivial model": "value"}).assign(pair=row_names).set_index("pair")
is_cross = rows_local["task"].str.endswith(("qt->ci", "qi->ct"))
shared, cross = rows_local[~is_cross], rows_local[is_cross]
local_hits = paper_hits(local, test)  # {pair: [n_queries] 0/1 hits at the paper's k}
cross_avg, cross_low, cross_high = (100 * v for v in bootstrap_average({n: local_hits[n] for n in cross.index}))
cross_chance = cross["chance"].mean()


def row_text(name, row):
    return f"{name} {row['value']:.1f} % [{row['low']:.1f}, {row['high']:.1f}] vs {row['chance']:.1f} %"


best, worst = shared["value"].idxmax(), shared["value"].idxmin()
lines = [f"**Shared modality.** The trivial model is above chance on {int(shared['above chance'].sum())} of these "
         f"{len(shared)} rows, from {shared.loc[worst, 'value']:.1f} % ({worst}) to {shared.loc[best, 'value']:.1f} % ({best}): "
         "words match words (WebQA's questions and passages, the texts of EDIS and of the task-8 image–text candidates), and "
         "a near-duplicate image matches pixels (NIGHTS, and the reference images of the composed CIRR queries)."]
if not shared["above chance"].all():
    lines[-1] += " Not above chance: " + "; ".join(row_text(n, r) for n, r in shared[~shared["above chance"]].iterrows()) + "."
at_chance = cross_low <= cross_chance <= cross_high
lines.append(
    f"**Cross-modal.** On the {len(cross)} text → image and image → text rows it averages {cross_avg:.1f} % "
    f"(95 % bootstrap interval {cross_low:.1f} to {cross_high:.1f}) against a chance level of {cross_chance:.1f} %: "
    + ("**at chance**, as it must be: nothing connects the word \"red\" to red pixels." if at_chance else
       f"{'above' if cross_low > cross_chance else 'below'} chance, which a model with no link from words to pixels "
       "should not be: look for a leak between the two sides.")
    + f" {int((~cross['above chance']).sum())} of the {len(cross)} intervals contain the chance level or lie below it."
)
if cross["above chance"].any():
    lines[-1] += (" Above it: " + "; ".join(row_text(n, r) for n, r in cross[cross["above chance"]].iterrows())
                  + ". A fixed random projection links a few words to a few pixel patterns by accident, and among six rows at 95 % "
                  "one such interval is no surprise; another `SEED` draws other projections and moves it.")
display(Markdown("\n\n".join(lines)))

# %% [markdown]
# Learning the connection between words and pixels is what CLIP does (notebook 01). The knowledge
# rows of task 6 (OVEN, InfoSeek) need more still: the question does not name the entity, the image
# shows it, and the passage to find is text.
#
# ## 10. Local vs global pool, and the modality error
#
# In the **global** pool every query is searched among the candidates of *all* 16 pairs: images,
# texts and image–text pairs together (M-BEIR's 5.6M pool; here the union of our 16 test pools,
# counted in section 7). Now a model must also return the right
# *kind* of candidate. We measure how often it does not: the **modality error@5** is the share of
# the top-5 results whose modality is not the positives' modality. (The paper reports no such
# number; the kit defines it to make the failure visible.) The table gives each recall with its
# 95 % interval.

# %%
glob = evaluate(test, embed_queries, embed_candidates, pool="global")
rows = []
for loc, gl in zip(local.results, glob.results):
    row = {"pair": f"{loc['dataset']} t{mbeir.TASKS[loc['task_id']].paper_number}", "task": mbeir.TASKS[loc["task_id"]].short}
    for where, result in [("local", loc), ("global", gl)]:
        value = result["metrics"]["recall@5"]
        low, high = wilson_interval(value, result["n_queries"])
        row.update({f"{where} recall@5": value, f"{where} low": low, f"{where} high": high})
    row["global modality error@5"] = gl["metrics"]["modality_error@5"]
    rows.append(row)
compare = pd.DataFrame(rows).set_index("pair")
compare.round(3)

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
errors = np.stack([[compare[f"{w} recall@5"] - compare[f"{w} low"], compare[f"{w} high"] - compare[f"{w} recall@5"]]
                   for w in ("local", "global")])  # [2 bars, 2 sides, 16 rows]: the 95 % interval as error bars
compare[["local recall@5", "global recall@5"]].plot.barh(ax=axes[0], color=["#8C8C8C", "#4C72B0"], xerr=errors,
                                                         error_kw={"lw": 0.8, "capsize": 1.5})
axes[0].set_xlabel("Recall@5 (hit rate)")
compare["global modality error@5"].plot.barh(ax=axes[1], color="#C44E52")
axes[1].set_xlabel("share of top-5 with the wrong modality")
axes[1].set_xlim(0, 1)
axes[0].invert_yaxis()  # paper order, top to bottom (the y axis is shared)
fig.suptitle("trivial model: local vs global pool")
fig.tight_layout()
save_figure(fig, "00_local_vs_global", cfg)
plt.show()

# %% [markdown]
# Look at the text → image rows. What fills the top 5 of a caption in the global pool?

# %%
did_modality = {did: m for d in test for did, m in zip(d.pool["did"], d.pool["modality"])}
t2i = [d for d in test if d.pair.task_id == 0]
top5 = pd.Series([did_modality[did] for d in t2i for q in d.queries for did, _ in glob.run[q.qid][:5]]).value_counts(normalize=True)
t2i_recall = np.mean([r["metrics"]["recall@5"] for r in glob.results if r["task_id"] == 0])
display(Markdown(
    f"Of the top-5 results of the {sum(len(d.queries) for d in t2i)} text → image queries in the global pool, "
    + ", ".join(f"{100 * share:.0f} % are {MODALITY_NAMES.get(m, m)}" for m, share in top5.items())
    + f", and their global Recall@5 is {100 * t2i_recall:.1f} %. "
    + (f"The top results of a caption are {'almost all' if top5.get('text', 0) > 0.95 else 'mostly'} *texts* "
       "(captions of other pairs that share its words), not images."
       if top5.get("text", 0) > 0.5 else "Texts are not the majority here: the error comes from other kinds of candidates.")
))

# %% [markdown]
# This is the failure the real MSCOCO record above showed: the query's own caption ranked first. The
# model can't tell from the query alone which modality is wanted. UniIR's answer is to say it in the
# query: an instruction such as *"Find an everyday image match with caption"*.

# %%
cross_modal = [r for r in glob.results if mbeir.TASKS[r["task_id"]].short in ("qt->ci", "qi->ct")]
same_modal = [r for r in local.results if mbeir.TASKS[r["task_id"]].short in ("qt->ct", "qi->ci")]
metrics = {
    "n_pairs": len(test),
    "n_datasets": len({d.pair.dataset_id for d in test}),
    "instructions_per_pair": min(n_prompts.values()),
    "validate_problems": len(problems),
    "test_queries": int(stats.queries.sum()),
    "global_pool_size": global_pool_size,
    "random_local_avg_recall": random_avg,
    "chance_local_avg_recall": chance_avg,
    "trivial_local_avg_recall": average(local.results),
    "trivial_cross_modal_local_recall": cross_avg / 100,
    "chance_cross_modal_local_recall": cross_chance / 100,
    "trivial_same_modality_recall@5": float(np.mean([r["metrics"]["recall@5"] for r in same_modal])),
    "trivial_global_cross_modal_modality_error@5": float(np.mean([r["metrics"]["modality_error@5"] for r in cross_modal])),
}
record_metrics("00_welcome_and_data", metrics, cfg)

# %% [markdown]
# ## Summary
#
# - The kit runs every notebook at three scales (profiles); knobs live in the `parameters` cell.
# - M-BEIR has 8 tasks (numbered 0–8 without 5 in code, 1–8 in the paper), 10 datasets and 16
#   evaluation pairs; its files are JSON lines, TSV and 5-column qrels, and the kit reads them as
#   released.
# - The synthetic benchmark has the same layout and roles, so everything learned here carries over.
# - UniIR's Recall@k is a hit rate, and on a test set of this size a row's value has an interval
#   of several points. A random model sits at the chance level $k/N$; a trivial word-and-pixel
#   model is far above chance within a modality and, across modalities, at chance within the noise.
# - In the global pool a model must also choose the right modality; the trivial model fills the
#   top 5 of its cross-modal queries with the wrong one (the modality error above).
#
# ## Exercises
#
# 1. *Predict, then run:* set `EMBED_DIM = 16`. What happens to the trivial model's text → text
#    recall, and to the random model's? Why is one affected and not the other?
# 2. Find a query of `visualnews_task0` whose top-1 global result is a text. Print the query and
#    that text: why did it win?
# 3. Compute fractional recall@5 (in `local.results`) for `mscoco_task3`, whose queries have five
#    positives. Why is it lower than Recall@5?
# 4. Run `uniir-lite data validate` on the synthetic folder after deleting one image. What is
#    reported?
#
# **Next:** [01 · CLIP](01_clip.ipynb): learn the connection between words and pixels.
