"""BLIP through transformers: tokenizer, builder (tiny and pretrained-from-folder), sharing, the three
losses checked against transformers and by hand, hard-negative mining, training, checkpoints."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniir_lite.config import resolve
from uniir_lite.models import blip
from uniir_lite.recipes import blip as blip_recipe


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return dataclasses.replace(resolve("tiny"), out_dir=out, fig_dir=out / "fig", max_steps=20, batch_size=8)


@pytest.fixture(scope="module")
def med(cfg):
    return blip.build_blip(cfg, head="med")


@pytest.fixture(scope="module")
def toy(cfg):
    """16 noisy solid-colour squares (4 colours x 4) captioned "a <colour> square.": (root, pairs)."""
    from PIL import Image

    from uniir_lite.data.pairs import ImageCaption

    rng = np.random.default_rng(0)
    colours = {"red": (220, 35, 35), "blue": (35, 75, 215), "green": (25, 135, 45), "yellow": (240, 215, 30)}
    root = cfg.out_dir / "data"
    (root / "img").mkdir(parents=True)
    pairs = []
    for i, (name, rgb) in enumerate(list(colours.items()) * 4):
        arr = np.full((32, 32, 3), rgb, np.uint8) + rng.integers(0, 20, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "img" / f"{i}.png")
        pairs.append(ImageCaption(f"img/{i}.png", f"a {name} square.", '{"kind": "square", "colour": "%s"}' % name, "t"))
    return root, pairs


def _inputs(texts, n_img=None, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = blip.tokenize(texts)
    return torch.randn(n_img or len(texts), 3, size, size, generator=g), tok["input_ids"], tok["attention_mask"]


def test_tokenizer_adds_dec_and_enc_inside_the_vocab():
    tok = blip.blip_tokenizer()
    assert len(tok) == blip.BLIP_VOCAB_SIZE == 30524
    assert tok.bos_token_id == 30522 and blip.enc_token_id() == 30523
    ids = tok("two red circles")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
    from uniir_lite.models.tokenizers import bert_tokenizer

    assert len(bert_tokenizer()) == 30522  # the shared BERT tokenizer is left alone


def test_tiny_config_and_sharing(cfg, med):
    config = med.retrieval.config
    assert config.vision_config.hidden_size == 64 and config.text_config.num_hidden_layers == 2
    assert config.vision_config.image_size == cfg.image_size and config.image_text_hidden_size == cfg.embed_dim
    assert config.text_config.bos_token_id == 30522 and config.text_config.pad_token_id == 0
    assert config.text_config.vocab_size == blip.BLIP_VOCAB_SIZE
    enc, dec = med.retrieval.text_encoder, med.captioner.text_decoder.bert
    assert med.captioner.vision_model is med.retrieval.vision_model
    assert dec.embeddings is enc.embeddings
    for e, d in zip(enc.encoder.layer, dec.encoder.layer):
        assert d.crossattention is e.crossattention and d.intermediate is e.intermediate
        assert d.attention is not e.attention  # the self-attention is the decoder's own
    head = med.captioner.text_decoder.cls.predictions.decoder
    assert head.weight is enc.embeddings.word_embeddings.weight


def test_builder_is_deterministic_and_checks_head(cfg):
    a, b = blip.build_blip(cfg, "retrieval"), blip.build_blip(cfg, "retrieval")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="head"):
        blip.build_blip(cfg, head="vqa")


def test_pretrained_path_loads_a_saved_model_offline(cfg, tmp_path):
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    saved = blip.build_blip(cfg, head="med")
    saved.retrieval.save_pretrained(tmp_path / "itm")
    saved.captioner.save_pretrained(tmp_path / "cap")
    full = dataclasses.replace(cfg, pretrained=True)
    model = blip.build_blip(full, head="med", pretrained={"retrieval": tmp_path / "itm", "captioning": tmp_path / "cap"})
    assert isinstance(model.retrieval, BlipForImageTextRetrieval) and not model.shared
    assert isinstance(blip.build_blip(full, "captioning", pretrained=tmp_path / "cap"), BlipForConditionalGeneration)
    px, ids, mask = _inputs(["a red circle", "two blue stars"])
    with torch.no_grad():
        emb = model.encode_image(px)
        assert torch.allclose(emb, saved.encode_image(px), atol=1e-6)
        assert torch.allclose(model.itm_logits(ids, mask, emb), saved.itm_logits(ids, mask, emb), atol=1e-5)
    with pytest.raises(OSError, match="huggingface-cli download"):
        blip.build_blip(full, "retrieval", pretrained=tmp_path / "missing")


def test_itc_itm_lm_match_transformers(med):
    px, ids, mask = _inputs(["a red circle on the grass.", "two blue stars at night."])
    with torch.no_grad():
        emb = med.encode_image(px)
        sims = med.retrieval(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
        assert torch.allclose(sims, med.image_feat(emb) @ med.text_feat(ids, mask).t(), atol=1e-6)
        enc_ids = ids.clone()
        enc_ids[:, 0] = blip.enc_token_id()
        itm = med.retrieval(input_ids=enc_ids, pixel_values=px, attention_mask=mask, use_itm_head=True).itm_score
        assert torch.allclose(itm, med.itm_logits(ids, mask, emb), atol=1e-6)
        dec_ids, labels = blip.decoder_inputs(ids)
        assert (dec_ids[:, 0] == 30522).all() and (labels[mask == 0] == -100).all()
        hf = med.captioner(pixel_values=px, input_ids=dec_ids, attention_mask=mask, labels=labels).loss
        assert torch.allclose(blip.lm_loss(med, emb, ids, mask), hf, atol=1e-5)


def test_itc_loss_by_hand_and_same_image_targets():
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    loss, sim = blip.itc_loss(img, txt, 0.1)
    labels = torch.arange(4)
    ref = (F.cross_entropy(img @ txt.t() / 0.1, labels) + F.cross_entropy(txt @ img.t() / 0.1, labels)) / 2
    assert torch.allclose(loss, ref, atol=1e-6) and sim.shape == (4, 4)
    # texts 0 and 1 show the same image: each image's target splits between them
    same = blip.itc_loss(img, txt, 0.1, img_ids=torch.tensor([0, 0, 1, 2]))[0]
    assert not torch.allclose(same, loss)
    perfect = blip.itc_loss(img, img, 0.01)[0]
    assert perfect < 0.1


def test_hard_negatives_follow_the_similarity_and_skip_positives():
    sim = torch.zeros(4, 4)
    sim[0, 3] = sim[3, 0] = 20.0  # image 0 looks like text 3 and text 0 like image 3... by far
    img_ids = torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(0)
    picks = [blip.mine_hard_negatives(sim, img_ids, g) for _ in range(50)]
    neg_img = torch.stack([p[0] for p in picks])  # [50, 4]
    neg_txt = torch.stack([p[1] for p in picks])
    assert (neg_img != torch.arange(4)).all() and (neg_txt != torch.arange(4)).all()
    assert (neg_txt[:, 0] == 3).float().mean() > 0.95 and (neg_img[:, 0] == 3).float().mean() > 0.95
    # two captions of one image are never each other's negative
    shared = blip.mine_hard_negatives(torch.randn(3, 3), torch.tensor([5, 5, 7]), g)
    assert shared[0][0] == 2 and shared[0][1] == 2 and shared[1][2] in (0, 1)


def test_itm_loss_shapes_and_labels(med):
    px, ids, mask = _inputs(["a red circle", "two blue stars", "a green cross", "a pink square"])
    emb = med.encode_image(px)
    out = blip.itm_loss(med, emb, ids, mask, torch.randn(4, 4), generator=torch.Generator().manual_seed(0))
    assert out["loss"].requires_grad and 0 <= out["acc"] <= 1
    assert (out["neg_img"] != torch.arange(4)).all()


def test_blip_loss_without_lm_is_itc_plus_itm(med):
    """`lm=False` (BLIP's retrieval fine-tuning objective) drops the LM term and nothing else."""
    px, ids, mask = _inputs(["a red circle", "two blue stars", "a green cross", "a pink square"])
    batch = {"pixel_values": px, "input_ids": ids, "attention_mask": mask, "img_ids": torch.arange(4)}
    full = blip.blip_loss(med, batch, torch.Generator().manual_seed(0))
    short = blip.blip_loss(med, batch, torch.Generator().manual_seed(0), lm=False)
    assert full["lm"] > 0 and short["lm"] == 0
    assert torch.allclose(short["loss"], short["itc"] + short["itm"]) and short["loss"].requires_grad
    assert torch.allclose(short["itc"], full["itc"]) and torch.allclose(short["itm"], full["itm"])


def test_training_lowers_the_losses_and_checkpoint_reloads(cfg, toy, monkeypatch):
    root, pairs = toy
    monkeypatch.setattr("uniir_lite.data.pairs.image_caption_pairs", lambda r, split="train": pairs)
    model, log = blip_recipe.train_or_load_blip(cfg, root, steps=30)
    assert {"itc", "itm", "lm", "itm_acc"} <= set(log.columns)
    assert log.lm.iloc[-1] < 0.6 * log.lm.iloc[0] and log.itc.iloc[-1] < log.itc.iloc[0]
    again, log2 = blip_recipe.train_or_load_blip(cfg, root, steps=30)  # loaded, not trained
    assert log2.equals(log)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert again.captioner.vision_model is again.retrieval.vision_model  # sharing survives loading
    assert len(again.generate(torch.zeros(2, 3, 32, 32), max_new_tokens=4)) == 2


def test_tiny_itm_learns_to_reject_random_negatives(cfg, toy):
    """The tiny profile's recipe (random ITM negatives, `itm_hardness`) teaches the ITM head to accept the
    matching pairs and reject other colours' images within 60 steps."""
    from uniir_lite.data.images import ImageLoader
    from uniir_lite.train import fit

    assert blip_recipe.itm_hardness(cfg) == 0.0 and blip_recipe.itm_hardness(dataclasses.replace(cfg, profile="gpu")) == 1.0
    root, pairs = toy
    data = blip.CaptionData(pairs, ImageLoader(root, 32))
    model = blip.build_blip(cfg, head="med")
    model.lm_shortlist = blip.caption_shortlist(data.input_ids)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fit(model, lambda m, b: blip.blip_loss(m, b, g, blip_recipe.itm_hardness(cfg)), data.batches(8, 0), blip_recipe.train_config(cfg, 60))
    other = (data.img_ids + 1) % len(data.img_paths)  # the next image, of another colour
    with torch.no_grad():
        emb = model.encode_image(data.pixels)
        p_pos = model.itm_score(data.input_ids, data.attention_mask, emb[data.img_ids]).mean().item()
        p_neg = model.itm_score(data.input_ids, data.attention_mask, emb[other]).mean().item()
    assert p_pos > 0.5 > p_neg and p_pos - p_neg > 0.4  # untrained, the two are about equal


def test_attribute_words_and_corruption():
    src = '{"background": "sky", "count": 2, "groups": [{"shape": "diamond", "colour": "orange", "count": 2}]}'
    assert blip.attributes_named("Two orange rhombuses.") == {"orange", "diamond"}
    assert blip.attribute_f1("Two orange rhombuses.", src) == 1.0
    assert blip.attribute_f1("a blue diamond", src) == 0.5
    assert blip.attribute_f1("renovated insider", src) == 0.0
    rng = np.random.default_rng(0)
    swapped = blip.corrupt_caption("An orange star and two red crosses.", rng, [], "colour")
    assert blip.attributes_named(swapped) & {"orange", "red"} == set() and "star" in swapped
    assert not swapped.startswith("An ") or swapped.split()[1][0] in "aeiou"  # articles fixed
    shape = blip.corrupt_caption("two red crosses", rng, [], "shape")
    assert "red" in shape and "cross" not in shape and shape.endswith("s")
    assert blip.corrupt_caption("dark red plain long shirt", rng, [], "shape") != "dark red plain long shirt"
    assert blip.corrupt_caption("x", rng, ["other caption"], "random") == "other caption"
