"""BLIP-2's Q-Former, written out to be read, and the transformers classes it corresponds to.

Taught in notebook 03 (notebook 04 builds InstructBLIP on it). BLIP-2 (Li et al., 2023,
https://arxiv.org/abs/2301.12597) connects a FROZEN image encoder to a FROZEN language model with a
small transformer, the Q-Former: a fixed set of learned query tokens read the image through
cross-attention, and share their self-attention layers with a text transformer. Which tokens may see
which is set by one attention mask per objective:

- ITC (image-text contrastive): `itc_mask`, queries and text do not see each other;
- ITG (image-grounded text generation): `itg_mask`, text sees the queries and the text before it;
- ITM (image-text matching): `itm_mask`, everything sees everything.

What is here:
- `QFormerConfig`, `QFormer` (from scratch, the layer structure and parameter roles of
  transformers' `Blip2QFormerModel`), `to_transformers_qformer` (copy the weights across) and
  `max_abs_diff_vs_transformers` (the check that both compute the same thing);
- `Blip2Stage1`: the Q-Former with BLIP-2's stage-1 heads, and the three losses `itc_loss`,
  `itm_loss`, `itg_loss` (`stage1_loss` for `uniir_lite.train.fit`);
- `Blip2Captioner`: stage 2, query outputs projected into a frozen causal LM as soft prompts;
- `CaptionTokenizer`: bert-base-uncased WordPiece restricted to the tokens the captions use;
- `FrozenImageEncoder`: the token features of the notebook-01 CLIP's vision tower;
- train-or-load: `train_or_load_qformer`, `train_or_load_caption_lm`, `train_or_load_captioner`
  (checkpoints under `cfg.checkpoint_dir / "03_blip2_qformer"`);
- the `full` profile: `load_pretrained_retrieval` (`Blip2ForImageTextRetrieval`, Salesforce weights)
  and `pretrained_retrieval_scores`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from uniir_lite.checkpoints import has_checkpoint, load_checkpoint, save_checkpoint
from uniir_lite.config import Config

CHECKPOINT_NAME = "03_blip2_qformer"
PRETRAINED_RETRIEVAL = "Salesforce/blip2-itm-vit-g"
INIT_TEMP = 0.07  # BLIP-2's initial ITC temperature (learned, clamped to [0.001, 0.5])
LABEL_SMOOTHING = 0.1  # BLIP-2 smooths the ITC and ITG targets


# ---------------------------------------------------------------------------------------------
# The three attention masks. mask[i, j] is True when position i may attend to position j; the
# sequence is [queries (Lq) | text (Lt)].
# ---------------------------------------------------------------------------------------------


def itc_mask(num_query: int, num_text: int) -> torch.Tensor:
    """[Lq+Lt, Lq+Lt] unimodal mask (ITC): queries see queries, text sees text, never each other."""
    is_query = torch.arange(num_query + num_text) < num_query  # [L]
    return is_query[:, None] == is_query[None, :]


def itg_mask(num_query: int, num_text: int) -> torch.Tensor:
    """[Lq+Lt, Lq+Lt] multimodal causal mask (ITG): queries see queries only (they must not read the
    caption they help generate); text sees every query and the text up to itself."""
    n = num_query + num_text
    mask = torch.ones(n, n).tril().bool()  # causal everywhere ...
    mask[:, :num_query] = True  # ... every position sees every query ...
    mask[:num_query, num_query:] = False  # ... and queries see no text
    return mask


def itm_mask(num_query: int, num_text: int) -> torch.Tensor:
    """[Lq+Lt, Lq+Lt] bidirectional mask (ITM): all tokens see all tokens."""
    n = num_query + num_text
    return torch.ones(n, n, dtype=torch.bool)


MASKS = {"itc": itc_mask, "itg": itg_mask, "itm": itm_mask}


def with_padding(mask: torch.Tensor, num_query: int, text_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, L, L]: `mask` [L, L] with padded text tokens hidden as keys (`text_mask` [B, Lt], 1 = real)."""
    if text_mask is None:
        return mask[None]
    keys = torch.cat([torch.ones(text_mask.shape[0], num_query, dtype=torch.bool, device=text_mask.device),
                      text_mask.bool()], dim=1)  # [B, L]
    return mask.to(text_mask.device)[None] & keys[:, None, :]


# ---------------------------------------------------------------------------------------------
# The Q-Former, from scratch. BERT-style post-LayerNorm blocks; parameter names follow the roles of
# transformers' Blip2QFormerModel so the copy in `to_transformers_qformer` reads one to one.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QFormerConfig:
    vocab_size: int
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    num_query_tokens: int = 8
    cross_attention_frequency: int = 1  # BLIP-2: 2 (every other layer reads the image)
    encoder_hidden_size: int = 64  # width of the frozen image encoder's tokens
    max_position_embeddings: int = 64
    embed_dim: int = 64  # ITC projection
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02  # std of the normal init (BERT: 0.02 at width 768)


