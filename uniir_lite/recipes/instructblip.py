"""Training the instruction-aware and instruction-blind Q-Former pair of notebook 04 on the held-in
tasks, over the frozen vision tower of notebook 01's CLIP. Taught in notebook 04."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from uniir_lite.checkpoints import train_or_load
from uniir_lite.config import Config
from uniir_lite.models.clip import image_token_width
from uniir_lite.models.instructblip import (
    HELD_IN,
    TRAIN_TEMPLATES,
    ExampleBatches,
    Examples,
    InstructVQA,
    encode_image_tokens,
    make_examples,
    qformer_config,
    scene_images,
    vqa_loss_fn,
)
from uniir_lite.recipes.clip import clip_fingerprint, train_or_load_clip
from uniir_lite.train import TrainConfig, fit

CHECKPOINT_NAME = "04_instructblip"


@dataclasses.dataclass
class InstructRecipe:
    """What a training run of the two Q-Former variants depends on; a checkpoint is reused only if
    its recipe is equal (the image encoder's own recipe included)."""

    profile: str
    num_query_tokens: int
    head_width: int
    steps: int
    batch_size: int
    seed: int
    lr: float
    encoder: dict
    freeze_word_embeddings: bool = False
    tasks: tuple[str, ...] = HELD_IN
    templates: tuple[int, ...] = TRAIN_TEMPLATES  # the fourth wording of every task stays unseen

    @classmethod
    def from_config(cls, cfg: Config, encoder: dict | None = None, **overrides: Any) -> "InstructRecipe":
        tiny = cfg.profile == "tiny"
        # tiny: half the profile's steps on batches twice its size (as many examples as
        # MAX_STEPS x BATCH_SIZE, with half the per-step overhead)
        base = dict(profile=cfg.profile, num_query_tokens=8 if tiny else 32, head_width=64 if tiny else 256,
                    steps=cfg.max_steps // 2 if tiny else min(cfg.max_steps, 3000),
                    batch_size=2 * cfg.batch_size if tiny else cfg.batch_size,
                    seed=cfg.seed, lr=4e-3 if tiny else 3e-4, encoder=encoder or {}, freeze_word_embeddings=tiny)
        return cls(**{**base, **overrides})


def encoder_fingerprint(cfg: Config) -> dict:
    """What identifies the frozen image encoder: CLIP's recipe (or its pretrained tag)."""
    return {"clip": clip_fingerprint(cfg)}


def build_vqa_pair(recipe: InstructRecipe, encoder_hidden_size: int) -> nn.ModuleDict:
    """The two variants, `{"aware": ..., "blind": ...}`, identically initialised except for the flag."""
    qcfg = qformer_config(recipe.profile, encoder_hidden_size)
    models = {}
    for name, aware in (("aware", True), ("blind", False)):
        torch.manual_seed(recipe.seed)
        models[name] = InstructVQA(qcfg, recipe.num_query_tokens, recipe.head_width, instruction_aware=aware)
        if recipe.freeze_word_embeddings:
            # The Q-Former's word vectors stay at their (random) start, standing in for BERT's
            # pre-trained ones; this also spares the optimiser a 30522-row table, most of its parameters.
            models[name].qformer.qformer.embeddings.word_embeddings.weight.requires_grad_(False)
    return nn.ModuleDict(models)


def fit_vqa_pair(models: nn.ModuleDict, cfg: Config, recipe: InstructRecipe, examples: Examples,
                 image_embeds: torch.Tensor, progress: bool = False) -> dict[str, pd.DataFrame]:
    """Train both variants in place on the same batches, in the same order, with `uniir_lite.train.fit`."""
    histories = {}
    for name, model in models.items():
        batches = ExampleBatches(examples, image_embeds, recipe.batch_size, recipe.seed)
        train_cfg = TrainConfig(max_steps=recipe.steps, lr=recipe.lr, weight_decay=0.05, warmup_steps=recipe.steps // 20,
                                precision=cfg.precision, progress=progress)
        histories[name] = fit(model, vqa_loss_fn, batches, train_cfg, cfg.device)
    return histories


def instructblip_checkpoint_dir(cfg: Config) -> Path:
    return cfg.checkpoint_dir / CHECKPOINT_NAME


def train_or_load_instructblip(cfg: Config, root: str | Path, progress: bool = False, force: bool = False,
                               **overrides: Any):
    """`(models, histories)`: the instruction-aware and instruction-blind Q-Former + answer head pair
    (`models["aware"]`, `models["blind"]`, in eval mode on `cfg.device`) trained on the held-in tasks
    over the frozen vision tower of `train_or_load_clip`, and their training logs.

    Loads `cfg.checkpoint_dir / "04_instructblip"` when it holds a pair of the same recipe (unless
    `force`), else trains one and saves it there. `overrides` change the recipe (`InstructRecipe`
    fields), e.g. `num_query_tokens=2` or `tasks=("colour", "position")`."""
    from uniir_lite.data.images import ImageLoader

    recipe = InstructRecipe.from_config(cfg, encoder=encoder_fingerprint(cfg), **overrides)

    def train(models: nn.ModuleDict) -> dict[str, pd.DataFrame]:
        clip_model, _ = train_or_load_clip(cfg, root)
        scenes = scene_images(root, "train")
        loader = ImageLoader(root, cfg.image_size, cache=False)
        image_embeds = encode_image_tokens(clip_model.visual, loader, [p for p, _ in scenes])  # [n, T, width]
        examples = make_examples(scenes, recipe.tasks, recipe.seed, templates=recipe.templates)
        return fit_vqa_pair(models, cfg, recipe, examples, image_embeds.to(cfg.device), progress=progress)

    trained = train_or_load(instructblip_checkpoint_dir(cfg), recipe, lambda: build_vqa_pair(recipe, image_token_width(cfg)),
                            train, cfg.device, force, data=root)
    return trained.model, trained.log
