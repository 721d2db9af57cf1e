"""UniIR's recipe: multi-task (instruction) training on the M-BEIR union file, and evaluation functions.

Taught in notebook 05 (and used by 06 and 07). A model is any `uniir_lite.fusion.UniIRModel`:

- `train_uniir(model, cfg, root, instructions, policy, ...)` trains it in place on
  `query/union_train/mbeir_union_up_train.jsonl` with the train pool
  `cand_pool/global/mbeir_union_train_cand_pool.jsonl`, through `MBEIRTrainDataset` +
  `MBEIRCollator` + the model family's loss (`uniir_lite.losses`) + `uniir_lite.train.fit`, and
  returns the training log. `instructions=False` is UniIR's "no instruction" (multi-task) setting.
- `train_or_load_uniir(kind, cfg, root, instructions, policy, seed, ...)` builds the model with
  `fusion.build_uniir` and loads it from `cfg.checkpoint_dir / "uniir" / <setting>` when a checkpoint
  of the same recipe is there, else trains and saves it: one checkpoint per setting.
- `embed_fns(model, cfg, root, instructions, policy)` gives `(embed_queries, embed_candidates)` for
  `uniir_lite.evaluation.evaluate`. Queries get their instruction exactly as UniIR: chosen for the
  modality of their positive candidates, prefixed to the text (`"<instruction> <query>"`), and an
  image-only query gets the instruction alone as its text. Candidates never get one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch

from uniir_lite.checkpoints import has_checkpoint, load_checkpoint, save_checkpoint
from uniir_lite.config import Config
from uniir_lite.fusion import UniIRModel, build_uniir

CHECKPOINT_ROOT = "uniir"


@dataclasses.dataclass
class UniIRRecipe:
    """Everything a UniIR training run depends on; a checkpoint is reused only if its recipe is equal."""

    kind: str
    instructions: bool
    policy: str  # instruction choice in training: "random" (UniIR) or "fixed"
    seed: int
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.2
    warmup_steps: int = 0
    hard_negatives: int = 0
    init: str = "trained"
    fusion_weights: bool = False
    train_file: str | None = None  # relative to the M-BEIR root; None: the union training file
    queue_size: int = 0  # momentum_queue loss only (0: chosen from the batch size)
    momentum: float = 0.995
    alpha: float = 0.4
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # the untrained model's recipe

    @classmethod
    def from_config(cls, cfg: Config, kind: str, instructions: bool = True, policy: str = "random",
                    **overrides: Any) -> "UniIRRecipe":
        """The profile's recipe. `tiny`: short, higher-lr fine-tuning of the tiny towers; `gpu`/`full`:
        UniIR's optimiser (lr 1e-5, AdamW betas (0.9, 0.98), weight decay 0.2, cosine, no warm-up)."""
        tiny = cfg.profile == "tiny"
        base: dict[str, Any] = dict(
            kind=kind, instructions=instructions, policy=policy, seed=cfg.seed, steps=cfg.max_steps,
            batch_size=cfg.batch_size, lr=1e-3 if tiny else 1e-5, warmup_steps=10 if tiny else 0,
        )
        if kind.startswith("blip"):
            base.update(weight_decay=0.05, lr=1e-3 if tiny else 1e-5)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**base, **overrides})

    @property
    def setting(self) -> str:
        """A short name of the setting, also the checkpoint folder: e.g. `clip_sf-instruct-random-seed0`."""
        parts = [self.kind, "instruct" if self.instructions else "noinstruct", self.policy, f"seed{self.seed}"]
        if self.train_file:
            parts.append(Path(self.train_file).stem)
        return "-".join(parts)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def instruction_table(root: str | Path):
    from uniir_lite.data.mbeir import instructions_path
    from uniir_lite.instructions import InstructionTable

    return InstructionTable.from_tsv(instructions_path(root))


def collator(model: UniIRModel, root: str | Path):
    """The `MBEIRCollator` of `model`: its tokenizer, its image size, CLIP's normalisation."""
    from uniir_lite.data.images import ImageLoader
    from uniir_lite.data.torch_data import MBEIRCollator

    # datasets resolve image paths against the absolute root, so the loader's join keeps them as is
    loader = ImageLoader(Path(root).resolve(), model.image_size)
    return MBEIRCollator(model.tokenize, loader, model.image_size)


def train_dataset(root: str | Path, recipe: UniIRRecipe):
    """`MBEIRTrainDataset` of the union training file (or `recipe.train_file`) and the train pool."""
    from uniir_lite.data.mbeir import global_pool_path, read_pool, union_train_path
    from uniir_lite.data.torch_data import MBEIRTrainDataset

    root = Path(root).resolve()
    queries = root / recipe.train_file if recipe.train_file else union_train_path(root)
    pool = read_pool(global_pool_path(root, "train"))
    table = instruction_table(root) if recipe.instructions else None
    return MBEIRTrainDataset(queries, pool, table, recipe.policy, recipe.seed, recipe.hard_negatives, root=root)


