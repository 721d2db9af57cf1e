"""BLIP-2's two stages over the Q-Former: the stage-1 heads and losses, and stage 2's soft prompts into
a frozen language model.

Taught in notebook 03 (notebook 04 builds InstructBLIP on it). BLIP-2 (Li et al., 2023,
https://arxiv.org/abs/2301.12597) trains the Q-Former (`uniir_lite.models.qformer`: its attention
masks and the model from scratch, checked against transformers) in two stages between a frozen image
encoder and a frozen language model.

What is here:
- `Blip2Stage1`: the Q-Former with BLIP-2's stage-1 heads, and the three losses `itc_loss`,
  `itm_loss`, `itg_loss` (`stage1_loss` for `uniir_lite.train.fit`);
- `Blip2Captioner`: stage 2, query outputs projected into a frozen causal LM as soft prompts;
- `CaptionTokenizer`: bert-base-uncased WordPiece restricted to the tokens the captions use;
- `FrozenImageEncoder`: the token features of the notebook-01 CLIP's vision tower;
- `QFormerCaptionData` / `caption_data`: a split's image-caption pairs over frozen image features
  (training the stages is in `uniir_lite.recipes.blip2`);
- the `full` profile: `load_pretrained_retrieval` (`Blip2ForImageTextRetrieval`, Salesforce weights)
  and `pretrained_retrieval_scores`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from uniir_lite.models.qformer import QFormer, QFormerConfig, init_bert


PRETRAINED_RETRIEVAL = "Salesforce/blip2-itm-vit-g"
INIT_TEMP = 0.07  # BLIP-2's initial ITC temperature (learned, clamped to [0.001, 0.5])
LABEL_SMOOTHING = 0.1  # BLIP-2 smooths the ITC and ITG targets


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
            m.apply(lambda m: init_bert(m, c.initializer_range))

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
    """(loss, accuracy): BLIP-2's ITM, one positive to two negatives. The B matching pairs, each image
    with a hard negative text, and each text with a hard negative image (3B sequences), classified by
    the ITM head under the bidirectional mask; the negatives are drawn from the ITC similarities `sim`
    [B, B] (`hard_negatives`). Unlike BLIP-2, the matches are weighted 2x, so both classes weigh equally."""
    B = image_embeds.shape[0]
    neg_text, neg_image = hard_negatives(sim, model.temperature())  # [B], [B]
    images = torch.cat([image_embeds, image_embeds, image_embeds[neg_image]])  # [3B, N, W]
    ids = torch.cat([input_ids, input_ids[neg_text], input_ids])  # [3B, Lt]
    masks = torch.cat([text_mask, text_mask[neg_text], text_mask])  # [3B, Lt]
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(image_embeds.device)  # [3B]: match, no match x 2
    logits = model.itm_logits(images, ids, masks)  # [3B, 2]
    # each match counts twice, so the classes weigh equally: unweighted (as BLIP-2), our tiny head
    # settles on always answering "no match" (notebook 03 measured accuracy 0.500 on every test)
    weight = torch.tensor([1.0, 2.0], device=logits.device)  # [no match, match]
    return F.cross_entropy(logits, labels, weight=weight), (logits.argmax(dim=1) == labels).float().mean()


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


def colour_word_accuracy(logits: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
                         src_contents: Sequence[str], tokenizer: CaptionTokenizer) -> float:
    """Teacher-forced grounding: at every position whose NEXT caption token is a colour word, is the
    colour the model ranks first among the colour words a colour of the image? (Which of an image's
    colours a caption names first is the caption writer's choice, so any colour of the image counts.)

    logits [B, Lt, V] (position t predicts token t+1), input_ids / text_mask [B, Lt], one src_content per row."""
    from uniir_lite.data.synthetic.scenes import COLOURS

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
    from uniir_lite.data.synthetic.scenes import COLOURS

    colour_ids = torch.tensor([tokenizer.token_id(c) for c in COLOURS], device=input_ids.device)
    is_colour = torch.isin(input_ids[:, 1:], colour_ids) & text_mask[:, 1:].bool()  # [B, Lt-1]
    shares = [len(image_attributes(src_contents[i])[0]) / len(COLOURS) for i, _ in is_colour.nonzero().tolist()]
    return sum(shares) / max(1, len(shares))


# Caption grading lives in `uniir_lite.models.captions` (shared with BLIP); re-exported here.
from uniir_lite.models.captions import attribute_accuracy, image_attributes  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------
# Data: image-caption pairs over frozen image features
# ---------------------------------------------------------------------------------------------


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
