"""The Q-Former of notebook 03: masks, equivalence with transformers, losses, stage 2, the pretrained path."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from uniir_lite.models import blip2
from uniir_lite.models import qformer as qf

T, F = True, False


def small_qformer(seed: int = 0, **overrides) -> qf.QFormer:
    """A Q-Former whose LayerNorms and biases are not at their init values, so a wrong copy shows."""
    torch.manual_seed(seed)
    config = dict(vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, num_query_tokens=4,
                  cross_attention_frequency=2, encoder_hidden_size=24, max_position_embeddings=16, embed_dim=16)
    qformer = qf.QFormer(qf.QFormerConfig(**{**config, **overrides})).eval()
    with torch.no_grad():
        for p in qformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return qformer


def inputs(batch: int = 3, text_len: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image_embeds = torch.randn(batch, 9, 24, generator=g)  # [B, N, W]
    input_ids = torch.randint(5, 40, (batch, text_len), generator=g)  # [B, Lt]
    text_mask = torch.ones(batch, text_len, dtype=torch.long)
    text_mask[0, 4:] = 0  # one padded caption
    return image_embeds, input_ids, text_mask


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------


def test_masks_match_hand_written_ones():
    # 2 queries, 3 text tokens; row = the position that attends, column = the one attended to
    itc = [[T, T, F, F, F], [T, T, F, F, F], [F, F, T, T, T], [F, F, T, T, T], [F, F, T, T, T]]
    itg = [[T, T, F, F, F], [T, T, F, F, F], [T, T, T, F, F], [T, T, T, T, F], [T, T, T, T, T]]
    itm = [[T] * 5] * 5
    assert torch.equal(qf.itc_mask(2, 3), torch.tensor(itc))
    assert torch.equal(qf.itg_mask(2, 3), torch.tensor(itg))
    assert torch.equal(qf.itm_mask(2, 3), torch.tensor(itm))
    for fn in qf.MASKS.values():
        assert fn(3, 0).all() and fn(0, 1).all()  # one modality alone sees itself


def test_padding_hides_padded_keys_only():
    mask = qf.with_padding(qf.itm_mask(2, 3), 2, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert mask.shape == (2, 5, 5)
    assert not mask[0, :, 4].any() and mask[0, :, :4].all() and mask[1].all()


# ---------------------------------------------------------------------------------------------
# the Q-Former
# ---------------------------------------------------------------------------------------------


def test_same_outputs_as_transformers_blip2_qformer_for_every_mask():
    qformer = small_qformer()
    assert [layer.cross_attn is not None for layer in qformer.layers] == [True, False, True]
    diffs = qf.max_abs_diff_vs_transformers(qformer, *inputs())
    assert set(diffs) == {"itc", "itg", "itm"}
    assert max(diffs.values()) < 1e-5, diffs


def test_transformers_copy_is_not_vacuous():
    """A perturbed copy must differ: the comparison can fail."""
    qformer = small_qformer()
    image_embeds, input_ids, text_mask = inputs()
    theirs = qf.to_transformers_qformer(qformer)
    with torch.no_grad():
        theirs.encoder.layer[2].crossattention.attention.value.weight.add_(0.1)
    ref = qf.transformers_qformer_forward(theirs, qformer, image_embeds, input_ids, text_mask, mask="itm")
    assert (qformer(image_embeds, input_ids, text_mask, mask="itm") - ref).abs().max() > 1e-3


def test_unimodal_mask_equals_separate_passes():
    qformer = small_qformer()
    image_embeds, input_ids, text_mask = inputs()
    joint = qformer(image_embeds, input_ids, text_mask, mask="itc")  # [B, Lq+Lt, H]
    queries = qformer(image_embeds)  # [B, Lq, H]
    text = qformer(None, input_ids, text_mask)  # [B, Lt, H]
    real = text_mask.bool()
    assert torch.allclose(joint[:, :4], queries, atol=1e-6)
    assert torch.allclose(joint[:, 4:][real], text[real], atol=1e-6)


def test_who_depends_on_whom_under_each_mask():
    qformer = small_qformer()
    image_embeds, input_ids, text_mask = inputs()
    text_mask = torch.ones_like(text_mask)
    other_image = image_embeds + 1.0
    later_text = input_ids.clone()
    later_text[:, -1] = (later_text[:, -1] + 1) % 40
    changed = lambda a, b: (a - b).abs().max() > 1e-4  # noqa: E731
    for mask in ("itc", "itg", "itm"):
        base = qformer(image_embeds, input_ids, text_mask, mask=mask)
        new_image = qformer(other_image, input_ids, text_mask, mask=mask)
        new_text = qformer(image_embeds, later_text, text_mask, mask=mask)
        assert changed(base[:, :4], new_image[:, :4])  # queries always read the image
        assert changed(base[:, 4:], new_image[:, 4:]) == (mask != "itc")  # text sees the image via the queries
        assert changed(base[:, :4], new_text[:, :4]) == (mask == "itm")  # queries see the text only in ITM
        assert changed(base[:, 4:-1], new_text[:, 4:-1]) == (mask != "itg")  # ITG: no peeking at later text


# ---------------------------------------------------------------------------------------------
# stage-1 objectives
# ---------------------------------------------------------------------------------------------


def test_similarity_is_max_over_queries():
    g = torch.Generator().manual_seed(0)
    image_feats = torch.nn.functional.normalize(torch.randn(3, 5, 8, generator=g), dim=-1)  # [B, Lq, D]
    text_feat = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)  # [B_t, D]
    sim = blip2.query_text_similarity(image_feats, text_feat)
    loop = torch.tensor([[max(float(image_feats[i, q] @ text_feat[t]) for q in range(5)) for t in range(4)] for i in range(3)])
    assert torch.allclose(sim, loop, atol=1e-6)


def test_itc_loss_is_symmetric_infonce_with_label_smoothing():
    g = torch.Generator().manual_seed(0)
    image_feats = torch.nn.functional.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    text_feat = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    loss, sim = blip2.itc_loss(image_feats, text_feat, 0.1)
    logits, eps, n = sim / 0.1, blip2.LABEL_SMOOTHING, 4
    target = torch.full((n, n), eps / n) + torch.eye(n) * (1 - eps)
    by_hand = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert torch.allclose(loss, by_hand, atol=1e-6)


def test_hard_negatives_never_pick_the_positive_and_prefer_similar_ones():
    torch.manual_seed(0)
    sim = torch.eye(6) * 0.9 + torch.zeros(6, 6)
    sim[:, 3] += 0.5  # text 3 looks like every image
    picks = torch.stack([blip2.hard_negatives(sim, 0.05)[0] for _ in range(50)])  # [50, 6]
    assert (picks != torch.arange(6)).all()
    assert (picks[:, [0, 1, 2, 4, 5]] == 3).float().mean() > 0.9


def test_itm_loss_is_one_positive_to_two_hard_negatives():
    """BLIP-2's ITM: B pairs, each image with a negative text, each text with a negative image (3B)."""
    torch.manual_seed(0)
    model = blip2.Blip2Stage1(small_qformer().config)
    image_embeds, input_ids, text_mask = inputs(batch=4)
    text_mask[0, 4:] = 1
    seen = {}

    def perfect(images, ids, masks):  # records what the head is asked, answers with the labels it expects
        seen.update(images=images, ids=ids)
        return torch.tensor([[0.0, 1.0]] * 4 + [[1.0, 0.0]] * 8)

    model.itm_logits = perfect
    loss, accuracy = blip2.itm_loss(model, image_embeds, input_ids, text_mask, torch.randn(4, 4))
    assert seen["images"].shape[0] == seen["ids"].shape[0] == 12 and accuracy == 1.0
    assert torch.equal(seen["images"][:8], torch.cat([image_embeds, image_embeds]))  # pairs, then images with a wrong text
    assert torch.equal(seen["ids"][:4], input_ids) and torch.equal(seen["ids"][8:], input_ids)  # texts with a wrong image
    for i in range(4):
        assert not torch.equal(seen["ids"][4 + i], input_ids[i]) and not torch.equal(seen["images"][8 + i], image_embeds[i])
    # matches count twice: always answering "no match" costs the weighted mean of the two classes' losses
    model.itm_logits = lambda images, ids, masks: torch.tensor([[2.0, 0.0]] * 12)
    loss, accuracy = blip2.itm_loss(model, image_embeds, input_ids, text_mask, torch.randn(4, 4))
    wrong, right = (torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([c])) for c in (1, 0))
    assert accuracy == pytest.approx(2 / 3) and loss == pytest.approx(float((2 * 4 * wrong + 8 * right) / 16))