def training_batches(model: UniIRModel, cfg: Config, root: str | Path, recipe: UniIRRecipe) -> Iterator[dict]:
    """Endless shuffled training batches; each pass is an epoch with new positives and instructions
    (`set_epoch`), and the order comes from `recipe.seed`."""
    dataset = train_dataset(root, recipe)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=recipe.batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers,
        collate_fn=collator(model, root), generator=torch.Generator().manual_seed(recipe.seed),
    )
    epoch = 0
    while True:
        dataset.set_epoch(epoch)  # workers are started per epoch, so they see the new epoch
        for batch in loader:
            yield batch
        epoch += 1


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def inbatch_loss_fn(model: UniIRModel, batch: dict) -> dict[str, torch.Tensor]:
    """CLIP_SF / CLIP_FF: one-directional in-batch contrastive loss (+ hard negatives if present)."""
    from uniir_lite.losses import inbatch_contrastive_loss

    q_emb = model.encode_query(batch["query"])  # [bs, d]
    c_emb = model.encode_candidate(batch["pos"])  # [bs, d]
    neg_emb = model.encode_candidate(batch["neg"]) if batch.get("neg") is not None else None  # [n_neg, d]
    logit_scale = model.logit_scale()
    out = inbatch_contrastive_loss(q_emb, c_emb, logit_scale, neg_emb)
    out["logit_scale"] = logit_scale.detach()
    return out


