"""Score fusion: UniIR's CLIP_SF and BLIP_SF.

Taught in notebook 05. A query or candidate with an image and a text is embedded by adding the two
*unnormalised* unimodal embeddings, then L2-normalising the sum, exactly as the released code
(`fuse_embeddings(img_emb, txt_emb) = img_emb + txt_emb`, masks 0/1 dropping a missing modality):

    fused = normalize(img_mask * img_emb + txt_mask * txt_emb)

The paper's Fig. 2 draws learnable weights instead: `w1 img + w2 txt` for queries and
`w3 img + w4 txt` for candidates. With `fusion_weights=True` the models learn them (initialised at
1, i.e. the code's plain sum). Either way the score of a pair splits into four terms,

    <w1 q_i + w2 q_t, w3 c_i + w4 c_t> = w1 w3 <q_i, c_i> + w1 w4 <q_i, c_t> + w2 w3 <q_t, c_i> + w2 w4 <q_t, c_t>

which `score_terms` returns (divided by the two fused norms, they sum to the cosine score).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uniir_lite.config import Config
from uniir_lite.fusion import Side, UniIRModel
from uniir_lite.models.clip import MAX_LOGIT_SCALE

TERMS = ("q_img·c_img", "q_img·c_txt", "q_txt·c_img", "q_txt·c_txt")  # the order of `score_terms`
# Zero-shot baselines (UniIR issue #2): score fusion "for all tasks except task 6 and 8". How those two
# are embedded is not stated; the kit keeps ONE query modality there (notebook 05 measures both on val).
ZERO_SHOT_UNFUSED_TASKS = (6, 8)
BLIP_SF_MAX_LEN = 64  # tokens; instructed queries are longer than captions (UniIR BLIP: 100)


def score_fusion(img_emb: torch.Tensor, txt_emb: torch.Tensor, img_mask: torch.Tensor, txt_mask: torch.Tensor,
                 w_img: torch.Tensor | float = 1.0, w_txt: torch.Tensor | float = 1.0) -> torch.Tensor:
    """The unnormalised fused embedding [bs, d]: `w_img * img_mask * img_emb + w_txt * txt_mask * txt_emb`.

    With the default weights this is UniIR's code (`img_emb + txt_emb` after masking); normalise it
    (`F.normalize(..., dim=-1)`) to get what is indexed and searched.
    """
    img_emb = img_emb * img_mask.unsqueeze(-1).to(img_emb.dtype)  # [bs, d]
    txt_emb = txt_emb * txt_mask.unsqueeze(-1).to(txt_emb.dtype)  # [bs, d]
    return w_img * img_emb + w_txt * txt_emb  # [bs, d]


def score_terms(q_img: torch.Tensor, q_txt: torch.Tensor, c_img: torch.Tensor, c_txt: torch.Tensor,
                weights: torch.Tensor | None = None, normalize: bool = True, pairwise: bool = False) -> torch.Tensor:
    """The four terms of the fused score of every query-candidate pair: [n_q, n_c, 4] in the order
    of `TERMS` (or [n, 4] for aligned rows, query i with candidate i, when `pairwise=True`).

    Inputs are the masked, unnormalised unimodal embeddings [n, d] (zeros for a missing modality);
    `weights` = (w1, w2, w3, w4), default all 1. With `normalize=True` every term is divided by the
    norms of the two fused embeddings, so the terms sum to the cosine score that retrieval ranks by.
    """
    w = torch.ones(4, dtype=q_img.dtype, device=q_img.device) if weights is None else weights
    q_fused = w[0] * q_img + w[1] * q_txt  # [n_q, d]
    c_fused = w[2] * c_img + w[3] * c_txt  # [n_c, d]
    if pairwise:
        dot = lambda a, b: (a * b).sum(-1)  # noqa: E731  [n]
    else:
        dot = lambda a, b: a @ b.T  # noqa: E731  [n_q, n_c]
    terms = torch.stack([
        w[0] * w[2] * dot(q_img, c_img),
        w[0] * w[3] * dot(q_img, c_txt),
        w[1] * w[2] * dot(q_txt, c_img),
        w[1] * w[3] * dot(q_txt, c_txt),
    ], dim=-1)  # [n_q, n_c, 4] or [n, 4]
    if normalize:
        q_norm = q_fused.norm(dim=-1).clamp_min(1e-12)  # [n_q]
        c_norm = c_fused.norm(dim=-1).clamp_min(1e-12)  # [n_c]
        scale = q_norm * c_norm if pairwise else q_norm[:, None] * c_norm[None, :]
        terms = terms / scale.unsqueeze(-1)
    return terms


def single_modality_queries(queries: list, keep: str, tasks=ZERO_SHOT_UNFUSED_TASKS) -> list:
    """The queries with one modality dropped on `tasks` (M-BEIR task ids): `keep="image"` removes the
    text of an image+text query, `keep="text"` its image; other queries are returned unchanged.

    Taught in notebook 05: the zero-shot baseline of the paper does not sum a query's two embeddings
    on tasks 6 and 8 (UniIR issue #2); embedding the kept modality alone is our reading of that."""
    import dataclasses as dc

    if keep not in ("image", "text"):
        raise ValueError(f"keep must be 'image' or 'text', got {keep!r}")
    out = []
    for q in queries:
        if q.task_id in tasks and q.txt is not None and q.img_path is not None:
            q = dc.replace(q, txt=None, modality="image") if keep == "image" else dc.replace(q, img_path=None, modality="text")
        out.append(q)
    return out


class ScoreFusionModel(UniIRModel):
    """What CLIP_SF and BLIP_SF share: masking, the (optionally weighted) sum, normalisation.

    Subclasses give `encode_image(img) -> [n, d]` and `encode_text(txt) -> [n, d]`, both unnormalised.
    """

    def __init__(self, fusion_weights: bool = False) -> None:
        super().__init__()
        self.learn_weights = fusion_weights
        if fusion_weights:
            self.fusion_weights = nn.Parameter(torch.ones(4))  # w1..w4 of the paper's Fig. 2
        else:
            self.register_buffer("fusion_weights", torch.ones(4), persistent=False)  # the code: plain sum

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_text(self, txt: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rows(self, encode, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode only the rows whose modality is present; the others stay zero (as the mask would
        make them). Same values and gradients as encoding every row, at less cost."""
        rows = mask.nonzero(as_tuple=True)[0]  # [n_present]
        if rows.numel() == mask.numel():
            return encode(inputs)  # [bs, d]
        if rows.numel() == 0:
            return inputs.new_zeros(mask.shape[0], self.embed_dim, dtype=torch.float32)
        emb = encode(inputs[rows])  # [n_present, d]
        return emb.new_zeros(mask.shape[0], emb.shape[-1]).index_copy(0, rows, emb)  # [bs, d]

    def unimodal(self, side: Side) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked, unnormalised (img_emb, txt_emb), each [bs, d]; zeros where a modality is missing."""
        img_mask, txt_mask = side["img_mask"], side["txt_mask"]  # [bs], [bs]
        img_emb = self._rows(self.encode_image, side["img"], img_mask)  # [bs, d]
        txt_emb = self._rows(self.encode_text, side["txt"], txt_mask)  # [bs, d]
        img_emb = img_emb * img_mask.unsqueeze(-1).to(img_emb.dtype)
        txt_emb = txt_emb * txt_mask.unsqueeze(-1).to(txt_emb.dtype)
        return img_emb, txt_emb

    def fuse(self, side: Side, role: str) -> torch.Tensor:
        """Unnormalised fused embedding [bs, d] of a "query" or "candidate" side."""
        img_emb, txt_emb = self.unimodal(side)
        w = self.fusion_weights
        w_img, w_txt = (w[0], w[1]) if role == "query" else (w[2], w[3])
        return score_fusion(img_emb, txt_emb, side["img_mask"], side["txt_mask"], w_img, w_txt)

    def encode_query(self, side: Side) -> torch.Tensor:
        return F.normalize(self.fuse(side, "query"), dim=-1)  # [bs, d]

    def encode_candidate(self, side: Side) -> torch.Tensor:
        return F.normalize(self.fuse(side, "candidate"), dim=-1)  # [bs, d]

    @torch.no_grad()
    def score_terms(self, q_side: Side, c_side: Side, normalize: bool = True, pairwise: bool = False) -> torch.Tensor:
        """`score_terms` of these queries and candidates with this model's weights."""
        q_img, q_txt = self.unimodal(q_side)
        c_img, c_txt = self.unimodal(c_side)
        return score_terms(q_img.float(), q_txt.float(), c_img.float(), c_txt.float(),
                           self.fusion_weights.float(), normalize=normalize, pairwise=pairwise)


class ClipSF(ScoreFusionModel):
    """CLIP_SF: an open_clip CLIP; fused = normalize(encode_image(img) + encode_text(txt)), unnormalised
    tower outputs; CLIP's own learned logit scale is the loss temperature. Taught in notebook 05."""

    kind = "clip_sf"
    loss_kind = "inbatch"

    def __init__(self, clip: nn.Module, tokenizer, fusion_weights: bool = False, recipe: dict | None = None) -> None:
        super().__init__(fusion_weights)
        self.clip = clip
        self._tokenizer = tokenizer
        size = clip.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.recipe = dict(recipe or {})

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(list(texts))  # [n, context_length]

    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[-1])

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(img, normalize=False)  # [n, d]

    def encode_text(self, txt: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(txt, normalize=False)  # [n, d]

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


class BlipSF(ScoreFusionModel):
    """BLIP_SF: BLIP's ViT [CLS] -> `vision_proj` and unimodal text encoder [CLS] -> `text_proj`, summed
    unnormalised; trained with BLIP's momentum-queue loss at temperature `temp` (clamped to
    [0.001, 0.5]). The cross-attention and ITM head are unused and frozen, as in UniIR."""

    kind = "blip_sf"
    loss_kind = "momentum_queue"

    def __init__(self, retrieval: nn.Module, temp: float = 0.07, fusion_weights: bool = False,
                 recipe: dict | None = None) -> None:
        super().__init__(fusion_weights)
        self.blip = retrieval  # a transformers BlipForImageTextRetrieval
        for name, param in self.blip.named_parameters():
            if "crossattention" in name or name.startswith("itm_head"):
                param.requires_grad_(False)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.image_size = int(retrieval.config.vision_config.image_size)
        self.recipe = dict(recipe or {})

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        from uniir_lite.models.blip import tokenize

        return tokenize(texts, max_len=BLIP_SF_MAX_LEN)["input_ids"]  # [n, L]

    @property
    def embed_dim(self) -> int:
        return int(self.blip.text_proj.out_features)

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        resize = img.shape[-1] != self.image_size
        tokens = self.blip.vision_model(pixel_values=img, interpolate_pos_encoding=resize).last_hidden_state
        return self.blip.vision_proj(tokens[:, 0, :])  # [n, d]

    def encode_text(self, txt: torch.Tensor) -> torch.Tensor:
        pad = self.blip.config.text_config.pad_token_id
        out = self.blip.text_encoder(input_ids=txt, attention_mask=(txt != pad).long())
        return self.blip.text_proj(out.last_hidden_state[:, 0, :])  # [n, d]

    def logit_scale(self) -> torch.Tensor:
        return 1.0 / self.temp.clamp(0.001, 0.5)


def build_clip_sf(cfg: Config, root: str | Path, init: str = "trained", fusion_weights: bool = False) -> ClipSF:
    """CLIP_SF starting from notebook 01's CLIP (`init="trained"`; OpenAI's in the `full` profile) or
    from a random CLIP of the same shape (`init="random"`)."""
    from uniir_lite.models.clip import build_clip
    from uniir_lite.recipes.clip import clip_fingerprint, train_or_load_clip

    if init == "trained":
        clip, tokenizer = train_or_load_clip(cfg, root)
        base: Any = clip_fingerprint(cfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            clip, tokenizer = build_clip(dataclasses.replace(cfg, pretrained=False))
        base = "random"
    recipe = {"kind": "clip_sf", "init": init, "base": base, "fusion_weights": fusion_weights,
              "embed_dim": cfg.embed_dim, "image_size": cfg.image_size}
    return ClipSF(clip, tokenizer, fusion_weights, recipe).to(cfg.device)


def build_blip_sf(cfg: Config, root: str | Path, init: str = "trained", fusion_weights: bool = False) -> BlipSF:
    """BLIP_SF starting from notebook 02's BLIP (`init="trained"`; Salesforce's in the `full` profile)
    or from a random BLIP of the same shape (`init="random"`)."""
    from uniir_lite.models.blip import build_blip, preset_name
    from uniir_lite.recipes.blip import train_or_load_blip

    if init == "trained":
        med, _ = train_or_load_blip(cfg, root)
        retrieval, temp = med.retrieval, float(med.temp.detach().clamp(0.001, 0.5))
        base: Any = "salesforce" if cfg.pretrained else {"notebook": "02_blip", "preset": preset_name(cfg), "seed": cfg.seed}
    else:
        retrieval, temp, base = build_blip(dataclasses.replace(cfg, pretrained=False), head="retrieval"), 0.07, "random"
    recipe = {"kind": "blip_sf", "init": init, "base": base, "fusion_weights": fusion_weights,
              "embed_dim": cfg.embed_dim, "image_size": cfg.image_size}
    return BlipSF(retrieval, temp, fusion_weights, recipe).to(cfg.device)


__all__ = ["BlipSF", "ClipSF", "ScoreFusionModel", "TERMS", "ZERO_SHOT_UNFUSED_TASKS", "build_blip_sf", "build_clip_sf",
           "score_fusion", "score_terms", "single_modality_queries"]