class Attention(nn.Module):
    """Multi-head attention followed by BERT's residual + LayerNorm: norm(x + W_o softmax(QK^T/sqrt(d)) V)."""

    def __init__(self, hidden: int, kv_width: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, Lx, H] attends to context [B, Lc, W]; mask [B or 1, Lx, Lc] (True = may attend)."""
        B, Lx, _ = x.shape
        split = lambda t: t.view(B, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))  # [B, h, L, d]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # [B, h, Lx, Lc]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, Lx, -1)  # [B, Lx, H]
        return self.norm(x + self.out(attended))


class FeedForward(nn.Module):
    """BERT's feed-forward block: norm(x + W_2 gelu(W_1 x))."""

    def __init__(self, hidden: int, intermediate: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class QFormerLayer(nn.Module):
    """One Q-Former layer: self-attention SHARED by queries and text; cross-attention to the image for
    the queries only (in layers where `has_cross_attention`); a feed-forward block for each."""

    def __init__(self, c: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        self.self_attn = Attention(c.hidden_size, c.hidden_size, c.num_heads, c.layer_norm_eps)
        self.cross_attn = (Attention(c.hidden_size, c.encoder_hidden_size, c.num_heads, c.layer_norm_eps)
                           if has_cross_attention else None)
        self.ffn_query = FeedForward(c.hidden_size, c.intermediate_size, c.layer_norm_eps)
        self.ffn_text = FeedForward(c.hidden_size, c.intermediate_size, c.layer_norm_eps)

    def forward(self, h: torch.Tensor, num_query: int, image_embeds: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(h, h, mask)  # [B, Lq+Lt, H]: who sees whom is the mask's business
        queries, text = h[:, :num_query], h[:, num_query:]  # [B, Lq, H], [B, Lt, H]
        if num_query and self.cross_attn is not None:
            queries = self.cross_attn(queries, image_embeds)  # only the queries read the image
        return torch.cat([self.ffn_query(queries), self.ffn_text(text)], dim=1)  # [B, Lq+Lt, H]


class QFormer(nn.Module):
    """Learned queries + a BERT text encoder sharing self-attention layers; queries cross-attend to
    frozen image features. `forward` runs queries only, text only, or both under one of the masks."""

    def __init__(self, c: QFormerConfig):
        super().__init__()
        self.config = c
        self.query_tokens = nn.Parameter(torch.randn(1, c.num_query_tokens, c.hidden_size) * c.initializer_range)  # [1, Lq, H]
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # on the input embeddings, as BERT
        self.layers = nn.ModuleList(
            [QFormerLayer(c, has_cross_attention=i % c.cross_attention_frequency == 0) for i in range(c.num_layers)]
        )
        self.apply(lambda m: _init_bert(m, c.initializer_range))

    def embed(self, batch_size: int, input_ids: torch.Tensor | None = None, with_queries: bool = True) -> torch.Tensor:
        """[B, Lq+Lt, H]: the query tokens, then word + position embeddings of the text (before the norm)."""
        parts = [self.query_tokens.expand(batch_size, -1, -1)] if with_queries else []
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # text positions start at 0
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        return torch.cat(parts, dim=1)

    def forward(
        self,
        image_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        mask: str | torch.Tensor = "itm",
    ) -> torch.Tensor:
        """Hidden states [B, Lq+Lt, H].

        image_embeds [B, N, W] (None: text only, no queries); input_ids [B, Lt] (None: queries only);
        text_mask [B, Lt] (1 = real token); mask: "itc", "itg", "itm" or a boolean [L, L] tensor.
        """
        with_queries = image_embeds is not None
        batch_size = (image_embeds if with_queries else input_ids).shape[0]
        num_query = self.config.num_query_tokens if with_queries else 0
        num_text = 0 if input_ids is None else input_ids.shape[1]
        if isinstance(mask, str):
            mask = MASKS[mask](num_query, num_text)
        mask = with_padding(mask.to(self.query_tokens.device), num_query, text_mask)  # [B or 1, L, L]
        h = self.norm(self.embed(batch_size, input_ids, with_queries))  # [B, L, H]
        for layer in self.layers:
            h = layer(h, num_query, image_embeds, mask)
        return h


def _init_bert(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------
# The same model in transformers
# ---------------------------------------------------------------------------------------------


def transformers_qformer_config(c: QFormerConfig):
    """The `Blip2QFormerConfig` of a `QFormerConfig` (dropout off, so outputs can be compared)."""
    from transformers import Blip2QFormerConfig

    return Blip2QFormerConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=c.max_position_embeddings,
        layer_norm_eps=c.layer_norm_eps, pad_token_id=c.pad_token_id,
        cross_attention_frequency=c.cross_attention_frequency, encoder_hidden_size=c.encoder_hidden_size,
        use_qformer_text_input=True,
    )


def _copy_attention(ours: Attention, theirs) -> None:
    """Ours -> transformers' Blip2QFormerAttention (`.attention.{query,key,value}`, `.output.{dense,LayerNorm}`)."""
    for a, b in [(ours.query, theirs.attention.query), (ours.key, theirs.attention.key),
                 (ours.value, theirs.attention.value), (ours.out, theirs.output.dense), (ours.norm, theirs.output.LayerNorm)]:
        b.load_state_dict(a.state_dict())


def _copy_ffn(ours: FeedForward, intermediate, output) -> None:
    intermediate.dense.load_state_dict(ours.fc1.state_dict())
    output.dense.load_state_dict(ours.fc2.state_dict())
    output.LayerNorm.load_state_dict(ours.norm.state_dict())


@torch.no_grad()
def to_transformers_qformer(qformer: QFormer):
    """A transformers `Blip2QFormerModel` holding the weights of our `qformer` (eval mode, fp32).

    transformers splits the Q-Former in two: `Blip2QFormerModel` starts at the input LayerNorm and
    takes the embeddings as `query_embeds`; the embeddings live in the parent model. So the input is
    `qformer.embed(...)` on both sides.
    """
    from transformers import Blip2QFormerModel

    theirs = Blip2QFormerModel(transformers_qformer_config(qformer.config)).eval()
    theirs.layernorm.load_state_dict(qformer.norm.state_dict())
    for ours, layer in zip(qformer.layers, theirs.encoder.layer):
        _copy_attention(ours.self_attn, layer.attention)
        if ours.cross_attn is not None:
            _copy_attention(ours.cross_attn, layer.crossattention)
        _copy_ffn(ours.ffn_query, layer.intermediate_query, layer.output_query)
        _copy_ffn(ours.ffn_text, layer.intermediate, layer.output)
    return theirs


@torch.no_grad()
def transformers_qformer_forward(theirs, qformer: QFormer, image_embeds: torch.Tensor, input_ids: torch.Tensor | None = None,
                                 text_mask: torch.Tensor | None = None, mask: str = "itm") -> torch.Tensor:
    """[B, Lq+Lt, H] from transformers' model, given the same inputs as `QFormer.forward`."""
    c = qformer.config
    num_text = 0 if input_ids is None else input_ids.shape[1]
    full = with_padding(MASKS[mask](c.num_query_tokens, num_text), c.num_query_tokens, text_mask)  # [B, L, L]
    full = full.expand(image_embeds.shape[0], -1, -1)[:, None]  # [B, 1, L, L]: a ready 4-D mask is used as is
    out = theirs(
        query_embeds=qformer.embed(image_embeds.shape[0], input_ids),
        query_length=c.num_query_tokens,
        attention_mask=full,
        encoder_hidden_states=image_embeds,
    )
    return out.last_hidden_state


@torch.no_grad()
def max_abs_diff_vs_transformers(qformer: QFormer, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                                 text_mask: torch.Tensor) -> dict[str, float]:
    """{mask name: max |ours - transformers|} over the hidden states, for the three masks, on the same weights."""
    was_training = qformer.training
    qformer.eval()
    theirs = to_transformers_qformer(qformer)
    diffs = {}
    for name in MASKS:
        ours = qformer(image_embeds, input_ids, text_mask, mask=name)
        ref = transformers_qformer_forward(theirs, qformer, image_embeds, input_ids, text_mask, mask=name)
        diffs[name] = float((ours - ref).abs().max())
    qformer.train(was_training)
    return diffs


# ---------------------------------------------------------------------------------------------
# Tokens: bert-base-uncased WordPiece, restricted to what the captions use
# ---------------------------------------------------------------------------------------------


class CaptionTokenizer:
    """bert-base-uncased's WordPiece, keeping only the tokens that occur in a set of captions.

    The output layers of ITG and of the language model have one row per vocabulary entry; with all
    30522 WordPiece tokens they would cost more than the rest of the tiny models together. Ids are
    renumbered 0..V-1: the special tokens first, then the kept WordPiece tokens in BERT's order.
    `[DEC]` is BLIP's decoder start token (it replaces `[CLS]` for ITG); it is not in BERT's vocabulary.
    """

    SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]")

    def __init__(self, bert_ids: Sequence[int], max_length: int = 32):
        from uniir_lite.models.tokenizers import bert_tokenizer

        self.bert = bert_tokenizer()
        special_bert = {self.bert.convert_tokens_to_ids(t) for t in self.SPECIALS[:4]}
        self.bert_ids = [int(i) for i in sorted(set(bert_ids)) if int(i) not in special_bert]
        self.max_length = max_length
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.dec_id = range(len(self.SPECIALS))
        self.vocab_size = len(self.SPECIALS) + len(self.bert_ids)
        self._to_ours = {self.bert.convert_tokens_to_ids(t): i for i, t in enumerate(self.SPECIALS[:4])}
        self._to_ours.update({b: len(self.SPECIALS) + i for i, b in enumerate(self.bert_ids)})
        self._to_bert = {ours: b for b, ours in self._to_ours.items()}

    @classmethod
    def from_texts(cls, texts: Sequence[str], max_length: int = 32) -> "CaptionTokenizer":
        from uniir_lite.models.tokenizers import bert_tokenizer

        ids = bert_tokenizer()(list(texts), add_special_tokens=False)["input_ids"]
        return cls(sorted({i for row in ids for i in row}), max_length)

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [n, T], text_mask [n, T]): `[CLS] text [SEP]`, padded to the longest, at most `max_length`."""
        enc = self.bert(list(texts), truncation=True, max_length=self.max_length, padding="longest", return_tensors="pt")
        ids = enc["input_ids"].apply_(lambda b: self._to_ours.get(b, self.unk_id))  # [n, T]
        return ids, enc["attention_mask"]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of `ids`, up to the first `[SEP]`, special tokens dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.sep_id in ids:
            ids = ids[: ids.index(self.sep_id)]
        kept = [self._to_bert[i] for i in ids if i >= len(self.SPECIALS)]
        return self.bert.decode(kept)

    def token_id(self, word: str) -> int:
        """Our id of a word that is one WordPiece token (`[UNK]` if the captions never use it)."""
        return self._to_ours.get(self.bert.convert_tokens_to_ids(word), self.unk_id)

    def config(self) -> dict[str, Any]:
        return {"bert_ids": self.bert_ids, "max_length": self.max_length}


# ---------------------------------------------------------------------------------------------
# The frozen image encoder
# ---------------------------------------------------------------------------------------------


class FrozenImageEncoder:
    """The vision tower of a CLIP (notebook 01), frozen: images -> all its output tokens.

    BLIP-2 keeps the patch tokens of the frozen ViT, not just its pooled vector: the queries choose
    what to read. We take the last block's tokens (class token first, then the patches) after the
    tower's final LayerNorm; BLIP-2 takes the second-to-last block of its ViT-g.
    """

    def __init__(self, visual: nn.Module):
        self.visual = visual.eval().requires_grad_(False)
        self.width = visual.ln_post.normalized_shape[0]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            images, indices=1, normalize_intermediates=True, output_fmt="NLC", output_extra_tokens=True,
            intermediates_only=True,
        )
        cls, patches = out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]  # [B, 1, W], [B, P, W]
        return torch.cat([cls, patches], dim=1)  # [B, 1+P, W]

    @torch.no_grad()
    def encode_paths(self, loader, img_paths: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """[n, 1+P, W] token features of the images at `img_paths` (an `ImageLoader` reads them), on the CPU."""
        device = next(self.visual.parameters()).device
        out = [self(torch.stack([loader(p) for p in img_paths[i : i + batch_size]]).to(device)).float().cpu()
               for i in range(0, len(img_paths), batch_size)]
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Stage 1: the Q-Former and its three objectives
# ---------------------------------------------------------------------------------------------


class Blip2Stage1(nn.Module):
    """The Q-Former with BLIP-2's stage-1 heads: ITC projections, the ITM head and the ITG LM head."""

    def __init__(self, c: QFormerConfig):
        super().__init__()
        self.config = c
        self.qformer = QFormer(c)
        self.vision_proj = nn.Linear(c.hidden_size, c.embed_dim)
        self.text_proj = nn.Linear(c.hidden_size, c.embed_dim)
        self.itm_head = nn.Linear(c.hidden_size, 2)
        # BERT's LM head: a transform, then a decoder sharing the word embeddings
        self.lm_transform = nn.Sequential(nn.Linear(c.hidden_size, c.hidden_size), nn.GELU(), nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps))
        self.lm_bias = nn.Parameter(torch.zeros(c.vocab_size))
        self.temp = nn.Parameter(torch.tensor(INIT_TEMP))
        for m in (self.vision_proj, self.text_proj, self.itm_head, self.lm_transform):
            m.apply(lambda m: _init_bert(m, c.initializer_range))

    def image_feats(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, Lq, D] L2-normalised: one vector per query (ITC keeps them all)."""
        queries = self.qformer(image_embeds)  # [B, Lq, H]
        return F.normalize(self.vision_proj(queries), dim=-1)

    def text_feat(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """[B, D] L2-normalised: the [CLS] output of the text alone."""
        text = self.qformer(None, input_ids, text_mask)  # [B, Lt, H]
        return F.normalize(self.text_proj(text[:, 0]), dim=-1)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, Lt, V] next-token logits from the text positions' hidden states."""
        return self.lm_transform(hidden) @ self.qformer.word_embeddings.weight.T + self.lm_bias

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """[B, 2] (no match, match): the ITM head on every query output, averaged over the queries."""
        h = self.qformer(image_embeds, input_ids, text_mask, mask="itm")  # [B, Lq+Lt, H]
        return self.itm_head(h[:, : self.config.num_query_tokens]).mean(dim=1)

    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(0.001, 0.5)


