"""Training the CLIP of notebook 01: its recipe, `train_clip`, and `train_or_load_clip`, which
notebooks 02-07 call for a trained image encoder and text tower. Taught in notebook 01."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from uniir_lite.checkpoints import saved_log, train_or_load
from uniir_lite.config import Config
from uniir_lite.models.clip import build_clip, clip_loss_fn, default_arch
from uniir_lite.models.tokenizers import ClipTokenizer

CHECKPOINT_NAME = "01_clip"


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, img_paths: Sequence[str], tokens: torch.Tensor, loader):
        self.img_paths, self.tokens, self.loader = list(img_paths), tokens, loader

    def __len__(self) -> int:
        return len(self.img_paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.loader(self.img_paths[i]), "text": self.tokens[i]}


def pair_batches(pairs, loader, tokenizer: ClipTokenizer, batch_size: int, seed: int, num_workers: int = 0):
    """Shuffled batches {"image": [b,3,S,S], "text": [b,L]} of image-caption pairs; each pass over the
    DataLoader is one epoch in a new, seeded order. Captions are tokenised once, up front."""
    tokens = tokenizer([p.caption for p in pairs])  # [n, L]
    dataset = _PairDataset([p.img_path for p in pairs], tokens, loader)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed), persistent_workers=num_workers > 0,
    )


@dataclasses.dataclass
class ClipRecipe:
    """What a tiny CLIP training run depends on; a checkpoint is reused only if its recipe is equal."""

    arch: str
    embed_dim: int
    image_size: int
    steps: int
    batch_size: int
    seed: int
    lr: float = 2e-3
    warmup_steps: int | None = None  # None: the first tenth of the steps
    fixed_temperature: float | None = None  # None: learnable, starting at INIT_TEMPERATURE

    @classmethod
    def from_config(cls, cfg: Config, **overrides: Any) -> ClipRecipe:
        # The tiny profile trains for half of MAX_STEPS: every notebook that needs this CLIP and
        # finds no checkpoint trains it first, and must still finish in about a minute.
        steps = cfg.max_steps // 2 if cfg.profile == "tiny" else cfg.max_steps
        base = {"arch": default_arch(cfg), "embed_dim": cfg.embed_dim, "image_size": cfg.image_size,
                "steps": steps, "batch_size": cfg.batch_size, "seed": cfg.seed}
        if cfg.profile != "tiny":  # real-size towers: CLIP's learning rate and warm-up
            base.update(lr=5e-4, warmup_steps=min(2000, steps // 10))
        return cls(**{**base, **overrides})


def init_clip(cfg: Config, recipe: ClipRecipe) -> tuple[torch.nn.Module, ClipTokenizer]:
    """(model, tokenizer): the randomly initialised CLIP of `recipe` (seeded: the same recipe, the same
    weights), its logit scale frozen at 1 / temperature when `recipe.fixed_temperature` is set."""
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(recipe.seed)
        model, tokenizer = build_clip(dataclasses.replace(cfg, embed_dim=recipe.embed_dim, image_size=recipe.image_size,
                                                          pretrained=False), arch=recipe.arch, pretrained=None)
    if recipe.fixed_temperature is not None:
        with torch.no_grad():
            model.logit_scale.fill_(torch.log(torch.tensor(1.0 / recipe.fixed_temperature)).item())
        model.logit_scale.requires_grad_(False)
    return model, tokenizer


def fit_clip(model: torch.nn.Module, tokenizer: ClipTokenizer, cfg: Config, root: str | Path, recipe: ClipRecipe,
             progress: bool = False, pairs=None, loader=None, log_every: int | None = None) -> pd.DataFrame:
    """Train `model` in place on the image-caption training pairs with `uniir_lite.train.fit`; the log,
    one row per `log_every` steps (default: `TrainConfig`'s; 1 logs every step, as notebook 01's short
    temperature runs do). Logging does not change the training, so it is not part of the recipe."""
    from uniir_lite.data.images import ImageLoader
    from uniir_lite.data.pairs import image_caption_pairs
    from uniir_lite.train import TrainConfig, fit

    loader = loader or ImageLoader(root, recipe.image_size)
    if loader.image_size != recipe.image_size:
        raise ValueError(f"the image loader makes {loader.image_size}-px images, the recipe wants {recipe.image_size}")
    pairs = image_caption_pairs(root, "train") if pairs is None else pairs
    batches = pair_batches(pairs, loader, tokenizer, recipe.batch_size, recipe.seed, cfg.num_workers)
    warmup = recipe.steps // 10 if recipe.warmup_steps is None else recipe.warmup_steps
    logging = {} if log_every is None else {"log_every": log_every}
    train_cfg = TrainConfig(max_steps=recipe.steps, lr=recipe.lr, warmup_steps=warmup,
                            precision=cfg.precision, progress=progress, **logging)
    return fit(model, clip_loss_fn, batches, train_cfg, cfg.device)


def train_clip(cfg: Config, root: str | Path, recipe: ClipRecipe | None = None, progress: bool = False,
               pairs=None, loader=None, log_every: int | None = None):
    """Train a randomly initialised CLIP (`init_clip`, then `fit_clip`): (model in eval mode, tokenizer,
    training log). With `recipe.fixed_temperature` the logit scale stays at 1 / temperature; otherwise
    it is learned, as in CLIP. `pairs` (default: the training pairs of `root`) and `loader` (an
    `ImageLoader` at `recipe.image_size`) can be passed to reuse them across runs; `log_every` as in
    `fit_clip`."""
    recipe = recipe or ClipRecipe.from_config(cfg)
    model, tokenizer = init_clip(cfg, recipe)
    log = fit_clip(model, tokenizer, cfg, root, recipe, progress, pairs, loader, log_every)
    return model.eval(), tokenizer, log


def clip_checkpoint_dir(cfg: Config) -> Path:
    return cfg.checkpoint_dir / CHECKPOINT_NAME


def train_or_load_clip(cfg: Config, root: str | Path, progress: bool = False, force: bool = False):
    """(model, tokenizer) of the CLIP trained in notebook 01, in eval mode on `cfg.device`.

    Loads `cfg.checkpoint_dir / "01_clip"` when it holds a model of the same recipe (unless `force`),
    else trains one (`init_clip`, `fit_clip`) and saves it there. With `cfg.pretrained` (the `full`
    profile) OpenAI's CLIP is already trained: it is returned as is.
    """
    if cfg.pretrained:
        return build_clip(cfg)
    recipe = ClipRecipe.from_config(cfg)
    model, tokenizer = init_clip(cfg, recipe)
    trained = train_or_load(clip_checkpoint_dir(cfg), recipe, lambda: model,
                            lambda m: fit_clip(m, tokenizer, cfg, root, recipe, progress), cfg.device, force,
                            extra=lambda m: {"model_cfg": m.uniir_model_cfg}, data=root)
    return trained.model, tokenizer


def clip_training_log(cfg: Config) -> pd.DataFrame:
    """The training log saved with the `train_or_load_clip` checkpoint (step, lr, loss, logit_scale, ...)."""
    return saved_log(clip_checkpoint_dir(cfg))


def clip_fingerprint(cfg: Config) -> Any:
    """What identifies `train_or_load_clip(cfg)`'s model: its recipe, or "openai" for the pretrained one.
    Recipes of models built on top of this CLIP include it, so they are retrained when it changes."""
    return "openai" if cfg.pretrained else dataclasses.asdict(ClipRecipe.from_config(cfg))