def test_stage1_loss_falls_when_training():
    from uniir_lite.train import TrainConfig, fit

    torch.manual_seed(0)
    c = qf.QFormerConfig(vocab_size=12, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                            num_query_tokens=4, encoder_hidden_size=8, max_position_embeddings=8, embed_dim=16)
    model = blip2.Blip2Stage1(c)
    # 8 images whose features say which of 8 words their caption holds
    image_embeds = torch.eye(8)[:, None, :].repeat(1, 3, 1) + 0.01 * torch.randn(8, 3, 8)  # [8, 3, 8]
    input_ids = torch.stack([torch.tensor([2, 4 + i % 8, 3]) for i in range(8)])  # [CLS] w [SEP]
    batch = {"image_embeds": image_embeds, "input_ids": input_ids, "text_mask": torch.ones(8, 3, dtype=torch.long)}
    log = fit(model, lambda m, b: blip2.stage1_loss(m, b, dec_id=1), [batch], TrainConfig(max_steps=120, lr=3e-3, log_every=10, progress=False))
    assert {"itc", "itm", "itg", "itm_acc"} <= set(log.columns)
    assert log.loss.iloc[-1] < 0.7 * log.loss.iloc[0]
    assert log.itg.iloc[-1] < log.itg.iloc[0]


# ---------------------------------------------------------------------------------------------
# stage 2
# ---------------------------------------------------------------------------------------------


