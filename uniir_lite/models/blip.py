"""BLIP (Li et al., 2022, https://arxiv.org/abs/2201.12086) through the transformers classes.

Taught in notebook 02. BLIP's *multimodal mixture of encoder-decoder* (MED) has one image encoder
(a ViT) and a BERT text transformer used in three modes:

- unimodal text encoder ([CLS] first, no cross-attention): image-text contrastive loss (ITC);
- image-grounded text encoder ([ENC] first, cross-attention to the image): image-text matching (ITM),
  trained on hard negatives mined from the ITC similarities;
- image-grounded text decoder ([DEC] first, causal self-attention): language modelling (LM), i.e.
  captioning.

transformers splits BLIP in two models: `BlipForImageTextRetrieval` (ITC + ITM heads) and
`BlipForConditionalGeneration` (the decoder). `BlipMED` holds both; built from a config it shares one
vision tower and, as BLIP does, every text parameter except the self-attention layers. Pretrained
(profile `full`), the two Salesforce checkpoints are separately fine-tuned models, so nothing is shared.
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BLIP_VOCAB_SIZE = 30524  # bert-base-uncased (30522) + [DEC] + [ENC]
DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"
MAX_TEXT_LEN = 32  # tokens, [CLS] and [SEP] included (the longest synthetic caption has 27)
PRETRAINED = {
    "retrieval": "Salesforce/blip-itm-base-coco",
    "captioning": "Salesforce/blip-image-captioning-base",
}
# Tower shapes: `tiny` for CPU (width 64, 2 layers, 8-px patches on 32-px images), `base` = BLIP's
# ViT-B/16 and BERT-base. BERT's init (std 0.02) is for width 768; at width 64 the same std makes
# activations 3.5x smaller and attention starts (and stays long) uniform, so the tiny towers use
# 0.02 * sqrt(768 / 64), about 0.07: the activation scale of BERT-base.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"width": 64, "layers": 2, "heads": 2, "mlp": 256, "patch": 8, "init_std": 0.07},
    "base": {"width": 768, "layers": 12, "heads": 12, "mlp": 3072, "patch": 16, "init_std": 0.02},
}
HEADS = ("retrieval", "captioning", "med")


# ---------------------------------------------------------------------------------------------
# Tokenizer and configs
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def blip_tokenizer():
    """BLIP's tokenizer, offline: bert-base-uncased WordPiece plus [DEC] (bos) and [ENC], as BLIP's
    `init_tokenizer` adds them. The shared BERT tokenizer is copied, never changed."""
    from uniir_lite.models.tokenizers import bert_tokenizer

    tok = copy.deepcopy(bert_tokenizer())
    tok.add_special_tokens({"bos_token": DEC_TOKEN, "additional_special_tokens": [ENC_TOKEN]})
    if len(tok) != BLIP_VOCAB_SIZE or tok.bos_token_id != 30522 or tok.convert_tokens_to_ids(ENC_TOKEN) != 30523:
        raise RuntimeError(f"BLIP tokenizer has {len(tok)} tokens ([DEC]={tok.bos_token_id}); expected {BLIP_VOCAB_SIZE}")
    return tok


def enc_token_id() -> int:
    return blip_tokenizer().convert_tokens_to_ids(ENC_TOKEN)


def tokenize(texts: Sequence[str], max_len: int = MAX_TEXT_LEN) -> dict[str, torch.Tensor]:
    """`{"input_ids", "attention_mask"}`, both [n, L] with L the longest text (at most `max_len`);
    [CLS] first, [SEP] last, [PAD] = 0 after."""
    out = blip_tokenizer()(list(texts), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def preset_name(cfg) -> str:
    """`base` (BLIP's real shapes) in the gpu and full profiles, `tiny` otherwise."""
    return "base" if cfg.profile in ("gpu", "full") else "tiny"


def blip_config(cfg, preset: str | None = None):
    """A `BlipConfig` for random init: the tower shapes of `preset`, `cfg.image_size` pixels,
    `cfg.embed_dim` for the ITC projections, and the special ids inside BLIP's vocabulary."""
    from transformers import BlipConfig

    p = PRESETS[preset or preset_name(cfg)]
    tok = blip_tokenizer()
    vision = {
        "hidden_size": p["width"], "intermediate_size": p["mlp"], "num_hidden_layers": p["layers"],
        "num_attention_heads": p["heads"], "image_size": cfg.image_size, "patch_size": p["patch"],
        "initializer_range": p["init_std"],  # transformers' default (1e-10) suits loading weights, not training
    }
    text = {
        "vocab_size": BLIP_VOCAB_SIZE, "hidden_size": p["width"], "encoder_hidden_size": p["width"],
        "intermediate_size": p["mlp"], "num_hidden_layers": p["layers"], "num_attention_heads": p["heads"],
        "max_position_embeddings": max(64, MAX_TEXT_LEN),
        "bos_token_id": tok.bos_token_id,  # [DEC] starts every decoded text
        "pad_token_id": tok.pad_token_id,  # [PAD] = 0
        "sep_token_id": tok.sep_token_id,  # [SEP] = 102 ends a caption: generate stops there
        "eos_token_id": tok.sep_token_id,
        "label_smoothing": 0.1,  # BLIP's LM loss
        "initializer_range": p["init_std"],
    }
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=cfg.embed_dim,
                      projection_dim=cfg.embed_dim, initializer_range=p["init_std"])


