"""Training BLIP-2's two stages in notebook 03: the Q-Former's stage 1 (ITC + ITM + ITG over the
frozen image features of notebook 01's CLIP), the small caption LM that stage 2 keeps frozen, and
stage 2 (the Q-Former's queries as soft prompts of that LM). Each `train_or_load_*` saves under
`cfg.checkpoint_dir / "03_blip2_qformer" / <stage>`. Taught in notebook 03."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from uniir_lite.checkpoints import as_json, saved_log, train_or_load
from uniir_lite.config import Config
from uniir_lite.models.blip2 import (
    Blip2Captioner,
    Blip2Stage1,
    CaptionTokenizer,
    FrozenImageEncoder,
    QFormerCaptionData,
    build_caption_lm,
    caption_data,
    captioner_loss_fn,
    grouped_caption_order,
    lm_loss_fn,
    packed_lm_blocks,
    stage1_loss,
)
from uniir_lite.models.clip import image_token_width
from uniir_lite.models.qformer import QFormerConfig
from uniir_lite.recipes.clip import clip_fingerprint, train_or_load_clip
from uniir_lite.train import TrainConfig, fit

CHECKPOINT_NAME = "03_blip2_qformer"


@dataclasses.dataclass
class Stage1Recipe:
    """What a stage-1 run depends on; a checkpoint is reused only if its recipe is equal."""

    steps: int
    batch_size: int
    seed: int
    hidden_size: int = 64
    num_layers: int = 2
    intermediate_size: int = 128  # BERT's is 4x the width; 2x costs less and trains as well here
    num_query_tokens: int = 8
    # BLIP-2 reads the image in every other of its 12 layers; with 2 layers that would be one read,
    # before the queries have seen the text. Here both layers read the image (notebook 03 measures ITM).
    cross_attention_frequency: int = 1
    embed_dim: int = 64
    initializer_range: float = 0.125  # 1/sqrt(width); see `QFormerConfig.initializer_range`
    lr: float = 3e-3
    warmup_steps: int = 10

    @classmethod
    def from_config(cls, cfg: Config, **overrides: Any) -> "Stage1Recipe":
        base = dict(steps=2 * cfg.max_steps // 3, batch_size=max(2, cfg.batch_size // 2), seed=cfg.seed, embed_dim=cfg.embed_dim)
        if cfg.profile != "tiny":  # BLIP-2's Q-Former shape: BERT-base, 32 queries, 256-d ITC space, BERT's init
            base.update(hidden_size=768, num_layers=12, cross_attention_frequency=2, intermediate_size=3072, num_query_tokens=32, embed_dim=256, initializer_range=0.02,
                        lr=1e-4, warmup_steps=min(2000, cfg.max_steps // 10), steps=cfg.max_steps, batch_size=cfg.batch_size)
        return cls(**{**base, **overrides})

    def qformer_config(self, vocab_size: int, encoder_hidden_size: int) -> QFormerConfig:
        return QFormerConfig(
            vocab_size=vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=4 if self.hidden_size < 768 else 12,
            intermediate_size=self.intermediate_size, num_query_tokens=self.num_query_tokens,
            cross_attention_frequency=self.cross_attention_frequency, encoder_hidden_size=encoder_hidden_size,
            embed_dim=self.embed_dim, initializer_range=self.initializer_range,
        )


def _directory(cfg: Config, stage: str) -> Path:
    return cfg.checkpoint_dir / CHECKPOINT_NAME / stage


def training_log(cfg: Config, stage: str) -> pd.DataFrame:
    """The training log saved with a checkpoint: stage "stage1", "lm" or "stage2"."""
    return saved_log(_directory(cfg, stage))


def frozen_encoder(cfg: Config, root: str | Path) -> FrozenImageEncoder:
    """The vision tower of notebook 01's CLIP (trained there, or loaded), frozen."""
    clip, _ = train_or_load_clip(cfg, root)
    return FrozenImageEncoder(clip.visual)


def caption_tokenizer(root: str | Path) -> CaptionTokenizer:
    """The caption vocabulary of the training captions (deterministic: the same files, the same ids)."""
    from uniir_lite.data.pairs import image_caption_pairs

    return CaptionTokenizer.from_texts([p.caption for p in image_caption_pairs(root, "train")])


def init_stage1(cfg: Config, tokenizer: CaptionTokenizer, encoder_width: int) -> Blip2Stage1:
    """The untrained stage-1 model that `train_or_load_qformer` starts from (same seed, same weights)."""
    recipe = Stage1Recipe.from_config(cfg)
    torch.manual_seed(recipe.seed)
    return Blip2Stage1(recipe.qformer_config(tokenizer.vocab_size, encoder_width)).to(cfg.device)


def _stage1_key(cfg: Config, tokenizer: CaptionTokenizer) -> dict[str, Any]:
    """What a stage-1 model depends on: its recipe, the caption vocabulary and the frozen encoder."""
    return {"stage1": as_json(Stage1Recipe.from_config(cfg)), "tokenizer": tokenizer.config(), "encoder": clip_fingerprint(cfg)}


