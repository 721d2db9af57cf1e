"""Score fusion (CLIP_SF, BLIP_SF): masked sum then normalisation, the four-term decomposition, the
interface and the factory."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import uniir_lite.fusion as fusion
from uniir_lite.config import resolve
from uniir_lite.fusion import UniIRModel, build_uniir
from uniir_lite.fusion.score import BlipSF, ClipSF, score_fusion, score_terms


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return dataclasses.replace(resolve("tiny"), out_dir=tmp_path_factory.mktemp("out"), device="cpu")


@pytest.fixture(scope="module")
def clip_sf(cfg):
    return build_uniir("clip_sf", cfg, root=None, init="random")


@pytest.fixture(scope="module")
def blip_sf(cfg):
    return build_uniir("blip_sf", cfg, root=None, init="random")


def _side(model, txts, with_img):
    n = len(txts)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(n, 3, model.image_size, model.image_size, generator=g)
    img_mask = torch.tensor(with_img, dtype=torch.long)
    img = img * img_mask[:, None, None, None]  # the collator pads a missing image with zeros
    return {"ids": [f"1:{i}" for i in range(n)], "txt": model.tokenize(txts), "img": img,
            "txt_mask": torch.tensor([1 if t else 0 for t in txts]), "img_mask": img_mask}


def test_score_fusion_is_the_masked_sum():
    img, txt = torch.randn(3, 5), torch.randn(3, 5)
    img_mask, txt_mask = torch.tensor([1, 0, 1]), torch.tensor([1, 1, 0])
    fused = score_fusion(img, txt, img_mask, txt_mask)
    assert torch.allclose(fused[0], img[0] + txt[0])
    assert torch.allclose(fused[1], txt[1]) and torch.allclose(fused[2], img[2])
    assert torch.allclose(score_fusion(img, txt, img_mask, txt_mask, 2.0, 0.5)[0], 2 * img[0] + 0.5 * txt[0])


@pytest.mark.parametrize("name", ["clip_sf", "blip_sf"])
def test_encoders_sum_unnormalised_embeddings_then_normalise(name, request):
    model = request.getfixturevalue(name)
    side = _side(model, ["a red circle", "", "two blue squares"], [1, 1, 0])
    with torch.no_grad():
        q = model.encode_query(side)
        img_emb = model.encode_image(side["img"])  # every row, unnormalised
        txt_emb = model.encode_text(side["txt"])
    assert q.shape == (3, model.embed_dim)
    assert torch.allclose(q.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(q[0], F.normalize(img_emb[0] + txt_emb[0], dim=0), atol=1e-5)
    assert torch.allclose(q[1], F.normalize(img_emb[1], dim=0), atol=1e-5)  # no text: image only
    assert torch.allclose(q[2], F.normalize(txt_emb[2], dim=0), atol=1e-5)  # no image: text only
    # the sum of unnormalised vectors is not the sum of normalised ones (the code's choice matters)
    assert not torch.allclose(q[0], F.normalize(F.normalize(img_emb[0], dim=0) + F.normalize(txt_emb[0], dim=0), dim=0), atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(model.encode_candidate(side), q, atol=1e-6)  # equal weights: same map


def test_four_terms_sum_to_the_fused_score(clip_sf):
    q_side = _side(clip_sf, ["find the image of a red circle", "", "what is this"], [0, 1, 1])
    c_side = _side(clip_sf, ["", "a passage", "a caption", "x"], [1, 0, 1, 1])
    with torch.no_grad():
        cosine = clip_sf.encode_query(q_side) @ clip_sf.encode_candidate(c_side).T  # [3, 4]
    terms = clip_sf.score_terms(q_side, c_side)  # [3, 4, 4]
    assert terms.shape == (3, 4, 4)
    assert torch.allclose(terms.sum(-1), cosine, atol=1e-5)
    # a text-only query has no image terms, an image-only candidate no text terms
    assert torch.all(terms[0, :, :2] == 0) and torch.all(terms[:, 0, 1::2] == 0)
    pairwise = clip_sf.score_terms(q_side, {k: v[:3] for k, v in c_side.items()}, pairwise=True)  # [3, 4]
    assert torch.allclose(pairwise, terms[torch.arange(3), torch.arange(3)], atol=1e-6)


def test_weighted_terms_equal_the_weighted_dot_product():
    g = torch.Generator().manual_seed(1)
    qi, qt, ci, ct = (torch.randn(2, 6, generator=g) for _ in range(4))
    w = torch.tensor([0.5, 2.0, 1.5, -1.0])
    terms = score_terms(qi, qt, ci, ct, w, normalize=False)  # [2, 2, 4]
    expected = (w[0] * qi + w[1] * qt) @ (w[2] * ci + w[3] * ct).T
    assert torch.allclose(terms.sum(-1), expected, atol=1e-5)
    assert torch.allclose(terms[..., 1], w[0] * w[3] * qi @ ct.T)


def test_learnable_weights_are_parameters_and_change_the_embedding(cfg):
    model = build_uniir("clip_sf", cfg, root=None, init="random", fusion_weights=True)
    assert "fusion_weights" in dict(model.named_parameters())
    side = _side(model, ["a red circle"], [1])
    with torch.no_grad():
        before = model.encode_query(side)
        model.fusion_weights.copy_(torch.tensor([3.0, 1.0, 1.0, 1.0]))
        after = model.encode_query(side)
        img, txt = model.unimodal(side)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, F.normalize(3 * img + txt, dim=-1), atol=1e-5)
    plain = build_uniir("clip_sf", cfg, root=None, init="random")
    assert "fusion_weights" not in dict(plain.named_parameters())
    assert "fusion_weights" not in plain.state_dict()


def test_gradients_reach_only_the_present_modality(clip_sf):
    side = _side(clip_sf, ["some text", "more text"], [0, 0])  # text only: image tower unused
    clip_sf.zero_grad()
    clip_sf.encode_query(side).sum().backward()
    assert clip_sf.clip.text_projection.grad is not None
    assert clip_sf.clip.visual.proj is None or clip_sf.clip.visual.proj.grad is None
    clip_sf.zero_grad()


def test_blip_sf_freezes_cross_attention_and_uses_its_temperature(blip_sf):
    frozen = [n for n, p in blip_sf.named_parameters() if not p.requires_grad]
    assert frozen and all("crossattention" in n or "itm_head" in n for n in frozen)
    assert blip_sf.loss_kind == "momentum_queue"
    assert blip_sf.logit_scale().item() == pytest.approx(1 / 0.07)


def test_factory_registry_and_errors(cfg, clip_sf):
    assert isinstance(clip_sf, UniIRModel) and isinstance(clip_sf, ClipSF)
    assert clip_sf.kind == "clip_sf" and clip_sf.loss_kind == "inbatch"
    assert set(fusion.REGISTRY) >= {"clip_sf", "blip_sf", "clip_ff", "blip_ff"}
    with pytest.raises(ValueError, match="unknown UniIR model"):
        build_uniir("clip_xx", cfg, root=None)
    with pytest.raises(ValueError, match="init must be"):
        build_uniir("clip_sf", cfg, root=None, init="pretrained")
    fusion.register("broken_kind", "uniir_lite.no_such_module:build")
    try:
        with pytest.raises(ImportError, match="broken_kind"):
            build_uniir("broken_kind", cfg, root=None)
    finally:
        del fusion.REGISTRY["broken_kind"]
    assert isinstance(BlipSF, type)


def test_clip_sf_saved_pretrained_loads_through_the_builder(cfg, tmp_path, monkeypatch):
    """The full profile's path (pretrained towers) tested offline: a CLIP saved in open_clip's
    local-dir layout comes back through `build_clip_sf` with identical embeddings."""
    from uniir_lite.models import clip as clip_module
    from uniir_lite.recipes import clip as clip_recipe

    source = build_uniir("clip_sf", cfg, root=None, init="random")
    with torch.no_grad():
        source.clip.logit_scale.fill_(1.5)
    folder = clip_module.save_clip_pretrained(source.clip, tmp_path / "clip")
    monkeypatch.setattr(clip_recipe, "train_or_load_clip",
                        lambda cfg, root: clip_module.build_clip(cfg, pretrained=folder))
    loaded = build_uniir("clip_sf", dataclasses.replace(cfg, pretrained=True), root=None)
    side = _side(source, ["a red circle", ""], [1, 1])
    with torch.no_grad():
        assert torch.allclose(loaded.encode_query(side), source.encode_query(side), atol=1e-5)
    assert loaded.recipe["base"] == "openai"


def test_single_modality_queries_drops_one_modality_on_tasks_6_and_8_only():
    from uniir_lite.data.mbeir import Query
    from uniir_lite.fusion.score import single_modality_queries

    q = lambda task: Query(f"9:{task}", "what is this?", "a.jpg", "image,text", None, ["1:1"], [], task)  # noqa: E731
    queries = [q(6), q(7), q(8)]
    image_only = single_modality_queries(queries, "image")
    assert [(x.txt, x.img_path, x.modality) for x in image_only] == [
        (None, "a.jpg", "image"), ("what is this?", "a.jpg", "image,text"), (None, "a.jpg", "image")]
    text_only = single_modality_queries(queries, "text")
    assert [(x.txt, x.img_path) for x in text_only] == [("what is this?", None), ("what is this?", "a.jpg"), ("what is this?", None)]
    assert queries[0].txt == "what is this?"  # the input is not modified
    with pytest.raises(ValueError):
        single_modality_queries(queries, "both")
