"""Feature fusion: UniIR's CLIP_FF and BLIP_FF. Taught in notebook 06.

Score fusion (notebook 05) embeds a query's image and text separately and adds the two vectors, so
the two modalities meet only in the final dot product. *Feature fusion* lets them interact before
pooling:

- **CLIP_FF** (UniIR `clip_featurefusion/clip_ff.py`): the token features of CLIP's text transformer
  (after `ln_final`, every token, no text projection) and of a ViT that keeps every token (`ln_post`
  on each token, then `@ proj`) are concatenated into one sequence and mixed by a 2-layer T5 encoder
  stack (`T5Stack`, randomly initialised), then mean-pooled over all tokens. As in the released code
  there is no attention mask: a missing modality is still encoded (the empty string's tokens, the
  all-zero image). The T5 layers get their own, larger learning rate (UniIR: 5e-4 vs 1e-5).
- **BLIP_FF** (UniIR `blip_featurefusion/blip_ff.py`): BLIP's text encoder cross-attends to all image
  tokens of BLIP's ViT (full image attention mask); the embedding is BERT's pooler output (dense +
  tanh on the [CLS] state), with no projection head. Queries and candidates use the same encoder; a
  missing image is the zero image, a missing text the empty string ([CLS] [SEP]).

Both are `uniir_lite.fusion.UniIRModel`s: `encode_query(side)` / `encode_candidate(side)` take one side
of an `MBEIRCollator` batch and return L2-normalised embeddings [bs, d]. `build_clip_ff(cfg, root)` /
`build_blip_ff(cfg, root)` start from the towers pre-trained in notebooks 01 and 02 (the real
pretrained weights in the `full` profile); `uniir_lite.multitask.train_or_load_uniir("clip_ff", ...)`
trains them with UniIR's recipe.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from uniir_lite.config import Config
from uniir_lite.fusion import Side, UniIRModel
from uniir_lite.models.clip import MAX_LOGIT_SCALE

# UniIR's learning rates (inbatch.yaml): towers 1e-5, CLIP_FF's T5 mixer 5e-4, i.e. 50x.
UNIIR_LR, UNIIR_T5_LR = 1e-5, 5e-4
T5_LR_MULTIPLIER = UNIIR_T5_LR / UNIIR_LR
# In `tiny` the towers already train at 1e-3 (100x UniIR's rate); the mixer trains at the same rate
# (multipliers of 3 and 10 gave no better CLIP_FF in a 60-step tiny run).
TINY_T5_LR_MULTIPLIER = 1.0
# BLIP_FF's momentum encoder in `tiny`: UniIR's 0.995 barely moves it in a run of tens of steps.
TINY_MOMENTUM = 0.9
T5_LAYERS = 2
BLIP_INIT_TEMP = 0.07  # BLIP's (and UniIR BLIP_FF's) initial temperature
BLIP_FF_MAX_LEN = 64  # tokens of an instructed query (UniIR BLIP: 100; the tiny text tower has 64 positions)


# ---------------------------------------------------------------------------------------------
# CLIP_FF
# ---------------------------------------------------------------------------------------------


def t5_config(d_model: int, tiny: bool):
    """The T5 mixer's config. UniIR: `T5Config()` defaults with `num_layers=2`, `num_heads=12`,
    `d_kv=64` and `d_model` = CLIP's width (512 for ViT-B/32, 768 for ViT-L/14); d_ff stays T5's 2048.
    The tiny variant keeps the shape ratios of the tiny towers (2 heads of width/2, d_ff = 4 x width)
    and drops dropout (T5's 0.1): a run of a few hundred steps cannot overfit."""
    from transformers import T5Config

    if tiny:
        heads, d_kv, d_ff, dropout = 2, d_model // 2, 4 * d_model, 0.0
    else:
        heads, d_kv, d_ff, dropout = 12, 64, 2048, 0.1
    return T5Config(num_layers=T5_LAYERS, num_decoder_layers=T5_LAYERS, num_heads=heads, d_kv=d_kv,
                    d_model=d_model, d_ff=d_ff, dropout_rate=dropout, is_decoder=False, use_cache=False)


def build_t5_mixer(config, seed: int | None = None) -> nn.Module:
    """A randomly initialised `T5Stack` encoder without token embedding (it is fed `inputs_embeds`).

    UniIR builds `T5Stack(T5Config(...))` with `embed_tokens=None`; transformers 5 always creates an
    embedding table, so we drop it: it would be an unused, counted parameter."""
    from transformers.models.t5.modeling_t5 import T5Stack

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        stack = T5Stack(config)
    stack.embed_tokens = None
    return stack


class ClipFF(UniIRModel):
    """UniIR's CLIP_FF: CLIP token features of both modalities -> 2-layer T5 -> mean pooling.

    `clip` is an open_clip `CLIP`; its text projection is dropped (CLIP_FF never uses it). The T5
    mixer works at CLIP's width, so the text width must equal the image embedding dimension (true
    of the tiny config, ViT-B/32 and ViT-L/14). The loss temperature is CLIP's learned logit scale.
    """

    kind = "clip_ff"
    loss_kind = "inbatch"

    def __init__(self, clip: nn.Module, tokenizer, t5: nn.Module | None = None, tiny: bool = True,
                 seed: int | None = None, t5_lr_multiplier: float = T5_LR_MULTIPLIER, recipe: dict | None = None):
        super().__init__()
        width = clip.ln_final.weight.shape[0]
        embed_dim = clip.visual.proj.shape[1]
        if width != embed_dim:
            raise ValueError(f"CLIP_FF mixes text tokens of width {width} with image tokens of dim {embed_dim}: "
                             "they must be equal (as in ViT-B/32 and ViT-L/14)")
        self.clip = clip
        self.clip.text_projection = None  # UniIR deletes it: unused by feature fusion
        self.t5 = t5 if t5 is not None else build_t5_mixer(t5_config(width, tiny), seed)
        self._tokenizer = tokenizer
        size = clip.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.t5_lr_multiplier = float(t5_lr_multiplier)
        self.recipe = dict(recipe or {})

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))  # [n, context_length]

    @property
    def embed_dim(self) -> int:
        return int(self.t5.config.d_model)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def text_tokens(self, txt: torch.Tensor) -> torch.Tensor:
        """[n, L] token ids -> [n, L, width]: CLIP's text transformer (causal mask) after `ln_final`."""
        c = self.clip
        x = c.token_embedding(txt) + c.positional_embedding  # [n, L, width]
        x = c.transformer(x, attn_mask=c.attn_mask)  # [n, L, width]
        return c.ln_final(x)  # [n, L, width]

    def image_tokens(self, img: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, 1 + P, embed_dim]: the ViT without pooling, `ln_post` on every token, `@ proj`."""
        v = self.clip.visual
        x = v._embeds(img)  # [n, 1 + P, vision width]: patches, class token, positions, ln_pre
        x = v.transformer(x)  # [n, 1 + P, vision width]
        return v.ln_post(x) @ v.proj  # [n, 1 + P, embed_dim]

    def mix(self, txt_feat: torch.Tensor, img_feat: torch.Tensor) -> torch.Tensor:
        """[n, L, d] and [n, 1 + P, d] -> [n, d]: concatenate, T5 without mask, mean over all tokens."""
        tokens = torch.cat([txt_feat, img_feat], dim=1)  # [n, L + 1 + P, d]
        hidden = self.t5(inputs_embeds=tokens, attention_mask=None, use_cache=False).last_hidden_state
        return hidden.mean(dim=1)  # [n, d]

    def fuse(self, txt: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """The unnormalised fused embedding [n, d] of (text, image) pairs."""
        return self.mix(self.text_tokens(txt), self.image_tokens(img))

    def encode_query(self, side: Side) -> torch.Tensor:
        # UniIR's masks are commented out in CLIP_FF: txt_mask / img_mask are ignored on purpose.
        return F.normalize(self.fuse(side["txt"], side["img"]), dim=-1)  # [bs, d]

    def encode_candidate(self, side: Side) -> torch.Tensor:
        return F.normalize(self.fuse(side["txt"], side["img"]), dim=-1)  # [bs, d]

    def lr_groups(self) -> dict[str, float]:
        """Learning-rate multiplier per parameter-name prefix: the T5 mixer's own learning rate."""
        return {"t5.": self.t5_lr_multiplier}


