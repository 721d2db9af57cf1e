"""CLIP through open_clip: one builder for every profile, the contrastive loss, train-or-load, embedding.

- `tiny`: a tiny open_clip custom config (`configs/uniir-clip-tiny.json`: ViT and text transformer of
  width 64, 2 layers, 32-px images, context 32, the real 49408-token BPE), random init, built offline.
- `gpu`: a real-size architecture (`ViT-B-32` by default, or `ViT-L-14`), random init.
- `full` (`cfg.pretrained`): OpenAI's weights through open_clip (`pretrained="openai"`).

`pretrained=<folder>` loads a model written by `save_clip_pretrained` (open_clip's `local-dir:` layout),
which is how the pretrained path is tested offline. Taught in notebook 01; notebooks 03-05 call
`train_or_load_clip` for a trained image encoder and text tower.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from uniir_lite.checkpoints import has_checkpoint, load_checkpoint, save_checkpoint
from uniir_lite.config import Config
from uniir_lite.models.tokenizers import ClipTokenizer

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_ARCH = "uniir-clip-tiny"
DEFAULT_ARCH = "ViT-B-32"
CHECKPOINT_NAME = "01_clip"
OPENAI_WEIGHTS = "openai"
MAX_LOGIT_SCALE = 100.0  # CLIP clips the learned scale at 100 (temperature 0.01)
INIT_TEMPERATURE = 0.07  # CLIP's initial temperature: logit scale 1 / 0.07
OPENAI_DOWNLOAD_MB = {"ViT-B-32": 350, "ViT-B-16": 350, "ViT-L-14": 900}


@lru_cache(maxsize=1)
def register_configs() -> Path:
    """Make the kit's open_clip configs (`uniir_lite/models/configs/*.json`) known to open_clip."""
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    return CONFIG_DIR


