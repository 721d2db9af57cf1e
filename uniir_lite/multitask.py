"""UniIR's recipe: multi-task (instruction) training of a fused model on the M-BEIR union file.

Taught in notebook 05 (and used by 06 and 07). A model is any `uniir_lite.fusion.UniIRModel`:

- `train_uniir(model, cfg, root, instructions, policy, ...)` trains it in place on
  `query/union_train/mbeir_union_up_train.jsonl` with the train pool
  `cand_pool/global/mbeir_union_train_cand_pool.jsonl`, through `MBEIRTrainDataset` +
  `MBEIRCollator` + the model family's loss (`uniir_lite.losses`) + `uniir_lite.train.fit`, and
  returns the training log. `instructions=False` is UniIR's "no instruction" (multi-task) setting.
- `train_or_load_uniir(kind, cfg, root, instructions, policy, seed, ...)` builds the model with
  `fusion.build_uniir` and loads it from `cfg.checkpoint_dir / "uniir" / <setting>` when a checkpoint
  of the same recipe is there, else trains and saves it (`checkpoints.train_or_load`): one
  checkpoint per setting. `train_or_load_at_budget` does the same for a fixed number of steps.

Evaluating a trained model is `uniir_lite.evaluation.evaluate_model`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch

from uniir_lite.checkpoints import as_json, train_or_load
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


def train_dataset(root: str | Path, recipe: UniIRRecipe):
    """`MBEIRTrainDataset` of the union training file (or `recipe.train_file`) and the train pool."""
    from uniir_lite.data.mbeir import global_pool_path, read_pool, union_train_path
    from uniir_lite.data.torch_data import MBEIRTrainDataset
    from uniir_lite.instructions import InstructionTable

    root = Path(root).resolve()
    queries = root / recipe.train_file if recipe.train_file else union_train_path(root)
    pool = read_pool(global_pool_path(root, "train"))
    table = InstructionTable.from_root(root) if recipe.instructions else None
    return MBEIRTrainDataset(queries, pool, table, recipe.policy, recipe.seed, recipe.hard_negatives, root=root)


def training_batches(model: UniIRModel, cfg: Config, root: str | Path, recipe: UniIRRecipe) -> Iterator[dict]:
    """Endless shuffled training batches; each pass is an epoch with new positives and instructions
    (`set_epoch`), and the order comes from `recipe.seed`."""
    from uniir_lite.data.torch_data import collator_for

    dataset = train_dataset(root, recipe)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=recipe.batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers,
        collate_fn=collator_for(model, root), generator=torch.Generator().manual_seed(recipe.seed),
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
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    recipe: UniIRRecipe | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Train `model` in place with UniIR's recipe; returns the training log (step, lr, loss, accuracy, ...).

    With `checkpoint_dir`, outside the tiny profile, the run in progress is saved there every tenth
    of its steps (marked `"complete": False`); `train_or_load_uniir` writes the finished checkpoint.
    """
    from uniir_lite.train import TrainConfig, fit

    if recipe is None:
        recipe = UniIRRecipe.from_config(cfg, model.kind, instructions, policy, steps=max_steps, lr=lr,
                                         batch_size=batch_size, seed=seed, hard_negatives=hard_negatives,
                                         **overrides)
    recipe = dataclasses.replace(recipe, model=dict(model.recipe))
    every = 0 if cfg.profile == "tiny" or checkpoint_dir is None else max(1, recipe.steps // 10)
    train_cfg = TrainConfig(
        max_steps=recipe.steps, lr=recipe.lr, weight_decay=recipe.weight_decay, warmup_steps=recipe.warmup_steps,
        precision=cfg.precision, progress=progress, log_every=max(1, min(10, recipe.steps // 10)),
        checkpoint_dir=str(checkpoint_dir) if every else None, checkpoint_every=every,
        model_config={"recipe": as_json(recipe), "complete": False},
    )
    loss_fn = loss_function(model, recipe, cfg.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return fit(model, loss_fn, training_batches(model, cfg, root, recipe), train_cfg, cfg.device,
                   batch_size=recipe.batch_size)


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
    name: str | None = None,
    **overrides: Any,
) -> tuple[UniIRModel, pd.DataFrame]:
    """(model in eval mode, training log) of one setting: built with `build_uniir`, loaded from
    `cfg.checkpoint_dir / "uniir" / <name or setting>` when the recipe matches (unless `force`), else
    trained with `train_uniir` and saved there."""
    recipe = UniIRRecipe.from_config(cfg, kind, instructions, policy, seed=seed, steps=max_steps, lr=lr,
                                     batch_size=batch_size, init=init, fusion_weights=fusion_weights, **overrides)
    model = build_uniir(kind, cfg, root, init=init, **({"fusion_weights": True} if fusion_weights else {}))
    recipe = dataclasses.replace(recipe, model=dict(model.recipe))
    directory = checkpoint_path(cfg, recipe, name)
    trained = train_or_load(directory, recipe, lambda: model,
                            lambda m: train_uniir(m, cfg, root, recipe=recipe, checkpoint_dir=directory, progress=progress),
                            cfg.device, force, data=root)
    return trained.model, trained.log


def train_or_load_at_budget(kind: str, cfg: Config, root: str | Path, steps: int, instructions: bool = True,
                            policy: str = "random", **overrides: Any) -> tuple[UniIRModel, pd.DataFrame]:
    """`train_or_load_uniir` for exactly `steps` steps, the equal-budget comparison of notebook 06.
    The checkpoint goes to its own folder, `<setting>-<steps>steps`, so that the same setting trained
    at another budget (e.g. notebook 05's CLIP_SF) is never overwritten."""
    setting = UniIRRecipe.from_config(cfg, kind, instructions, policy, **overrides).setting
    return train_or_load_uniir(kind, cfg, root, instructions, policy, max_steps=steps,
                               name=f"{setting}-{steps}steps", **overrides)


__all__ = ["UniIRRecipe", "checkpoint_path", "inbatch_loss_fn", "loss_function", "train_dataset", "train_or_load_at_budget",
           "train_or_load_uniir", "train_uniir", "training_batches"]
