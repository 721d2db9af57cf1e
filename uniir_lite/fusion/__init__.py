"""The one interface of UniIR's four models (CLIP_SF, BLIP_SF, CLIP_FF, BLIP_FF) and their factory.

Taught in notebook 05 (score fusion) and 06 (feature fusion). Every model is a `UniIRModel`:

- `encode_query(side) -> [bs, d]` and `encode_candidate(side) -> [bs, d]` take ONE side of a batch
  as `uniir_lite.data.torch_data.MBEIRCollator` makes it (`txt` [bs, L] token ids, `img`
  [bs, 3, S, S], `txt_mask` [bs], `img_mask` [bs]; 0 in a mask = that modality is missing) and
  return **L2-normalised** embeddings: what is indexed, searched and fed to the losses (the losses
  normalise again, which changes nothing). Score fusion builds the unnormalised sum first, exactly
  as UniIR, then normalises; `uniir_lite.fusion.score` exposes the unnormalised parts.
- `tokenize(texts) -> [n, L]` is the tokenizer the collator must use for this model, `image_size`
  the side of its square input images.
- `logit_scale() -> []` is the multiplier of the cosine similarities in the contrastive loss
  (1 / temperature): CLIP's learned `logit_scale.exp()`, BLIP's `1 / temp`.
- `loss_kind` names the training loss of UniIR for this family: "inbatch" (CLIP models: one-way
  in-batch contrastive, `losses.inbatch_contrastive_loss`) or "momentum_queue" (BLIP models:
  `losses.MomentumQueueLoss`).
- `lr_groups()` gives learning-rate multipliers by parameter-name prefix ({} for one rate).
- `recipe` (a JSON-able dict) says what the untrained model was built from; a checkpoint is reused
  only when it is equal.

`build_uniir(kind, cfg, root)` builds any of them by name. "clip_sf" and "blip_sf" live in
`uniir_lite.fusion.score`, "clip_ff" and "blip_ff" in `uniir_lite.fusion.feature`; modules are
imported only when their kind is asked for, so one missing module does not break the others.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from uniir_lite.config import Config

Side = dict[str, Any]  # one side of an MBEIRCollator batch: ids, txt, img, txt_mask, img_mask

# kind -> "module:builder"; every builder is `builder(cfg, root, init="trained"|"random", **kwargs)`.
REGISTRY: dict[str, str] = {
    "clip_sf": "uniir_lite.fusion.score:build_clip_sf",
    "blip_sf": "uniir_lite.fusion.score:build_blip_sf",
    "clip_ff": "uniir_lite.fusion.feature:build_clip_ff",
    "blip_ff": "uniir_lite.fusion.feature:build_blip_ff",
}
PAPER_NAMES = {"clip_sf": "CLIP_SF", "blip_sf": "BLIP_SF", "clip_ff": "CLIP_FF", "blip_ff": "BLIP_FF"}
LOSS_KINDS = ("inbatch", "momentum_queue")
INITS = ("trained", "random")


class UniIRModel(nn.Module):
    """Base class of the four UniIR models; subclasses implement the two encoders.

    Attributes every subclass sets: `kind` (a key of `REGISTRY`), `loss_kind` (one of
    `LOSS_KINDS`), `tokenize` (a callable), `image_size` (int), `recipe` (dict).
    """

    kind: str = ""
    loss_kind: str = "inbatch"
    image_size: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.recipe: dict[str, Any] = {}

    def tokenize(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_query(self, side: Side) -> torch.Tensor:  # pragma: no cover - abstract
        """L2-normalised query embeddings [bs, d] (queries carry the instruction in their text)."""
        raise NotImplementedError

    def encode_candidate(self, side: Side) -> torch.Tensor:  # pragma: no cover - abstract
        """L2-normalised candidate embeddings [bs, d]."""
        raise NotImplementedError

    def logit_scale(self) -> torch.Tensor:  # pragma: no cover - abstract
        """1 / temperature, a scalar tensor that carries gradient when it is learned."""
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def lr_groups(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name prefix (e.g. CLIP_FF's T5 mixer); {} = one
        learning rate for every parameter, as the score-fusion models."""
        return {}


def register(kind: str, target: str) -> None:
    """Add a model kind: `target` is "module:builder" (imported when the kind is first built)."""
    REGISTRY[kind] = target


def builder(kind: str) -> Callable[..., UniIRModel]:
    if kind not in REGISTRY:
        raise ValueError(f"unknown UniIR model {kind!r}; choose one of {', '.join(REGISTRY)}")
    module, name = REGISTRY[kind].split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"UniIR model {kind!r} needs {REGISTRY[kind]}, which cannot be imported: {e}") from e


def build_uniir(kind: str, cfg: Config, root: str | Path, init: str = "trained", **kwargs: Any) -> UniIRModel:
    """An untrained-for-UniIR model of `kind` ("clip_sf", "blip_sf", "clip_ff", "blip_ff").

    `init="trained"` starts from the towers of the earlier notebooks (CLIP of notebook 01, BLIP of
    notebook 02, trained or loaded; in the `full` profile the pretrained OpenAI / Salesforce
    weights), as UniIR fine-tunes pretrained CLIP and BLIP. `init="random"` builds the same
    architecture with random weights. Extra `kwargs` go to the kind's builder (e.g.
    `fusion_weights=True` for the score-fusion models).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    model = builder(kind)(cfg, root, init=init, **kwargs)
    if not isinstance(model, UniIRModel):
        raise TypeError(f"builder of {kind!r} returned {type(model).__name__}, not a UniIRModel")
    if model.loss_kind not in LOSS_KINDS:
        raise ValueError(f"{kind}: loss_kind {model.loss_kind!r} is not one of {LOSS_KINDS}")
    return model


__all__ = ["INITS", "LOSS_KINDS", "PAPER_NAMES", "REGISTRY", "Side", "UniIRModel", "build_uniir", "builder", "register"]