@contextlib.contextmanager
def _quiet_random_init():
    """open_clip logs a root-logger warning for every model built without weights; random init is
    what the tiny and gpu profiles ask for, so that warning would only clutter the notebooks."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def default_arch(cfg: Config) -> str:
    """The `tiny` profile gets the tiny config; `gpu` and `full` get ViT-B/32 unless told otherwise."""
    return TINY_ARCH if cfg.profile == "tiny" else DEFAULT_ARCH


def build_clip(cfg: Config, arch: str | None = None, pretrained: str | Path | None = None):
    """(model, tokenizer) for the profile of `cfg`, in eval mode on `cfg.device`.

    `pretrained=None` follows the profile: OpenAI weights when `cfg.pretrained`, else random init with
    `embed_dim = cfg.embed_dim` and `image_size = cfg.image_size`. `pretrained` may also be an open_clip
    tag ("openai"), a weights file for `arch`, or a folder written by `save_clip_pretrained`.
    """
    import open_clip

    register_configs()
    arch = arch or default_arch(cfg)
    if pretrained is None and cfg.pretrained:
        pretrained = OPENAI_WEIGHTS
    if pretrained is not None and Path(pretrained).is_dir():
        name, kwargs = f"local-dir:{Path(pretrained).resolve()}", {}
        model_cfg = open_clip.get_model_config(name)
    elif pretrained is not None:
        # OpenAI's CLIP was trained with QuickGELU; open_clip's plain configs use nn.GELU
        quick_gelu = str(pretrained) == OPENAI_WEIGHTS
        name, kwargs = arch, {"pretrained": str(pretrained), "force_quick_gelu": quick_gelu, "require_pretrained": True}
        model_cfg = {**open_clip.get_model_config(arch), **({"quick_gelu": True} if quick_gelu else {})}
    else:
        name = arch
        kwargs = {"embed_dim": cfg.embed_dim, "force_image_size": cfg.image_size}
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise ValueError(f"unknown CLIP architecture {arch!r}; open_clip knows {', '.join(open_clip.list_models()[:8])}, ...")
        model_cfg["embed_dim"] = cfg.embed_dim
        model_cfg["vision_cfg"]["image_size"] = cfg.image_size
    try:
        with _quiet_random_init() if pretrained is None else contextlib.nullcontext():
            model = open_clip.create_model(name, device=cfg.device, **kwargs)
    except RuntimeError as e:
        if str(pretrained) != OPENAI_WEIGHTS:
            raise
        size = OPENAI_DOWNLOAD_MB.get(arch, "several hundred")
        raise RuntimeError(
            f"OpenAI's {arch} CLIP weights are neither cached nor downloadable here ({e}). Fetch them once "
            f"on a machine with internet (about {size} MB) with: python -c \"import open_clip; "
            f"open_clip.create_model('{arch}', pretrained='openai')\""
        ) from e
    model.uniir_model_cfg = model_cfg  # what `save_clip_pretrained` writes next to the weights
    tokenizer = ClipTokenizer(context_length=model.context_length)
    return model.eval(), tokenizer


def save_clip_pretrained(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write `model` in open_clip's `local-dir:` layout (config JSON + safetensors), the counterpart of
    transformers' `save_pretrained`; `build_clip(cfg, pretrained=directory)` loads it back."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model.uniir_model_cfg, "preprocess_cfg": dict(getattr(model.visual, "preprocess_cfg", {}))}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, directory / "open_clip_model.safetensors")
    return directory


def clip_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of matching (image, text) pairs.

    `logit_scale` is the multiplier 1/temperature (open_clip's `model.logit_scale.exp()`). Embeddings
    are L2-normalised here, so raw tower outputs can be passed. Row i of each side is a positive pair;
    every other row of the batch is a negative.
    """
    img_emb = F.normalize(img_emb, dim=-1)  # [n, d]
    txt_emb = F.normalize(txt_emb, dim=-1)  # [n, d]
    logits = logit_scale * img_emb @ txt_emb.T  # [n, n]: image i vs text j
    labels = torch.arange(logits.shape[0], device=logits.device)  # [n]
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss function `uniir_lite.train.fit` calls: {"image": [n,3,S,S], "text": [n,L]} -> loss and logs."""
    img_emb = model.encode_image(batch["image"])  # [n, d]
    txt_emb = model.encode_text(batch["text"])  # [n, d]
    logit_scale = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)  # []
    loss = clip_loss(img_emb, txt_emb, logit_scale)
    with torch.no_grad():
        sim = F.normalize(img_emb, dim=-1) @ F.normalize(txt_emb, dim=-1).T  # [n, n]
        accuracy = (sim.argmax(dim=1) == torch.arange(sim.shape[0], device=sim.device)).float().mean()
    return {"loss": loss, "logit_scale": logit_scale.detach(), "batch_i2t_acc": accuracy}


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


def train_clip(cfg: Config, root: str | Path, recipe: ClipRecipe | None = None, progress: bool = False,
               pairs=None, loader=None):
    """Train a randomly initialised CLIP on the image-caption training pairs with `uniir_lite.train.fit`.

    Returns (model in eval mode, tokenizer, training log). With `recipe.fixed_temperature` the logit
    scale is frozen at 1 / temperature; otherwise it is learned, as in CLIP. `pairs` (default: the
    training pairs of `root`) and `loader` (an `ImageLoader` at `recipe.image_size`) can be passed to
    reuse them across runs.
    """
    from uniir_lite.data.images import ImageLoader
    from uniir_lite.data.pairs import image_caption_pairs
    from uniir_lite.train import TrainConfig, fit

    recipe = recipe or ClipRecipe.from_config(cfg)
    torch.manual_seed(recipe.seed)
    model, tokenizer = build_clip(dataclasses.replace(cfg, embed_dim=recipe.embed_dim, image_size=recipe.image_size, pretrained=False),
                                  arch=recipe.arch, pretrained=None)
    if recipe.fixed_temperature is not None:
        with torch.no_grad():
            model.logit_scale.fill_(torch.log(torch.tensor(1.0 / recipe.fixed_temperature)).item())
        model.logit_scale.requires_grad_(False)
    loader = loader or ImageLoader(root, recipe.image_size)
    if loader.image_size != recipe.image_size:
        raise ValueError(f"the image loader makes {loader.image_size}-px images, the recipe wants {recipe.image_size}")
    pairs = image_caption_pairs(root, "train") if pairs is None else pairs
    batches = pair_batches(pairs, loader, tokenizer, recipe.batch_size, recipe.seed, cfg.num_workers)
    warmup = recipe.steps // 10 if recipe.warmup_steps is None else recipe.warmup_steps
    train_cfg = TrainConfig(max_steps=recipe.steps, lr=recipe.lr, warmup_steps=warmup,
                            precision=cfg.precision, progress=progress)
    history = fit(model, clip_loss_fn, batches, train_cfg, cfg.device)
    return model.eval(), tokenizer, history


def clip_checkpoint_dir(cfg: Config) -> Path:
    return cfg.checkpoint_dir / CHECKPOINT_NAME


def train_or_load_clip(cfg: Config, root: str | Path, progress: bool = False):
    """(model, tokenizer) of the CLIP trained in notebook 01, in eval mode on `cfg.device`.

    Loads `cfg.checkpoint_dir / "01_clip"` when it holds a model of the same recipe, else trains one
    (`train_clip`) and saves it there. With `cfg.pretrained` (the `full` profile) OpenAI's CLIP is
    already trained: it is returned as is.
    """
    if cfg.pretrained:
        return build_clip(cfg)
    recipe = ClipRecipe.from_config(cfg)
    directory = clip_checkpoint_dir(cfg)
    if has_checkpoint(directory):
        state, saved = load_checkpoint(directory)
        if saved.get("recipe") == dataclasses.asdict(recipe):
            model, tokenizer = build_clip(cfg, arch=recipe.arch)
            model.load_state_dict(state)
            return model.to(cfg.device).eval(), tokenizer
    model, tokenizer, history = train_clip(cfg, root, recipe, progress=progress)
    save_checkpoint(directory, model, {"recipe": dataclasses.asdict(recipe), "model_cfg": model.uniir_model_cfg,
                                       "history": history.to_dict(orient="records")})
    return model, tokenizer


def clip_training_log(cfg: Config) -> pd.DataFrame:
    """The training log saved with the `train_or_load_clip` checkpoint (step, lr, loss, logit_scale, ...)."""
    _, saved = load_checkpoint(clip_checkpoint_dir(cfg))
    return pd.DataFrame(saved["history"])


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model: torch.nn.Module, loader, paths: Sequence[str], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
    """[n, embed_dim] image embeddings (L2-normalised unless `normalize=False`), on the CPU."""
    device, out = _device_of(model), []
    for i in range(0, len(paths), batch_size):
        images = torch.stack([loader(p) for p in paths[i : i + batch_size]]).to(device)  # [b, 3, S, S]
        out.append(model.encode_image(images, normalize=normalize).float().cpu())  # [b, d]
    return torch.cat(out) if out else torch.empty(0, model.uniir_model_cfg["embed_dim"])


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer: ClipTokenizer, texts: Sequence[str], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
    """[n, embed_dim] text embeddings (L2-normalised unless `normalize=False`), on the CPU."""
    device, out = _device_of(model), []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i : i + batch_size])).to(device)  # [b, L]
        out.append(model.encode_text(tokens, normalize=normalize).float().cpu())  # [b, d]
    return torch.cat(out) if out else torch.empty(0, model.uniir_model_cfg["embed_dim"])