def loss_function(model: UniIRModel, recipe: UniIRRecipe, device: torch.device | str) -> Callable:
    """The loss of the model's family: `inbatch_loss_fn`, or a fresh `MomentumQueueLoss` (its momentum
    copy starts from the model as it is now)."""
    if model.loss_kind == "inbatch":
        return inbatch_loss_fn
    from uniir_lite.losses import MomentumQueueLoss, rank_and_world

    _, world = rank_and_world()
    global_batch = recipe.batch_size * world
    queue = recipe.queue_size or global_batch * 16
    return MomentumQueueLoss(model, queue, recipe.momentum, recipe.alpha,
                             alpha_ramp_steps=max(1, recipe.steps // 5), seed=recipe.seed).to(device)


# ---------------------------------------------------------------------------------------------
# Training, train-or-load
# ---------------------------------------------------------------------------------------------


def checkpoint_path(cfg: Config, recipe: UniIRRecipe, name: str | None = None) -> Path:
    return Path(cfg.checkpoint_dir) / CHECKPOINT_ROOT / (name or recipe.setting)


def train_uniir(
    model: UniIRModel,
    cfg: Config,
    root: str | Path,
    instructions: bool = True,
    policy: str = "random",
    max_steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    hard_negatives: int = 0,
    checkpoint_name: str | None = None,
    progress: bool = False,
    recipe: UniIRRecipe | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Train `model` in place with UniIR's recipe; returns the training log (step, lr, loss, accuracy, ...).

    With `checkpoint_name` the model is saved to `cfg.checkpoint_dir / "uniir" / checkpoint_name`
    (periodically as well outside the tiny profile) with its recipe and log.
    """
    from uniir_lite.train import TrainConfig, fit

    if recipe is None:
        recipe = UniIRRecipe.from_config(cfg, model.kind, instructions, policy, steps=max_steps, lr=lr,
                                         batch_size=batch_size, seed=seed, hard_negatives=hard_negatives,
                                         **overrides)
    recipe = dataclasses.replace(recipe, model=dict(model.recipe))
    directory = checkpoint_path(cfg, recipe, checkpoint_name) if checkpoint_name else None
    recipe_dict = dataclasses.asdict(recipe)
    train_cfg = TrainConfig(
        max_steps=recipe.steps, lr=recipe.lr, weight_decay=recipe.weight_decay, warmup_steps=recipe.warmup_steps,
        precision=cfg.precision, progress=progress, log_every=max(1, min(10, recipe.steps // 10)),
        checkpoint_dir=str(directory) if directory else None,
        checkpoint_every=0 if cfg.profile == "tiny" else max(1, recipe.steps // 10),
        model_config={"recipe": recipe_dict, "complete": False},
    )
    loss_fn = loss_function(model, recipe, cfg.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        log = fit(model, loss_fn, training_batches(model, cfg, root, recipe), train_cfg, cfg.device,
                  batch_size=recipe.batch_size)
    if directory:
        save_checkpoint(directory, model, {"recipe": recipe_dict, "complete": True,
                                           "log": log.to_dict(orient="records")})
    return log


def train_or_load_uniir(
    kind: str,
    cfg: Config,
    root: str | Path,
    instructions: bool = True,
    policy: str = "random",
    seed: int | None = None,
    max_steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    init: str = "trained",
    fusion_weights: bool = False,
    force: bool = False,
    progress: bool = False,
    **overrides: Any,
) -> tuple[UniIRModel, pd.DataFrame]:
    """(model in eval mode, training log) of one setting; loaded from its checkpoint when the recipe
    matches, else built with `build_uniir`, trained with `train_uniir` and saved."""
    recipe = UniIRRecipe.from_config(cfg, kind, instructions, policy, seed=seed, steps=max_steps, lr=lr,
                                     batch_size=batch_size, init=init, fusion_weights=fusion_weights, **overrides)
    model = build_uniir(kind, cfg, root, init=init, **({"fusion_weights": True} if fusion_weights else {}))
    recipe = dataclasses.replace(recipe, model=dict(model.recipe))
    directory = checkpoint_path(cfg, recipe)
    if has_checkpoint(directory) and not force:
        state, saved = load_checkpoint(directory)
        if saved.get("complete") and saved.get("recipe") == json.loads(json.dumps(dataclasses.asdict(recipe))):
            model.load_state_dict(state)
            return model.to(cfg.device).eval(), pd.DataFrame(saved.get("log", []))
    log = train_uniir(model, cfg, root, recipe=recipe, checkpoint_name=recipe.setting, progress=progress)
    return model.eval(), log


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_dataset(model: UniIRModel, dataset, collate, encode: Callable, batch_size: int, device,
                  num_workers: int = 0) -> np.ndarray:
    """[n, d] float32 embeddings of an `MBEIREmbedDataset`, in its order."""
    from uniir_lite.train import to_device

    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    out = [encode(to_device(side, device)).float().cpu() for side in loader]
    return torch.cat(out).numpy() if out else np.zeros((0, model.embed_dim), np.float32)


def embed_fns(
    model: UniIRModel,
    cfg: Config,
    root: str | Path,
    instructions: bool = True,
    policy: str = "random",
    seed: int | None = None,
    batch_size: int | None = None,
    split: str = "test",
):
    """`(embed_queries, embed_candidates)` for `uniir_lite.evaluation.evaluate`.

    `policy="random"` is UniIR's evaluation (one random instruction per query, here drawn from
    `(seed, qid)` so a run repeats), `"fixed"` the qid-hashed choice. Candidate embeddings are
    cached per pool, so local and global evaluations embed each pool once.
    """
    from uniir_lite.data.mbeir import global_pool_path, pool_modalities, read_pool
    from uniir_lite.data.torch_data import MBEIREmbedDataset

    root = Path(root).resolve()
    seed = cfg.seed if seed is None else seed
    batch_size = batch_size or cfg.eval_batch_size
    collate = collator(model, root)
    table = instruction_table(root) if instructions else None
    modality: dict[str, str] = {}
    cache: dict[str, np.ndarray] = {}

    def modality_of(did: str) -> str:
        if not modality:  # the union of the split's pools holds every positive
            modality.update(pool_modalities(read_pool(global_pool_path(root, split))))
        return modality[did]

    def embed_queries(queries) -> np.ndarray:
        dataset = MBEIREmbedDataset.from_queries(list(queries), root=root, instructions=table,
                                                 modality_of=modality_of if table else None,
                                                 policy=policy, seed=seed)
        return embed_dataset(model, dataset, collate, model.encode_query, batch_size, cfg.device, cfg.num_workers)

    def embed_candidates(pool) -> np.ndarray:
        key = getattr(pool, "_fingerprint", None) or str(id(pool))
        if key not in cache:
            dataset = MBEIREmbedDataset.from_pool(pool, root=root)
            cache[key] = embed_dataset(model, dataset, collate, model.encode_candidate, batch_size, cfg.device,
                                       cfg.num_workers)
        return cache[key]

    return embed_queries, embed_candidates


def evaluate_uniir(model: UniIRModel, cfg: Config, root: str | Path, data, instructions: bool = True,
                   policy: str = "random", seed: int | None = None, pools: tuple[str, ...] = ("local", "global")):
    """{pool: `evaluation.Evaluation`} of `model` on `data` (from `evaluation.load_pairs`), embedding
    each candidate pool once for all `pools`."""
    from uniir_lite.evaluation import evaluate

    embed_queries, embed_candidates = embed_fns(model, cfg, root, instructions, policy, seed)
    return {pool: evaluate(data, embed_queries, embed_candidates, pool=pool) for pool in pools}


def chance_level(data) -> dict[str, float]:
    """Expected paper metric (Recall@5, or @10 for the fashion sets) of a random ranking, per pair:
    the mean over queries of 1 - C(N - P, k) / C(N, k) for a local pool of N with P positives
    (`uniir_lite.metrics.chance_recall`)."""
    from uniir_lite.metrics import chance_recall

    return {d.pair.name: chance_recall(d) for d in data}


__all__ = ["UniIRRecipe", "chance_level", "checkpoint_path", "collator", "embed_dataset", "embed_fns", "evaluate_uniir",
           "inbatch_loss_fn", "instruction_table", "loss_function", "train_dataset", "train_uniir",
           "train_or_load_uniir", "training_batches"]