class _Tok:
    vocab_size, pad_id, cls_id, sep_id = 12, 0, 2, 3


def test_captioner_trains_the_bridge_not_the_language_model():
    torch.manual_seed(0)
    c = qf.QFormerConfig(vocab_size=12, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                            num_query_tokens=4, encoder_hidden_size=8, max_position_embeddings=8, embed_dim=16)
    lm = blip2.build_caption_lm(_Tok(), hidden=16, layers=1, heads=2, max_positions=16)
    model = blip2.Blip2Captioner(qf.QFormer(c), lm).train()
    assert not lm.training and not any(p.requires_grad for p in lm.parameters())
    image_embeds = torch.randn(2, 3, 8)
    ids, mask = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    model(image_embeds, ids, mask).backward()
    assert model.projection.weight.grad is not None and model.qformer.query_tokens.grad is not None
    assert all(p.grad is None for p in lm.parameters())
    out = model.generate(image_embeds, bos_id=2, eos_id=3, max_new_tokens=5)
    assert out.shape[0] == 2 and out.shape[1] <= 5


def test_packed_blocks_keep_the_token_stream_in_order():
    ids = torch.tensor([[2, 5, 3, 0], [2, 6, 7, 3]])
    mask = (ids != 0).long()
    blocks = blip2.packed_lm_blocks(ids, mask, block=3)
    assert blocks.tolist() == [[2, 5, 3], [2, 6, 7]]


# ---------------------------------------------------------------------------------------------
# tokens, attributes, recall
# ---------------------------------------------------------------------------------------------


