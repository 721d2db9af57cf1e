"""BLIP-2's Q-Former, written out to be read: its three attention masks, the model from scratch, and
the transformers classes it corresponds to.

Taught in notebook 03 (notebook 04 builds InstructBLIP on it; the stage-1 heads and stage 2 are in
`uniir_lite.models.blip2`). BLIP-2 (Li et al., 2023, https://arxiv.org/abs/2301.12597) connects a
frozen image encoder to a frozen language model with a small transformer, the Q-Former: a fixed set
of learned query tokens read the image through cross-attention, and share their self-attention layers
with a text transformer. Which tokens may see which is set by one attention mask per objective:

- ITC (image-text contrastive): `itc_mask`, queries and text do not see each other;
- ITG (image-grounded text generation): `itg_mask`, text sees the queries and the text before it;
- ITM (image-text matching): `itm_mask`, everything sees everything.

What is here: the masks (`MASKS`, `with_padding` for padded text), `QFormerConfig`, `QFormerLayer` and
`QFormer` (the layer structure and parameter roles of transformers' `Blip2QFormerModel`),
`to_transformers_qformer` (copy the weights across), `transformers_qformer_forward` and
`max_abs_diff_vs_transformers` (the check that both compute the same thing).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


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
        self.apply(lambda m: init_bert(m, c.initializer_range))

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


def init_bert(module: nn.Module, std: float = 0.02) -> None:
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