def train_or_load_qformer(cfg: Config, root: str | Path, data: QFormerCaptionData | None = None,
                          tokenizer: CaptionTokenizer | None = None, progress: bool = False, force: bool = False):
    """(stage-1 model in eval mode, tokenizer): loads `cfg.checkpoint_dir/03_blip2_qformer/stage1` when
    it holds a model of the same recipe, vocabulary and image encoder, else trains one with ITC + ITM +
    ITG on the training pairs (frozen image features of notebook 01's CLIP) and saves it there."""
    tokenizer = tokenizer or caption_tokenizer(root)
    recipe = Stage1Recipe.from_config(cfg)

    def train(model: Blip2Stage1) -> pd.DataFrame:
        pairs = data or caption_data(root, "train", tokenizer, frozen_encoder(cfg, root), cfg.image_size)
        return fit(model, lambda m, b: stage1_loss(m, b, tokenizer.dec_id), pairs.batches(recipe.batch_size, recipe.seed),
                   TrainConfig(max_steps=recipe.steps, lr=recipe.lr, weight_decay=0.05, warmup_steps=recipe.warmup_steps,
                               precision=cfg.precision, progress=progress), cfg.device)

    trained = train_or_load(_directory(cfg, "stage1"), _stage1_key(cfg, tokenizer),
                            lambda: init_stage1(cfg, tokenizer, image_token_width(cfg)), train, cfg.device, force, data=root)
    return trained.model, tokenizer


@dataclasses.dataclass
class LMRecipe:
    steps: int
    batch_size: int
    seed: int
    block: int = 48
    hidden_size: int = 64
    num_layers: int = 2
    lr: float = 6e-3

    @classmethod
    def from_config(cls, cfg: Config, **overrides: Any) -> "LMRecipe":
        return cls(**{**dict(steps=cfg.max_steps, batch_size=max(2, cfg.batch_size // 2), seed=cfg.seed), **overrides})


class _Blocks:
    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int):
        self.blocks, self.batch_size = blocks, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.blocks), generator=self.generator)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            yield {"input_ids": self.blocks[order[start : start + self.batch_size]]}


def train_or_load_caption_lm(cfg: Config, root: str | Path, tokenizer: CaptionTokenizer | None = None,
                             progress: bool = False, force: bool = False):
    """The small causal LM that stage 2 keeps frozen, pre-trained on the training captions' TEXT only
    (no image ever): loaded from `.../03_blip2_qformer/lm` or trained and saved there. Eval mode, frozen."""
    from uniir_lite.data.pairs import image_caption_pairs

    tokenizer = tokenizer or caption_tokenizer(root)
    recipe = LMRecipe.from_config(cfg)

    def build() -> nn.Module:
        torch.manual_seed(recipe.seed)
        return build_caption_lm(tokenizer, recipe.hidden_size, recipe.num_layers)

    def train(lm: nn.Module) -> pd.DataFrame:
        pairs = image_caption_pairs(root, "train")
        ids, mask = tokenizer([p.caption for p in pairs])
        blocks = packed_lm_blocks(ids, mask, recipe.block, grouped_caption_order([p.img_path for p in pairs], recipe.seed))
        return fit(lm, lm_loss_fn, _Blocks(blocks, recipe.batch_size, recipe.seed),
                   TrainConfig(max_steps=recipe.steps, lr=recipe.lr, weight_decay=0.05, warmup_steps=10,
                               precision=cfg.precision, progress=progress), cfg.device)

    key = {"lm": as_json(recipe), "tokenizer": tokenizer.config()}
    return train_or_load(_directory(cfg, "lm"), key, build, train, cfg.device, force, data=root).model.requires_grad_(False)


@dataclasses.dataclass
class Stage2Recipe:
    steps: int
    batch_size: int
    seed: int
    lr: float = 3e-3

    @classmethod
    def from_config(cls, cfg: Config, **overrides: Any) -> "Stage2Recipe":
        return cls(**{**dict(steps=cfg.max_steps // 2, batch_size=cfg.batch_size, seed=cfg.seed), **overrides})


def new_captioner(stage1: Blip2Stage1, lm: nn.Module, seed: int) -> Blip2Captioner:
    """Stage 2's starting point: a COPY of the stage-1 Q-Former, a fresh projection, the frozen LM."""
    import copy

    torch.manual_seed(seed)
    return Blip2Captioner(copy.deepcopy(stage1.qformer), lm)


def train_or_load_captioner(cfg: Config, root: str | Path, stage1: Blip2Stage1, lm: nn.Module,
                            data: QFormerCaptionData | None = None, tokenizer: CaptionTokenizer | None = None,
                            progress: bool = False, force: bool = False) -> Blip2Captioner:
    """Stage 2: loaded from `.../03_blip2_qformer/stage2`, or trained from `new_captioner(stage1, lm)` with
    the caption LM loss (only the Q-Former and the projection learn) and saved there. Eval mode.
    Its recipe includes those of the profile's stage 1 and LM, which `stage1` and `lm` are taken to be."""
    tokenizer = tokenizer or caption_tokenizer(root)
    recipe = Stage2Recipe.from_config(cfg)

    def train(model: Blip2Captioner) -> pd.DataFrame:
        pairs = data or caption_data(root, "train", tokenizer, frozen_encoder(cfg, root), cfg.image_size)
        return fit(model, captioner_loss_fn, pairs.batches(recipe.batch_size, recipe.seed + 1),
                   TrainConfig(max_steps=recipe.steps, lr=recipe.lr, weight_decay=0.05, warmup_steps=10,
                               precision=cfg.precision, progress=progress), cfg.device)

    key = {"stage2": as_json(recipe), "lm": as_json(LMRecipe.from_config(cfg)), **_stage1_key(cfg, tokenizer)}
    return train_or_load(_directory(cfg, "stage2"), key, lambda: new_captioner(stage1, lm, recipe.seed), train,
                         cfg.device, force, data=root).model