def test_caption_tokenizer_round_trip_and_small_vocabulary():
    tok = blip2.CaptionTokenizer.from_texts(["Two red circles on snow.", "A dark blue skirt"])
    assert tok.vocab_size < 30 and tok.SPECIALS[tok.dec_id] == "[DEC]"
    ids, mask = tok(["two red circles on snow.", "a blue skirt", "a green skirt"])
    assert ids[0, 0] == tok.cls_id and ids[0, mask[0].sum() - 1] == tok.sep_id
    assert tok.decode(ids[0]) == "two red circles on snow."
    assert tok.unk_id in ids[2].tolist()  # "green" was never seen
    assert mask[1].sum() < mask[0].sum() and (ids[1][mask[1] == 0] == tok.pad_id).all()


def test_attribute_accuracy():
    scene = json.dumps({"background": "snow", "count": 2, "groups": [
        {"shape": "diamond", "colour": "red", "count": 2, "size": "small", "pattern": "plain", "positions": []}]})
    assert blip2.attribute_accuracy("two red rhombuses on white snow.", scene) == 1.0
    assert blip2.attribute_accuracy("two blue rhombuses.", scene) == 0.5
    assert blip2.attribute_accuracy("a photo of the sky.", scene) == 0.0
    garment = json.dumps({"kind": "skirt", "colour": "brown", "shade": "dark", "pattern": "striped", "length": "short"})
    assert blip2.attribute_accuracy("dark brown striped short skirt", garment) == 1.0


# ---------------------------------------------------------------------------------------------
# the frozen image encoder (open_clip) and the pretrained path (transformers), offline
# ---------------------------------------------------------------------------------------------


def test_frozen_encoder_returns_class_and_patch_tokens():
    import uniir_lite
    from uniir_lite.models.clip import build_clip

    cfg = uniir_lite.resolve("tiny")
    model, _ = build_clip(cfg)
    encoder = blip2.FrozenImageEncoder(model.visual)
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    tokens = encoder(images)  # [B, 1+P, W]
    patches = (cfg.image_size // model.visual.patch_size[0]) ** 2
    assert tokens.shape == (2, 1 + patches, encoder.width)
    assert not any(p.requires_grad for p in model.visual.parameters())
    model.visual.output_tokens = True
    _, open_clip_tokens = model.visual(images)  # open_clip's own patch tokens (after ln_post)
    assert torch.allclose(tokens[:, 1:], open_clip_tokens, atol=1e-5)


def _tiny_blip2_retrieval(tmp_path, use_text_input=True):
    from transformers import (Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor)

    from uniir_lite.models.tokenizers import bert_tokenizer

    # as on the hub: the processor puts `num_query_tokens` <image> tokens before the text and the model
    # drops them again (its config names their id). A copy: the processor adds <image> to its tokenizer.
    tokenizer = copy.deepcopy(bert_tokenizer())
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, num_query_tokens=4)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8),
        qformer_config=Blip2QFormerConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, use_qformer_text_input=use_text_input),
        num_query_tokens=4, image_text_hidden_size=16, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    Blip2ForImageTextRetrieval(config).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return tmp_path


def test_pretrained_retrieval_path_offline(tmp_path):
    import numpy as np
    from PIL import Image

    path = _tiny_blip2_retrieval(tmp_path)
    model, processor = blip2.load_pretrained_retrieval(path)
    images = [Image.fromarray(np.full((40, 40, 3), c, dtype=np.uint8)) for c in (30, 200)]
    scores = blip2.pretrained_retrieval_scores(model, processor, images, ["a red circle", "two blue squares on snow"])
    assert scores["itc"].shape == (2,) and scores["itm"].shape == (2,)
    assert ((scores["itm"] >= 0) & (scores["itm"] <= 1)).all() and (scores["itc"].abs() <= 1 + 1e-5).all()


def test_pretrained_retrieval_refuses_a_qformer_without_text_input(tmp_path):
    path = _tiny_blip2_retrieval(tmp_path, use_text_input=False)
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        blip2.load_pretrained_retrieval(path)
