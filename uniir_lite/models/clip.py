"""CLIP through open_clip: one builder for every profile, the contrastive loss, embedding.

- `tiny`: a tiny open_clip custom config (`configs/uniir-clip-tiny.json`: ViT and text transformer of
  width 64, 2 layers, 32-px images, context 32, the real 49408-token BPE), random init, built offline.
- `gpu`: a real-size architecture (`ViT-B-32` by default, or `ViT-L-14`), random init.
- `full` (`cfg.pretrained`): OpenAI's weights through open_clip (`pretrained="openai"`).

`pretrained=<folder>` loads a model written by `save_clip_pretrained` (open_clip's `local-dir:` layout),
which is how the pretrained path is tested offline. Training is in `uniir_lite.recipes.clip`.
Taught in notebook 01.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from uniir_lite.config import Config
from uniir_lite.models.tokenizers import ClipTokenizer

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_ARCH = "uniir-clip-tiny"
DEFAULT_ARCH = "ViT-B-32"
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


def image_token_width(cfg: Config, arch: str | None = None) -> int:
    """Width of the tokens of `build_clip(cfg, arch)`'s ViT, read from its open_clip config (nothing is built)."""
    import open_clip

    register_configs()
    return int(open_clip.get_model_config(arch or default_arch(cfg))["vision_cfg"]["width"])


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