def query_text_similarity(image_feats: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
    """[B_img, B_txt]: the similarity of an image and a text is the MAX over the queries of
    query-text cosine similarity (BLIP-2's ITC)."""
    return torch.einsum("iqd,td->itq", image_feats, text_feat).max(dim=-1).values


def itc_loss(image_feats: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, sim [B, B]): symmetric InfoNCE on the max-over-queries similarity, smoothed targets."""
    sim = query_text_similarity(image_feats, text_feat)  # [B, B]: image i vs text j
    targets = torch.arange(sim.shape[0], device=sim.device)
    loss = (F.cross_entropy(sim / temp, targets, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim.T / temp, targets, label_smoothing=LABEL_SMOOTHING)) / 2
    return loss, sim


def hard_negatives(sim: torch.Tensor, temp: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative text per image [B], negative image per text [B]), drawn with probability
    softmax(sim / temp) over the non-matching ones: similar, hence hard, negatives (BLIP's recipe)."""
    with torch.no_grad():
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        w_i2t = (sim / temp).masked_fill(eye, float("-inf")).softmax(dim=1)  # [B, B]
        w_t2i = (sim.T / temp).masked_fill(eye, float("-inf")).softmax(dim=1)  # [B, B]
        return torch.multinomial(w_i2t, 1).squeeze(1), torch.multinomial(w_t2i, 1).squeeze(1)


def itm_loss(model: Blip2Stage1, image_embeds: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
             sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy): the B matching pairs and B hard negatives, classified by the ITM head with the
    bidirectional mask. The first half of the images get a hard negative text, the first half of the
    texts a hard negative image (BLIP-2 does both for every pair: 3B sequences; we halve the cost and
    keep the classes balanced)."""
    B, half = image_embeds.shape[0], image_embeds.shape[0] // 2
    neg_text, neg_image = hard_negatives(sim, model.temperature())
    images = torch.cat([image_embeds, image_embeds[:half], image_embeds[neg_image[half:]]])  # [2B, N, W]
    ids = torch.cat([input_ids, input_ids[neg_text[:half]], input_ids[half:]])  # [2B, Lt]
    masks = torch.cat([text_mask, text_mask[neg_text[:half]], text_mask[half:]])  # [2B, Lt]
    labels = torch.cat([torch.ones(B), torch.zeros(B)]).long().to(image_embeds.device)  # [2B]: match, no match
    logits = model.itm_logits(images, ids, masks)  # [2B, 2]
    return F.cross_entropy(logits, labels), (logits.argmax(dim=1) == labels).float().mean()


def itg_forward(model: Blip2Stage1, image_embeds: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
                dec_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query outputs [B, Lq, H], next-token logits [B, Lt, V]) of one pass under the multimodal causal
    mask, with [DEC] in place of [CLS]. The queries see only queries and the image here, so their
    outputs are exactly those of the queries-only (ITC) pass: one pass serves ITC and ITG."""
    ids = input_ids.clone()
    ids[:, 0] = dec_id
    h = model.qformer(image_embeds, ids, text_mask, mask="itg")  # [B, Lq+Lt, H]
    Lq = model.config.num_query_tokens
    return h[:, :Lq], model.lm_logits(h[:, Lq:])


def caption_loss(logits: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
                 label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """Next-token cross-entropy: the logits at position t predict token t+1; padding is ignored."""
    labels = input_ids.masked_fill(text_mask == 0, -100)  # [B, Lt]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, label_smoothing=label_smoothing)


def itg_loss(model: Blip2Stage1, image_embeds: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
             dec_id: int) -> torch.Tensor:
    """Caption generation through the queries: each text token sees all queries and the text before it."""
    return caption_loss(itg_forward(model, image_embeds, input_ids, text_mask, dec_id)[1], input_ids, text_mask)


def stage1_loss(model: Blip2Stage1, batch: dict[str, torch.Tensor], dec_id: int) -> dict[str, torch.Tensor]:
    """BLIP-2 stage 1: ITC + ITM + ITG, equally weighted. batch: image_embeds [B, N, W], input_ids, text_mask [B, Lt]."""
    image_embeds, input_ids, text_mask = batch["image_embeds"], batch["input_ids"], batch["text_mask"]
    queries, logits = itg_forward(model, image_embeds, input_ids, text_mask, dec_id)  # [B, Lq, H], [B, Lt, V]
    image_feats = F.normalize(model.vision_proj(queries), dim=-1)  # [B, Lq, D]
    loss_itc, sim = itc_loss(image_feats, model.text_feat(input_ids, text_mask), model.temperature())
    loss_itm, itm_acc = itm_loss(model, image_embeds, input_ids, text_mask, sim.detach())
    loss_itg = caption_loss(logits, input_ids, text_mask)
    return {"loss": loss_itc + loss_itm + loss_itg, "itc": loss_itc.detach(), "itm": loss_itm.detach(),
            "itg": loss_itg.detach(), "itm_acc": itm_acc, "temp": model.temperature().detach()}


# ---------------------------------------------------------------------------------------------
# Stage 2: soft prompts into a frozen causal LM
# ---------------------------------------------------------------------------------------------


def build_caption_lm(tokenizer: CaptionTokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 64):
    """A tiny OPT (BLIP-2's decoder-only LM family) over the caption vocabulary, random init."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
        num_attention_heads=heads, max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
        dropout=0.0, attention_dropout=0.0, pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.cls_id,
        eos_token_id=tokenizer.sep_id,
    )
    return OPTForCausalLM(config)


def packed_lm_blocks(input_ids: torch.Tensor, text_mask: torch.Tensor, block: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """[n_blocks, block]: captions `[CLS] ... [SEP]` laid end to end (rows in `order`, default all in
    file order) and cut into blocks, as language models are pre-trained: a caption may start anywhere."""
    rows = torch.arange(len(input_ids)) if order is None else torch.as_tensor(list(order))
    stream = input_ids[rows][text_mask[rows].bool()]  # [total tokens], row after row
    n = stream.numel() // block
    return stream[: n * block].view(n, block)


def grouped_caption_order(img_paths: Sequence[str], seed: int) -> list[int]:
    """Caption rows grouped by image, the images in a seeded random order: in the packed text the
    captions of one image follow each other, so the LM learns to use what it has read before (a
    caption predicts its paraphrase). That in-context skill is what BLIP-2's soft prompts rely on."""
    groups: dict[str, list[int]] = {}
    for row, path in enumerate(img_paths):
        groups.setdefault(path, []).append(row)
    keys = list(groups)
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    return [row for i in perm for row in groups[keys[i]]]


def lm_loss_fn(lm: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Next-token loss of the LM on packed text blocks (`uniir_lite.train.fit`'s loss_fn)."""
    return {"loss": lm(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss}


class Blip2Captioner(nn.Module):
    """Stage 2: the Q-Former's query outputs, linearly projected to the LM's width, are prepended to the
    caption's embeddings as soft prompts; the LM is frozen, the Q-Former and the projection learn."""

    def __init__(self, qformer: QFormer | None, lm: nn.Module):
        super().__init__()
        self.qformer = qformer  # None: no image at all, the LM alone (an empty soft prompt)
        self.lm = lm.requires_grad_(False).eval()
        self.projection = None if qformer is None else nn.Linear(qformer.config.hidden_size, lm.config.hidden_size)

    def train(self, mode: bool = True) -> "Blip2Captioner":
        super().train(mode)
        self.lm.eval()  # frozen: no dropout, whatever the mode of the rest
        return self

    def soft_prompt(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, Lq, H_lm]: query outputs through the projection ([B, 0, H_lm] for the LM alone)."""
        if self.qformer is None:
            return image_embeds.new_zeros(image_embeds.shape[0], 0, self.lm.config.hidden_size)
        return self.projection(self.qformer(image_embeds))

    def caption_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """[B, Lt, V]: the LM reads [soft prompt | [CLS] caption [SEP]]; the logits of the caption positions."""
        prompt = self.soft_prompt(image_embeds)  # [B, Lq, H_lm]
        embeds = torch.cat([prompt, self.lm.get_input_embeddings()(input_ids)], dim=1)  # [B, Lq+Lt, H_lm]
        attention = torch.cat([torch.ones(prompt.shape[:2], dtype=text_mask.dtype, device=text_mask.device), text_mask], dim=1)
        return self.lm(inputs_embeds=embeds, attention_mask=attention).logits[:, prompt.shape[1] :]

    def forward(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Caption LM loss: next-token cross-entropy on the caption; no loss on the soft prompt."""
        return caption_loss(self.caption_logits(image_embeds, input_ids, text_mask), input_ids, text_mask, label_smoothing=0.0)

    @torch.no_grad()
    def generate(self, image_embeds: torch.Tensor, bos_id: int, eos_id: int, max_new_tokens: int = 30) -> torch.Tensor:
        """[B, <= max_new_tokens] greedy continuation of [soft prompt | [CLS]], stopped at [SEP]."""
        prompt = self.soft_prompt(image_embeds)  # [B, Lq, H_lm]
        ids = torch.full((prompt.shape[0], 1), bos_id, dtype=torch.long, device=prompt.device)  # [B, 1]
        done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        for _ in range(max_new_tokens):
            embeds = torch.cat([prompt, self.lm.get_input_embeddings()(ids)], dim=1)
            next_id = self.lm(inputs_embeds=embeds).logits[:, -1].argmax(dim=-1)  # [B]
            next_id = next_id.masked_fill(done, eos_id)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
            done |= next_id == eos_id
            if done.all():
                break
        return ids[:, 1:]


def captioner_loss_fn(model: Blip2Captioner, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"loss": model(batch["image_embeds"], batch["input_ids"], batch["text_mask"])}


# ---------------------------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------------------------


def recall_at_k_from_scores(scores: torch.Tensor, k: int) -> float:
    """UniIR's Recall@k (a hit rate) of a [n_queries, n_candidates] score matrix whose positives are
    on the diagonal: `uniir_lite.metrics.diagonal_recall_at_k`."""
    from uniir_lite.metrics import diagonal_recall_at_k

    return diagonal_recall_at_k(scores, k)


def colour_word_accuracy(logits: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
                         src_contents: Sequence[str], tokenizer: CaptionTokenizer) -> float:
    """Teacher-forced grounding: at every position whose NEXT caption token is a colour word, is the
    colour the model ranks first among the colour words a colour of the image? (Which of an image's
    colours a caption names first is the caption writer's choice, so any colour of the image counts.)

    logits [B, Lt, V] (position t predicts token t+1), input_ids / text_mask [B, Lt], one src_content per row."""
    from uniir_lite.data.synthetic_content import COLOURS

    names = list(COLOURS)
    colour_ids = torch.tensor([tokenizer.token_id(c) for c in names], device=input_ids.device)  # [8]
    is_colour = torch.isin(input_ids[:, 1:], colour_ids) & text_mask[:, 1:].bool()  # [B, Lt-1]
    best = logits[:, :-1, colour_ids].argmax(dim=-1)  # [B, Lt-1] index into names
    hits = [names[best[i, t]] in image_attributes(src_contents[i])[0] for i, t in is_colour.nonzero().tolist()]
    return sum(hits) / max(1, len(hits))


@torch.no_grad()
def retrieval_scores(model: Blip2Stage1, data: "QFormerCaptionData") -> torch.Tensor:
    """[n_images, n_images] ITC scores of every image against the first caption of every image
    (max over queries); the positives are on the diagonal."""
    model.eval()
    rows = data.first_captions()
    image_feats = model.image_feats(data.image_embeds)  # [n, Lq, D]
    text_feat = model.text_feat(data.input_ids[rows], data.text_mask[rows])  # [n, D]
    return query_text_similarity(image_feats, text_feat)


@torch.no_grad()
def itm_accuracy(model: Blip2Stage1, data: "QFormerCaptionData", negatives: str = "random", seed: int = 0) -> float:
    """Accuracy of the ITM head on every image with its first caption (a match) and with one other
    image's caption (no match): a random one, or the one ITC ranks highest ("hard"). Chance is 0.5."""
    model.eval()
    rows = torch.tensor(data.first_captions())
    n = len(rows)
    if negatives == "random":
        g = torch.Generator().manual_seed(seed)
        other = (torch.arange(n) + torch.randint(1, n, (n,), generator=g)) % n  # never the image itself
    else:
        other = retrieval_scores(model, data).fill_diagonal_(float("-inf")).argmax(dim=1)
    ids, mask = data.input_ids[rows], data.text_mask[rows]
    match = model.itm_logits(data.image_embeds, ids, mask).argmax(dim=1) == 1  # [n]
    no_match = model.itm_logits(data.image_embeds, ids[other], mask[other]).argmax(dim=1) == 0  # [n]
    return float(torch.cat([match, no_match]).float().mean())


@torch.no_grad()
def caption_metrics(model: "Blip2Captioner", data: "QFormerCaptionData", tokenizer: CaptionTokenizer, max_new_tokens: int = 30) -> dict[str, Any]:
    """Stage 2 on every image with its first caption: caption LM loss (teacher forced), colour-word
    accuracy (`colour_word_accuracy`), and greedy captions with their attribute accuracy."""
    model.eval()
    rows = data.first_captions()
    ids, mask = data.input_ids[rows], data.text_mask[rows]
    logits = model.caption_logits(data.image_embeds, ids, mask)  # [n, Lt, V]
    captions = [tokenizer.decode(g) for g in model.generate(data.image_embeds, tokenizer.cls_id, tokenizer.sep_id, max_new_tokens)]
    return {
        "caption_loss": float(caption_loss(logits, ids, mask, label_smoothing=0.0)),
        "colour_accuracy": colour_word_accuracy(logits, ids, mask, data.src_content, tokenizer),
        "attribute_accuracy": sum(attribute_accuracy(c, s) for c, s in zip(captions, data.src_content)) / len(captions),
        "captions": captions,
    }


def colour_word_chance(input_ids: torch.Tensor, text_mask: torch.Tensor, src_contents: Sequence[str],
                       tokenizer: CaptionTokenizer) -> float:
    """`colour_word_accuracy` of a model that names a colour uniformly at random: the mean, over the
    same colour positions, of (colours in the image) / (colours in the vocabulary)."""
    from uniir_lite.data.synthetic_content import COLOURS

    colour_ids = torch.tensor([tokenizer.token_id(c) for c in COLOURS], device=input_ids.device)
    is_colour = torch.isin(input_ids[:, 1:], colour_ids) & text_mask[:, 1:].bool()  # [B, Lt-1]
    shares = [len(image_attributes(src_contents[i])[0]) / len(COLOURS) for i, _ in is_colour.nonzero().tolist()]
    return sum(shares) / max(1, len(shares))


# Caption grading lives in `uniir_lite.models.captions` (shared with BLIP); re-exported here.
from uniir_lite.models.captions import attribute_accuracy, image_attributes  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------
# Data, training, train-or-load
# ---------------------------------------------------------------------------------------------


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
    cross_attention_frequency: int = 2  # BLIP-2's: every other layer reads the image
    embed_dim: int = 64
    initializer_range: float = 0.125  # 1/sqrt(width); see `QFormerConfig.initializer_range`
    lr: float = 3e-3
    warmup_steps: int = 10

    @classmethod
    def from_config(cls, cfg: Config, **overrides: Any) -> "Stage1Recipe":
        base = dict(steps=2 * cfg.max_steps // 3, batch_size=max(2, cfg.batch_size // 2), seed=cfg.seed, embed_dim=cfg.embed_dim)
        if cfg.profile != "tiny":  # BLIP-2's Q-Former shape: BERT-base, 32 queries, 256-d ITC space, BERT's init
            base.update(hidden_size=768, num_layers=12, intermediate_size=3072, num_query_tokens=32, embed_dim=256, initializer_range=0.02,
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


class PairBatches:
    """Shuffled batches of (image tokens, caption): each pass is one epoch over the IMAGES (so a batch
    holds no image twice, and in-batch negatives are true negatives), with one of each image's captions
    drawn at random. Seeded: the same seed gives the same batches."""

    def __init__(self, image_embeds: torch.Tensor, caption_rows: Sequence[Sequence[int]], input_ids: torch.Tensor,
                 text_mask: torch.Tensor, batch_size: int, seed: int):
        self.image_embeds, self.caption_rows = image_embeds, [list(r) for r in caption_rows]
        self.input_ids, self.text_mask, self.batch_size = input_ids, text_mask, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.caption_rows), generator=self.generator)
        for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
            images = order[start : start + self.batch_size]
            pick = [self.caption_rows[i][int(torch.randint(len(self.caption_rows[i]), (1,), generator=self.generator))]
                    for i in images.tolist()]
            text_mask = self.text_mask[pick]  # [B, T]
            length = int(text_mask.sum(dim=1).max())  # drop the columns that are padding in every row
            yield {"image_embeds": self.image_embeds[images], "input_ids": self.input_ids[pick, :length],
                   "text_mask": text_mask[:, :length]}


@dataclasses.dataclass
class QFormerCaptionData:
    """The image-caption pairs of a split, ready for the Q-Former: unique images with their frozen
    token features, every caption tokenised, and which captions belong to which image."""

    img_paths: list[str]
    image_embeds: torch.Tensor  # [n_images, 1+P, W]
    captions: list[str]
    input_ids: torch.Tensor  # [n_captions, T]
    text_mask: torch.Tensor  # [n_captions, T]
    caption_image: list[int]  # image row of each caption
    src_content: list[str]  # per image

    def caption_rows(self) -> list[list[int]]:
        rows: list[list[int]] = [[] for _ in self.img_paths]
        for c, i in enumerate(self.caption_image):
            rows[i].append(c)
        return rows

    def first_captions(self) -> list[int]:
        """One caption per image (its first): the retrieval test set pairs image i with caption row i."""
        return [rows[0] for rows in self.caption_rows()]

    def batches(self, batch_size: int, seed: int) -> PairBatches:
        return PairBatches(self.image_embeds, self.caption_rows(), self.input_ids, self.text_mask, batch_size, seed)


def caption_data(root: str | Path, split: str, tokenizer: CaptionTokenizer, encoder: FrozenImageEncoder, image_size: int) -> QFormerCaptionData:
    """`QFormerCaptionData` of `split` from `uniir_lite.data.pairs.image_caption_pairs`."""
    from uniir_lite.data.images import ImageLoader
    from uniir_lite.data.pairs import image_caption_pairs

    pairs = image_caption_pairs(root, split)
    img_paths = list(dict.fromkeys(p.img_path for p in pairs))
    row = {p: i for i, p in enumerate(img_paths)}
    src = {p.img_path: p.src_content for p in pairs}
    input_ids, text_mask = tokenizer([p.caption for p in pairs])
    image_embeds = encoder.encode_paths(ImageLoader(root, image_size), img_paths)
    return QFormerCaptionData(img_paths, image_embeds, [p.caption for p in pairs], input_ids, text_mask,
                       [row[p.img_path] for p in pairs], [src[p] for p in img_paths])


def _directory(cfg: Config, stage: str) -> Path:
    return cfg.checkpoint_dir / CHECKPOINT_NAME / stage


def training_log(cfg: Config, stage: str) -> pd.DataFrame:
    """The training log saved with a checkpoint: stage "stage1", "lm" or "stage2"."""
    _, saved = load_checkpoint(_directory(cfg, stage))
    return pd.DataFrame(saved["history"])


def frozen_encoder(cfg: Config, root: str | Path) -> FrozenImageEncoder:
    """The vision tower of notebook 01's CLIP (trained there, or loaded), frozen."""
    from uniir_lite.models.clip import train_or_load_clip

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


def train_or_load_qformer(cfg: Config, root: str | Path, data: QFormerCaptionData | None = None,
                          tokenizer: CaptionTokenizer | None = None, progress: bool = False):
    """(stage-1 model in eval mode, tokenizer): loads `cfg.checkpoint_dir/03_blip2_qformer/stage1` when
    it holds a model of the same recipe and vocabulary, else trains one with ITC + ITM + ITG on the
    training pairs (frozen image features of notebook 01's CLIP) and saves it there."""
    from uniir_lite.train import TrainConfig, fit

    tokenizer = tokenizer or caption_tokenizer(root)
    recipe = Stage1Recipe.from_config(cfg)
    directory = _directory(cfg, "stage1")
    if has_checkpoint(directory):
        state, saved = load_checkpoint(directory)
        if saved.get("recipe") == dataclasses.asdict(recipe) and saved.get("tokenizer") == tokenizer.config():
            model = Blip2Stage1(QFormerConfig(**saved["qformer_config"]))
            model.load_state_dict(state)
            return model.to(cfg.device).eval(), tokenizer
    data = data or caption_data(root, "train", tokenizer, frozen_encoder(cfg, root), cfg.image_size)
    model = init_stage1(cfg, tokenizer, data.image_embeds.shape[-1])
    history = fit(model, lambda m, b: stage1_loss(m, b, tokenizer.dec_id), data.batches(recipe.batch_size, recipe.seed),
                  TrainConfig(max_steps=recipe.steps, lr=recipe.lr, weight_decay=0.05, warmup_steps=recipe.warmup_steps,
                              precision=cfg.precision, progress=progress), cfg.device)
    save_checkpoint(directory, model, {"recipe": dataclasses.asdict(recipe), "tokenizer": tokenizer.config(),
                                       "qformer_config": dataclasses.asdict(model.config),
                                       "history": history.to_dict(orient="records")})
    return model.eval(), tokenizer


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


def train_or_load_caption_lm(cfg: Config, root: str | Path, tokenizer: CaptionTokenizer | None = None, progress: bool = False):
    """The small causal LM that stage 2 keeps frozen, pre-trained on the training captions' TEXT only
    (no image ever): loaded from `.../03_blip2_qformer/lm` or trained and saved there. Eval mode, frozen."""
    from uniir_lite.data.pairs import image_caption_pairs
    from uniir_lite.train import TrainConfig, fit

    tokenizer = tokenizer or caption_tokenizer(root)
    recipe = LMRecipe.from_config(cfg)
    directory = _directory(cfg, "lm")
    torch.manual_seed(recipe.seed)
    lm = build_caption_lm(tokenizer, recipe.hidden_size, recipe.num_layers)
    if has_checkpoint(directory):
        state, saved = load_checkpoint(directory)
        if saved.get("recipe") == dataclasses.asdict(recipe) and saved.get("tokenizer") == tokenizer.config():
            lm.load_state_dict(state)
            return lm.to(cfg.device).eval().requires_grad_(False)
    pairs = image_caption_pairs(root, "train")
    ids, mask = tokenizer([p.caption for p in pairs])
    blocks = packed_lm_blocks(ids, mask, recipe.block, grouped_caption_order([p.img_path for p in pairs], recipe.seed))
    history = fit(lm, lm_loss_fn, _Blocks(blocks, recipe.batch_size, recipe.seed),
                  TrainConfig(max_steps=recipe.steps, lr=recipe.lr, weight_decay=0.05, warmup_steps=10,
                              precision=cfg.precision, progress=progress), cfg.device)
    save_checkpoint(directory, lm, {"recipe": dataclasses.asdict(recipe), "tokenizer": tokenizer.config(),
                                    "history": history.to_dict(orient="records")})
    return lm.eval().requires_grad_(False)


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
                            progress: bool = False) -> Blip2Captioner:
    """Stage 2: loaded from `.../03_blip2_qformer/stage2`, or trained from `new_captioner(stage1, lm)` with
    the caption LM loss (only the Q-Former and the projection learn) and saved there. Eval mode."""
    from uniir_lite.train import TrainConfig, fit

    tokenizer = tokenizer or caption_tokenizer(root)
    recipe = Stage2Recipe.from_config(cfg)
    directory = _directory(cfg, "stage2")
    model = new_captioner(stage1, lm, recipe.seed)
    if has_checkpoint(directory):
        state, saved = load_checkpoint(directory)
        if saved.get("recipe") == dataclasses.asdict(recipe) and saved.get("tokenizer") == tokenizer.config():
            model.load_state_dict(state)
            return model.to(cfg.device).eval()
    data = data or caption_data(root, "train", tokenizer, frozen_encoder(cfg, root), cfg.image_size)
    history = fit(model, captioner_loss_fn, data.batches(recipe.batch_size, recipe.seed + 1),
                  TrainConfig(max_steps=recipe.steps, lr=recipe.lr, weight_decay=0.05, warmup_steps=10,
                              precision=cfg.precision, progress=progress), cfg.device)
    save_checkpoint(directory, model, {"recipe": dataclasses.asdict(recipe), "tokenizer": tokenizer.config(),
                                       "history": history.to_dict(orient="records")})
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The full profile: Salesforce's BLIP-2 retrieval model through transformers
# ---------------------------------------------------------------------------------------------


def load_pretrained_retrieval(name_or_path: str | Path = PRETRAINED_RETRIEVAL, device: str | torch.device = "cpu"):
    """(Blip2ForImageTextRetrieval in eval mode, its Blip2Processor) from the hub or a folder written by
    `save_pretrained`. Checks that the Q-Former takes text (stack.md: `use_qformer_text_input=True`)."""
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    model = Blip2ForImageTextRetrieval.from_pretrained(str(name_or_path)).to(device).eval()
    if not model.config.qformer_config.use_qformer_text_input:
        raise ValueError(f"{name_or_path}: qformer_config.use_qformer_text_input is False; "
                         "Blip2ForImageTextRetrieval needs a Q-Former that reads text")
    processor = Blip2Processor.from_pretrained(str(name_or_path))
    return model, processor


@torch.no_grad()
def pretrained_retrieval_scores(model, processor, images: Sequence[Any], texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """{"itc": [n] max-over-queries cosine, "itm": [n] match probability} of n (image, text) pairs.

    The ITM path needs an explicit attention mask (stack.md), which the processor supplies."""
    device = next(model.parameters()).device
    inputs = processor(images=list(images), text=list(texts), return_tensors="pt", padding=True, truncation=True).to(device)
    itm = model(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(dim=-1)[:, 1]  # [n]
    out = model(**inputs, use_image_text_matching_head=False)
    itc = out.logits_per_image.diagonal() if out.logits_per_image.dim() == 2 else out.logits_per_image
    return {"itc": itc, "itm": itm}