# ---------------------------------------------------------------------------------------------
# BLIP_FF
# ---------------------------------------------------------------------------------------------


def blip_pooler(text_config, seed: int | None = None) -> nn.Module:
    """BERT's pooler (dense + tanh on the first token), initialised as BLIP's text model is
    (normal(0, initializer_range), zero bias). UniIR's BLIP_FF adds it to BLIP's text encoder; the
    BLIP checkpoints have none, so it starts random there too."""
    from transformers.models.blip.modeling_blip_text import BlipTextPooler

    pooler = BlipTextPooler(text_config)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        nn.init.normal_(pooler.dense.weight, std=text_config.initializer_range)
    nn.init.zeros_(pooler.dense.bias)
    return pooler


class BlipFF(UniIRModel):
    """UniIR's BLIP_FF: BLIP's text encoder cross-attending to all image tokens, pooler output.

    `vision_model` is a `BlipVisionModel`, `text_encoder` a `BlipTextModel` with cross-attention
    layers (the image-grounded encoder of BLIP's MED); a pooler is added if it has none (transformers'
    retrieval model is built without). Trained with BLIP's momentum-queue loss at temperature `temp`.
    """

    kind = "blip_ff"
    loss_kind = "momentum_queue"

    def __init__(self, vision_model: nn.Module, text_encoder: nn.Module, temp: float = 0.07,
                 seed: int | None = None, recipe: dict | None = None):
        super().__init__()
        self.vision_model = vision_model
        self.text_encoder = text_encoder
        if text_encoder.pooler is None:
            text_encoder.pooler = blip_pooler(text_encoder.config, seed)
        self.temp = nn.Parameter(torch.tensor(float(temp)))  # clamped to [0.001, 0.5] by the loss
        self.image_size = int(vision_model.config.image_size)
        self.recipe = dict(recipe or {})

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """[n, L] ids, [CLS] first as in UniIR's BLIP_FF (not the [ENC] of BLIP's ITM); [PAD] = 0."""
        from uniir_lite.models.blip import tokenize

        return tokenize(texts, max_len=BLIP_FF_MAX_LEN)["input_ids"]

    @property
    def embed_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def logit_scale(self) -> torch.Tensor:
        return 1.0 / self.temp.clamp(0.001, 0.5)

    def image_tokens(self, img: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, 1 + P, width]: every token of BLIP's ViT (`image_embeds`)."""
        resize = img.shape[-1] != self.image_size
        return self.vision_model(pixel_values=img, interpolate_pos_encoding=resize).last_hidden_state

    def fused_states(self, txt: torch.Tensor, image_embeds: torch.Tensor):
        """The text encoder's output when its tokens cross-attend to every image token."""
        attention_mask = (txt != self.text_encoder.config.pad_token_id).long()  # [n, L]
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)  # [n, 1 + P]
        return self.text_encoder(input_ids=txt, attention_mask=attention_mask,
                                 encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)

    def fuse(self, txt: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """The unnormalised fused embedding [n, width]: tanh(W h_[CLS] + b) of the cross-attended [CLS]."""
        return self.fused_states(txt, self.image_tokens(img)).pooler_output

    def encode_query(self, side: Side) -> torch.Tensor:
        return F.normalize(self.fuse(side["txt"], side["img"]), dim=-1)  # [bs, d]

    def encode_candidate(self, side: Side) -> torch.Tensor:
        return F.normalize(self.fuse(side["txt"], side["img"]), dim=-1)  # [bs, d]

    def lr_groups(self) -> dict[str, float]:
        """BLIP_FF trains every parameter at one learning rate (UniIR)."""
        return {}


# ---------------------------------------------------------------------------------------------
# Builders (the factory `uniir_lite.fusion.build_uniir` calls them)
# ---------------------------------------------------------------------------------------------


def build_clip_ff(cfg: Config, root: str | Path | None = None, init: str = "trained",
                  pretrained: str | Path | None = None, clip: nn.Module | None = None) -> ClipFF:
    """CLIP_FF on `cfg.device`. The CLIP towers are a copy of `clip` if given, else loaded from
    `pretrained` (an open_clip tag or a folder written by `save_clip_pretrained`), else notebook 01's
    CLIP (`init="trained"`; OpenAI's in the `full` profile) or a random CLIP (`init="random"`).
    The T5 mixer is new, seeded with `cfg.seed`."""
    from uniir_lite.models.clip import build_clip
    from uniir_lite.recipes.clip import clip_fingerprint, train_or_load_clip
    from uniir_lite.models.tokenizers import ClipTokenizer

    if clip is not None:
        tokenizer, base = ClipTokenizer(context_length=clip.context_length), "given"
    elif pretrained is not None:
        clip, tokenizer = build_clip(cfg, pretrained=pretrained)
        base = str(pretrained)
    elif init == "trained":
        clip, tokenizer = train_or_load_clip(cfg, root)
        base = clip_fingerprint(cfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            clip, tokenizer = build_clip(dataclasses.replace(cfg, pretrained=False))
        base = "random"
    tiny = cfg.profile == "tiny"
    multiplier = TINY_T5_LR_MULTIPLIER if tiny else T5_LR_MULTIPLIER
    recipe = {"kind": "clip_ff", "init": init, "base": base, "embed_dim": cfg.embed_dim,
              "image_size": cfg.image_size, "t5_layers": T5_LAYERS, "t5_tiny": tiny,
              "t5_lr_multiplier": multiplier}
    # a copy: fine-tuning CLIP_FF leaves notebook 01's CLIP (and the caller's) untouched
    model = ClipFF(copy.deepcopy(clip), tokenizer, tiny=tiny, seed=cfg.seed, t5_lr_multiplier=multiplier, recipe=recipe)
    return model.to(cfg.device)


def build_blip_ff(cfg: Config, root: str | Path | None = None, init: str = "trained",
                  pretrained: str | Path | None = None, med: nn.Module | None = None) -> BlipFF:
    """BLIP_FF on `cfg.device`. The ViT and the image-grounded text encoder are copies of `med`'s (a
    `BlipMED`) if given, else of a `BlipForImageTextRetrieval` loaded from `pretrained` (a hub name or a
    folder written with `save_pretrained`), else of notebook 02's BLIP (`init="trained"`; Salesforce's
    in the `full` profile) or of a random BLIP (`init="random"`). The pooler is new, seeded with `cfg.seed`.

    The temperature starts at BLIP's initial 0.07, not at the value learned in notebook 02: that one
    belongs to the ITC projection space, while the pooled fused space starts from a random pooler."""
    from uniir_lite.models.blip import build_blip, preset_name
    from uniir_lite.recipes.blip import train_or_load_blip

    if med is not None:
        retrieval, base = med.retrieval, "given"
    elif pretrained is not None:
        retrieval, base = build_blip(cfg, head="retrieval", pretrained=pretrained), str(pretrained)
    elif init == "trained":
        med, _ = train_or_load_blip(cfg, root)
        retrieval = med.retrieval
        base = "salesforce" if cfg.pretrained else {"notebook": "02_blip", "preset": preset_name(cfg), "seed": cfg.seed}
    else:
        retrieval, base = build_blip(dataclasses.replace(cfg, pretrained=False), head="retrieval"), "random"
    recipe = {"kind": "blip_ff", "init": init, "base": base, "embed_dim": cfg.embed_dim, "image_size": cfg.image_size}
    model = BlipFF(copy.deepcopy(retrieval.vision_model), copy.deepcopy(retrieval.text_encoder), BLIP_INIT_TEMP,
                   seed=cfg.seed, recipe=recipe)
    return model.to(cfg.device)


def count_parameters(model: nn.Module, prefix: str | None = None) -> int:
    """Number of parameters (of those whose name starts with `prefix`, if given)."""
    return sum(p.numel() for n, p in model.named_parameters() if prefix is None or n.startswith(prefix))


__all__ = ["BLIP_FF_MAX_LEN", "BlipFF", "ClipFF", "T5_LR_MULTIPLIER", "TINY_MOMENTUM", "blip_pooler", "build_blip_ff",
           "build_clip_ff", "build_t5_mixer", "count_parameters", "t5_config"]