# ---------------------------------------------------------------------------------------------
# The MED model
# ---------------------------------------------------------------------------------------------


def share_text_parameters(encoder: nn.Module, decoder_bert: nn.Module) -> None:
    """Make the decoder use the encoder's embeddings, cross-attention and feed-forward layers: BLIP
    shares all text parameters except the self-attention (its `tie_encoder_decoder_weights`)."""
    decoder_bert.embeddings = encoder.embeddings
    for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder_bert.encoder.layer, strict=True):
        dec_layer.crossattention = enc_layer.crossattention
        dec_layer.intermediate = enc_layer.intermediate
        dec_layer.output = enc_layer.output


class BlipMED(nn.Module):
    """BLIP's MED: `retrieval` (a `BlipForImageTextRetrieval`: vision tower, text encoder, ITC
    projections, ITM head), `captioner` (a `BlipForConditionalGeneration`: text decoder) and the ITC
    temperature `temp`. Taught in notebook 02."""

    def __init__(self, retrieval: nn.Module, captioner: nn.Module, share: bool = True, temp: float = 0.07):
        super().__init__()
        self.retrieval = retrieval
        self.captioner = captioner
        self.shared = share
        if share:
            captioner.vision_model = retrieval.vision_model
            share_text_parameters(retrieval.text_encoder, captioner.text_decoder.bert)
            # the LM head's output matrix is tied to the (now shared) word embeddings
            head = captioner.text_decoder.cls.predictions
            head.decoder.weight = retrieval.text_encoder.embeddings.word_embeddings.weight
        self.temp = nn.Parameter(torch.tensor(float(temp)))  # BLIP: learnable, init 0.07, clamped to [0.001, 0.5]
        self.lm_shortlist: torch.Tensor | None = None  # token ids the LM scores (None: the whole vocabulary)

    # --- the pieces every loss uses -------------------------------------------------------------

    def _vision(self, vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        size = vision_model.config.image_size
        resize = pixel_values.shape[-1] != size
        return vision_model(pixel_values=pixel_values, interpolate_pos_encoding=resize).last_hidden_state

    def encode_image(self, pixel_values: torch.Tensor, head: str = "retrieval") -> torch.Tensor:
        """ViT tokens `image_embeds` [n, 1 + patches, width] of the retrieval (or captioning) tower."""
        model = self.retrieval if head == "retrieval" else self.captioner
        return self._vision(model.vision_model, pixel_values)

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """ITC image embedding: the projected, L2-normalised [CLS] token. [n, embed_dim]"""
        return F.normalize(self.retrieval.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def text_feat(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITC text embedding: the unimodal encoder (no image) -> projected, normalised [CLS]. [n, embed_dim]"""
        out = self.retrieval.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self.retrieval.text_proj(out.last_hidden_state[:, 0, :]), dim=-1)

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """ITM logits [n, 2] (column 1 = "match") of text i with image i: the image-grounded encoder,
        [ENC] in place of [CLS], cross-attending to the image tokens."""
        input_ids = input_ids.clone()
        input_ids[:, 0] = enc_token_id()
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.retrieval.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask,
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
        )
        return self.retrieval.itm_head(out.last_hidden_state[:, 0, :])

    @torch.no_grad()
    def itm_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """p(match) [n] of text i with image i."""
        return self.itm_logits(input_ids, attention_mask, image_embeds).softmax(-1)[:, 1]

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int = MAX_TEXT_LEN, **kwargs) -> list[str]:
        """Captions by greedy decoding (unless `kwargs` say otherwise), from [DEC] to [SEP]."""
        resize = pixel_values.shape[-1] != self.captioner.config.vision_config.image_size
        if self.lm_shortlist is not None and "logits_processor" not in kwargs:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([ShortlistLogits(self.lm_shortlist)])
        ids = self.captioner.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens,
                                      interpolate_pos_encoding=resize, **kwargs)
        return [t.strip() for t in blip_tokenizer().batch_decode(ids, skip_special_tokens=True)]


def _from_pretrained(cls, name: str | Path, device=None):
    try:
        return cls.from_pretrained(str(name))
    except OSError as e:
        raise OSError(
            f"cannot load BLIP weights {name!r} ({e}). The full profile needs them from the Hugging Face hub "
            f"(about 0.9 GB each for {PRETRAINED['retrieval']} and {PRETRAINED['captioning']}): run "
            f"`huggingface-cli download {name}` on a machine with internet, or pass a local folder."
        ) from None


def build_blip(cfg, head: str = "retrieval", pretrained: str | Path | dict[str, str | Path] | None = None, share: bool = True):
    """The one BLIP builder. Taught in notebook 02.

    - `head="retrieval"`: a `BlipForImageTextRetrieval`; `"captioning"`: a `BlipForConditionalGeneration`;
      `"med"`: a `BlipMED` holding both.
    - `pretrained=None`: the profile decides: `full` loads the Salesforce checkpoints (`PRETRAINED`),
      the others build from `blip_config(cfg)` with random init (seeded with `cfg.seed`, so the same
      config always gives the same untrained model). `False`: random init in every profile. A name or
      local folder (for "med": a dict `{"retrieval": ..., "captioning": ...}`) loads that, e.g. a model
      saved with `save_pretrained`.
    - `share` (random init, "med" only): BLIP's parameter sharing between encoder and decoder.
    """
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    classes = {"retrieval": BlipForImageTextRetrieval, "captioning": BlipForConditionalGeneration}
    if pretrained is None and cfg.pretrained:
        pretrained = dict(PRETRAINED) if head == "med" else PRETRAINED[head]
    if pretrained is not None and pretrained is not False:
        if head == "med":
            if not isinstance(pretrained, dict):
                raise ValueError('head="med" needs pretrained={"retrieval": ..., "captioning": ...}')
            parts = {h: _from_pretrained(classes[h], pretrained[h]) for h in classes}
            return BlipMED(parts["retrieval"], parts["captioning"], share=False).eval()
        return _from_pretrained(classes[head], pretrained).eval()
    config = blip_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if head == "med":
            return BlipMED(BlipForImageTextRetrieval(config), BlipForConditionalGeneration(config), share=share).eval()
        return classes[head](config).eval()


# ---------------------------------------------------------------------------------------------
# The three losses
# ---------------------------------------------------------------------------------------------


def positive_mask(img_ids: torch.Tensor | None, n: int, device=None) -> torch.Tensor:
    """[n, n] True where text j belongs to image i: the diagonal, plus other captions of the same
    image in the batch (MSCOCO-like sets have five per image)."""
    if img_ids is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    return img_ids[:, None] == img_ids[None, :]


def itc_loss(img_feat: torch.Tensor, txt_feat: torch.Tensor, temp: torch.Tensor | float,
             img_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's image-text contrastive loss and the similarity matrix `sim_i2t` [n, n] (over `temp`).

    Targets spread evenly over the texts of the same image (BLIP's retrieval fine-tuning); with
    `img_ids=None` they are the diagonal, i.e. CLIP's InfoNCE."""
    sim_i2t = img_feat @ txt_feat.t() / temp  # [n_img, n_txt]
    targets = positive_mask(img_ids, sim_i2t.shape[0], sim_i2t.device).float()
    targets = targets / targets.sum(dim=1, keepdim=True)  # the mask is symmetric: the same for t2i
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_i2t.t(), dim=1) * targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t


@torch.no_grad()
def mine_hard_negatives(sim_i2t: torch.Tensor, img_ids: torch.Tensor | None = None,
                        generator: torch.Generator | None = None, hardness: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's in-batch hard negatives: for each text an image, for each image a text, drawn with
    probability softmax(similarity) over the batch, positives excluded. Returns `(neg_img_of_text,
    neg_txt_of_image)`, both [n] indices into the batch. A more similar negative is picked more often.

    `hardness` scales the similarities first: 1 is BLIP, 0 draws uniformly (random negatives)."""
    mask = positive_mask(img_ids, sim_i2t.shape[0], sim_i2t.device)
    sim_i2t = sim_i2t * hardness
    weights_t2i = F.softmax(sim_i2t.t().float(), dim=1).masked_fill(mask, 0)  # [n_txt, n_img]
    weights_i2t = F.softmax(sim_i2t.float(), dim=1).masked_fill(mask, 0)  # [n_img, n_txt]
    # a batch made of one image only has no negative: fall back to uniform over the others
    for w in (weights_t2i, weights_i2t):
        empty = w.sum(dim=1) == 0
        w[empty] = (~mask[empty]).float() + 1e-12
    neg_img = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    neg_txt = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    return neg_img, neg_txt


def itm_loss(model: BlipMED, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             sim_i2t: torch.Tensor, img_ids: torch.Tensor | None = None,
             generator: torch.Generator | None = None, hardness: float = 1.0) -> dict[str, torch.Tensor]:
    """BLIP's image-text matching loss: n positive pairs, n (text, hard negative image) and
    n (image, hard negative text) pairs, one binary cross-entropy over the 3n. Returns
    `{"loss", "acc", "neg_img", "neg_txt"}`."""
    neg_img, neg_txt = mine_hard_negatives(sim_i2t, img_ids, generator, hardness)
    ids_all = torch.cat([input_ids, input_ids, input_ids[neg_txt]])  # [3n, L]
    mask_all = torch.cat([attention_mask, attention_mask, attention_mask[neg_txt]])
    images_all = torch.cat([image_embeds, image_embeds[neg_img], image_embeds])  # [3n, 1+P, D]
    logits = model.itm_logits(ids_all, mask_all, images_all)  # [3n, 2]
    n = input_ids.shape[0]
    labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(logits.device)
    return {"loss": F.cross_entropy(logits, labels), "acc": (logits.argmax(-1) == labels).float().mean(),
            "neg_img": neg_img, "neg_txt": neg_txt}


def decoder_inputs(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder input ([DEC] in place of [CLS]) and labels (padding -> -100, ignored), as BLIP."""
    tok = blip_tokenizer()
    dec_ids = input_ids.clone()
    dec_ids[:, 0] = tok.bos_token_id
    labels = dec_ids.masked_fill(dec_ids == tok.pad_token_id, -100)
    return dec_ids, labels


def lm_loss(model: BlipMED, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            shortlist: torch.Tensor | None = None) -> torch.Tensor:
    """BLIP's language-modelling loss: predict each next token of the caption from the earlier ones
    (causal self-attention) and the image (cross-attention), cross-entropy with label smoothing.

    `shortlist` (sorted token ids) scores the next token against those words only instead of the whole
    vocabulary: on a CPU the LM head over 30,524 words costs more than the rest of a tiny model. With
    `shortlist=None` this is exactly transformers' `BlipForConditionalGeneration` loss."""
    dec_ids, labels = decoder_inputs(input_ids)
    decoder = model.captioner.text_decoder
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    hidden = decoder.bert(input_ids=dec_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                          encoder_attention_mask=image_atts, is_decoder=True).last_hidden_state  # [n, L, D]
    # position t predicts token t+1; only real tokens are scored
    targets = labels[:, 1:]  # [n, L-1]
    keep = targets != -100
    hidden, targets = hidden[:, :-1][keep], targets[keep]  # [n_tokens, D], [n_tokens]
    head = decoder.cls.predictions
    if shortlist is None:
        logits = head(hidden)  # [n_tokens, vocab]
    else:
        shortlist = shortlist.to(hidden.device)
        weight, bias = head.decoder.weight[shortlist], head.bias[shortlist]  # [n_short, D], [n_short]
        logits = head.transform(hidden) @ weight.t() + bias  # [n_tokens, n_short]
        targets = torch.searchsorted(shortlist, targets)
    return F.cross_entropy(logits, targets, label_smoothing=decoder.label_smoothing)


def caption_shortlist(input_ids: torch.Tensor) -> torch.Tensor:
    """The sorted token ids a set of captions uses ([SEP] included, padding and [CLS] not)."""
    tok = blip_tokenizer()
    ids = torch.unique(input_ids)
    return ids[(ids != tok.pad_token_id) & (ids != tok.cls_token_id)]


class ShortlistLogits:
    """A transformers logits processor: generation may only pick tokens of `shortlist`."""

    def __init__(self, shortlist: torch.Tensor, vocab_size: int = BLIP_VOCAB_SIZE):
        self.mask = torch.full((vocab_size,), float("-inf"))
        self.mask[shortlist] = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.mask.to(scores.device)


def blip_loss(model: BlipMED, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
              hardness: float = 1.0, lm: bool = True) -> dict[str, torch.Tensor]:
    """ITC + ITM + LM on one batch (`pixel_values`, `input_ids`, `attention_mask`, `img_ids`), the
    vision tower run once. The loss function given to `uniir_lite.train.fit`. `lm=False` drops the LM
    loss: ITC + ITM is BLIP's fine-tuning objective for retrieval."""
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    ids, mask, img_ids = batch["input_ids"], batch["attention_mask"], batch.get("img_ids")
    image_embeds = model.encode_image(batch["pixel_values"])  # [n, 1+P, D]
    l_itc, sim_i2t = itc_loss(model.image_feat(image_embeds), model.text_feat(ids, mask), model.temp, img_ids)
    itm = itm_loss(model, image_embeds, ids, mask, sim_i2t.detach(), img_ids, generator, hardness)
    if lm:
        lm_embeds = image_embeds if model.shared else model.encode_image(batch["pixel_values"], head="captioning")
        l_lm = lm_loss(model, lm_embeds, ids, mask, shortlist=model.lm_shortlist)
    else:
        l_lm = torch.zeros((), device=image_embeds.device)
    return {"loss": l_itc + itm["loss"] + l_lm, "itc": l_itc.detach(), "itm": itm["loss"].detach(),
            "lm": l_lm.detach(), "itm_acc": itm["acc"], "temp": model.temp.detach(), "hardness": hardness}


# ---------------------------------------------------------------------------------------------
# Data, training, checkpoints
# ---------------------------------------------------------------------------------------------


class CaptionData:
    """Image–caption pairs as tensors: `pixels` [n_images, 3, S, S], `img_ids` [n] (which image each
    caption shows), `input_ids` / `attention_mask` [n, MAX_TEXT_LEN]. Built once; batches index it."""

    def __init__(self, pairs: Sequence, loader, captions: Sequence[str] | None = None):
        paths = list(dict.fromkeys(p.img_path for p in pairs))
        row = {p: i for i, p in enumerate(paths)}
        self.img_paths = paths
        self.pixels = torch.stack([loader(p) for p in paths])  # [n_images, 3, S, S]
        self.img_ids = torch.tensor([row[p.img_path] for p in pairs])  # [n]
        self.captions = list(captions if captions is not None else [p.caption for p in pairs])
        tok = blip_tokenizer()(self.captions, padding="max_length", truncation=True, max_length=MAX_TEXT_LEN,
                               return_tensors="pt")
        self.input_ids, self.attention_mask = tok["input_ids"], tok["attention_mask"]

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows `idx`, padding trimmed to the longest caption of the batch."""
        mask = self.attention_mask[idx]
        length = int(mask.sum(dim=1).max())
        img_ids = self.img_ids[idx]
        return {"pixel_values": self.pixels[img_ids], "input_ids": self.input_ids[idx, :length],
                "attention_mask": mask[:, :length], "img_ids": img_ids}

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled batches forever (a fresh permutation per epoch, seeded)."""
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self), generator=g)
            for start in range(0, len(self) - batch_size + 1, batch_size):
                yield self.batch(order[start:start + batch_size])


# ---------------------------------------------------------------------------------------------
# Evaluation helpers: embeddings, re-ranking, attribute words, caption corruption
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def embed(model: BlipMED, data: CaptionData, batch_size: int = 256, device="cpu") -> dict[str, torch.Tensor]:
    """`image_embeds` [n_images, 1+P, D] (ViT tokens, kept for ITM), `img_feat` [n_images, E],
    `txt_feat` [n_texts, E] of a `CaptionData`."""
    model.eval()
    image_embeds = torch.cat([model.encode_image(data.pixels[i:i + batch_size].to(device))
                              for i in range(0, len(data.pixels), batch_size)])
    txt_feat = torch.cat([model.text_feat(data.input_ids[i:i + batch_size].to(device),
                                          data.attention_mask[i:i + batch_size].to(device))
                          for i in range(0, len(data), batch_size)])
    return {"image_embeds": image_embeds, "img_feat": model.image_feat(image_embeds), "txt_feat": txt_feat}


@torch.no_grad()
def itm_match_logits(model: BlipMED, data: CaptionData, image_embeds: torch.Tensor, candidates: np.ndarray,
                     batch_size: int = 512) -> np.ndarray:
    """ITM "match" logit [n_texts, k] of each text with each of its k candidate images (`candidates`
    [n_texts, k], rows of `image_embeds`): BLIP's second retrieval stage, which ranks the ITC top-k
    by this logit plus the ITC cosine."""
    n, k = candidates.shape
    txt_rows = torch.arange(n).repeat_interleave(k)
    img_rows = torch.as_tensor(candidates).reshape(-1)
    logits = []
    for s in range(0, n * k, batch_size):
        t, i = txt_rows[s:s + batch_size], img_rows[s:s + batch_size]
        mask = data.attention_mask[t]
        length = int(mask.sum(dim=1).max())
        dev = image_embeds.device
        logits.append(model.itm_logits(data.input_ids[t, :length].to(dev), mask[:, :length].to(dev), image_embeds[i])[:, 1])
    return torch.cat(logits).view(n, k).cpu().numpy()


# Caption grading lives in `uniir_lite.models.captions` (shared with BLIP-2); re-exported here.
from uniir_lite.models.captions import ATTRIBUTE_WORDS, attribute_f1, attributes_named, attributes_of  # noqa: E402,F401


def corrupt_caption(caption: str, rng: np.random.Generator, other_captions: Sequence[str], kind: str) -> str:
    """A noisy version of `caption`: `"colour"` swaps every colour word for another colour, `"shape"`
    every shape (or garment) word for another one, `"random"` takes another image's caption. Articles are
    fixed ("an orange" -> "a blue") so grammar gives nothing away. Taught in notebook 02 (CapFilt)."""
    from uniir_lite.data.synthetic.scenes import COLOURS, GARMENTS, SHAPES
    from uniir_lite.data.synthetic.texts import SHAPE_SYNONYMS, article, plural

    if kind == "random":
        return str(other_captions[rng.integers(len(other_captions))])
    if kind not in ("colour", "shape"):
        raise ValueError(f"kind must be 'colour', 'shape' or 'random', got {kind!r}")
    tokens = re.split(r"([A-Za-z]+)", caption)  # words at odd positions
    attrs = {ATTRIBUTE_WORDS.get(t.lower()) for t in tokens[1::2]}
    vocab = list(COLOURS) if kind == "colour" else list(SHAPES) if attrs & set(SHAPES) else list(GARMENTS)
    named = sorted(attrs & set(vocab))
    if not named:
        return caption
    swap = dict(zip(named, rng.permutation([v for v in vocab if v not in named])[:len(named)]))
    singular = {n for names in SHAPE_SYNONYMS.values() for n in names} | set(COLOURS) | set(GARMENTS)
    last_word = None
    for i in range(1, len(tokens), 2):
        word = tokens[i]
        attr = ATTRIBUTE_WORDS.get(word.lower())
        if attr in swap:
            new = swap[attr] if word.lower() in singular else plural(swap[attr], 2)
            tokens[i] = new.capitalize() if word[0].isupper() else new
            if last_word is not None and tokens[last_word].lower() in ("a", "an"):
                fixed = article(new)
                tokens[last_word] = fixed.capitalize() if tokens[last_word][0].isupper() else fixed
        last_word = i
    return "".join(tokens)
