"""Feature fusion (CLIP_FF, BLIP_FF): shapes, that the modalities interact, that the token features
are CLIP's own, BLIP's pooler, the factory, the offline pretrained path, and a few training steps."""

import copy

import pytest
import torch
import torch.nn.functional as F

from uniir_lite.config import resolve
from uniir_lite.fusion import UniIRModel, build_uniir
from uniir_lite.fusion.feature import (
    TINY_T5_LR_MULTIPLIER,
    BlipFF,
    ClipFF,
    build_blip_ff,
    build_clip_ff,
    count_parameters,
)
from uniir_lite.losses import inbatch_contrastive_loss
from uniir_lite.models.blip import build_blip
from uniir_lite.models.clip import build_clip, save_clip_pretrained

N = 4
TEXTS = ["a red circle on a blue background", "two green squares", "", "find the same picture"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return resolve("tiny", OUT_DIR=str(out), FIG_DIR=str(out / "fig"))


@pytest.fixture(scope="module")
def clip(cfg):
    torch.manual_seed(0)
    return build_clip(cfg)[0]


@pytest.fixture(scope="module")
def clip_ff(cfg, clip):
    return build_clip_ff(cfg, clip=clip).eval()


@pytest.fixture(scope="module")
def blip_ff(cfg):
    return build_blip_ff(cfg, med=build_blip(cfg, head="med")).eval()


def images(seed: int, n: int = N, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [n, 3, S, S]


def side(txt: torch.Tensor, img: torch.Tensor) -> dict:
    n = img.shape[0]
    return {"txt": txt, "img": img, "txt_mask": torch.ones(n, dtype=torch.long), "img_mask": torch.ones(n, dtype=torch.long)}


# --- CLIP_FF -----------------------------------------------------------------------------------


def test_clip_ff_shapes_interface_and_parameters(clip_ff, clip):
    model = clip_ff
    tokens = model.tokenize(TEXTS)  # [n, L]
    img = images(0)
    with torch.no_grad():
        assert model.text_tokens(tokens).shape == (N, tokens.shape[1], 64)
        assert model.image_tokens(img).shape == (N, 1 + (32 // 4) ** 2, 64)
        q = model.encode_query(side(tokens, img))
        c = model.encode_candidate(side(tokens, img))
    assert isinstance(model, UniIRModel) and model.kind == "clip_ff" and model.loss_kind == "inbatch"
    assert q.shape == (N, 64) and model.embed_dim == 64 and model.image_size == 32
    assert torch.allclose(q.norm(dim=-1), torch.ones(N))  # normalised, as the interface says
    assert torch.equal(q, c)  # one encoder for queries and candidates
    assert model.logit_scale().item() == pytest.approx(clip.logit_scale.exp().item())
    # a 2-layer T5 stack without token embedding; the text projection is gone
    assert model.t5.embed_tokens is None and len(model.t5.block) == 2
    assert model.clip.text_projection is None
    assert count_parameters(model) == count_parameters(clip) - clip.text_projection.numel() + count_parameters(model, "t5.")
    assert model.lr_groups() == {"t5.": TINY_T5_LR_MULTIPLIER}
    assert clip.text_projection is not None  # the builder fine-tunes a copy


def test_clip_ff_token_features_are_open_clips(clip_ff, clip):
    """The CLS token of our image tokens is open_clip's image embedding, the patch tokens are its
    normalised last-layer tokens projected; the EOT text token, projected, is its text embedding."""
    model = clip_ff
    tokens, img = model.tokenize(TEXTS), images(1)
    with torch.no_grad():
        img_tok = model.image_tokens(img)  # [n, 1+P, d]
        txt_tok = model.text_tokens(tokens)  # [n, L, d]
        assert torch.allclose(img_tok[:, 0], clip.encode_image(img), atol=1e-5)
        inter = clip.visual.forward_intermediates(img, indices=1, normalize_intermediates=True, output_fmt="NLC")
        patches = inter["image_intermediates"][-1] @ clip.visual.proj  # [n, P, d]
        assert torch.allclose(img_tok[:, 1:], patches, atol=1e-5)
        eot = tokens.argmax(dim=-1)  # CLIP pools the EOT token (the largest id)
        txt_emb = txt_tok[torch.arange(N), eot] @ clip.text_projection  # [n, d]
        assert torch.allclose(txt_emb, clip.encode_text(tokens), atol=1e-5)


def test_clip_ff_fusion_is_t5_then_mean(clip_ff):
    model = clip_ff
    tokens, img = model.tokenize(TEXTS), images(2)
    with torch.no_grad():
        seq = torch.cat([model.text_tokens(tokens), model.image_tokens(img)], dim=1)  # [n, L+1+P, d]
        by_hand = model.t5(inputs_embeds=seq).last_hidden_state.mean(dim=1)
        assert torch.allclose(model.fuse(tokens, img), by_hand, atol=1e-6)
        assert torch.allclose(model.encode_query(side(tokens, img)), F.normalize(by_hand, dim=-1), atol=1e-6)


def test_clip_ff_modalities_interact_and_masks_are_ignored(clip_ff):
    model = clip_ff
    tokens = model.tokenize(TEXTS)
    a, b = images(3), images(4)
    with torch.no_grad():
        q_a = model.encode_query(side(tokens, a))
        q_b = model.encode_query(side(tokens, b))
        q_zero = model.encode_query(side(tokens, torch.zeros_like(a)))
        masked = side(tokens, a)
        masked["img_mask"] = torch.zeros(N, dtype=torch.long)
        q_masked = model.encode_query(masked)
    assert (q_a - q_b).norm(dim=-1).min() > 1e-3  # a changed image changes every fused query
    assert (q_a - q_zero).norm(dim=-1).min() > 1e-3  # the zero image is still encoded...
    assert torch.equal(q_a, q_masked)  # ...and the masks are not used (UniIR's CLIP_FF has none)


def test_clip_ff_pretrained_path_offline(cfg, clip, clip_ff, tmp_path):
    save_clip_pretrained(clip, tmp_path / "clip")
    model = build_clip_ff(cfg, pretrained=tmp_path / "clip").eval()
    tokens, img = model.tokenize(TEXTS), images(5)
    with torch.no_grad():
        assert torch.allclose(model.fuse(tokens, img), clip_ff.fuse(tokens, img), atol=1e-5)


def test_clip_ff_trains(clip_ff):
    """A few steps of UniIR's in-batch loss on one batch: the loss falls and the T5 mixer moves."""
    model = copy.deepcopy(clip_ff).train()
    q_side = side(model.tokenize(TEXTS), images(6))
    c_side = side(model.tokenize([""] * N), images(7))
    t5_before = copy.deepcopy(model.t5.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = inbatch_contrastive_loss(model.encode_query(q_side), model.encode_candidate(c_side), model.logit_scale())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0]
    assert any(not torch.equal(v, model.t5.state_dict()[k]) for k, v in t5_before.items())


# --- BLIP_FF -----------------------------------------------------------------------------------


def test_blip_ff_shapes_and_interface(blip_ff):
    model = blip_ff
    txt = model.tokenize(TEXTS)  # [n, L]
    assert (txt[:, 0] == 101).all()  # [CLS], as UniIR's BLIP_FF (not BLIP's [ENC])
    with torch.no_grad():
        q = model.encode_query(side(txt, images(0)))
        c = model.encode_candidate(side(txt, images(0)))
    assert isinstance(model, BlipFF) and model.kind == "blip_ff" and model.loss_kind == "momentum_queue"
    assert q.shape == (N, 64) and torch.equal(q, c) and torch.allclose(q.norm(dim=-1), torch.ones(N))
    assert model.text_encoder.pooler is not None and model.lr_groups() == {}
    assert model.logit_scale().item() == pytest.approx(1 / model.temp.item(), rel=1e-6)


def test_blip_ff_pooler_is_dense_tanh_of_cls(blip_ff):
    model = blip_ff
    txt, img = model.tokenize(TEXTS), images(8)
    with torch.no_grad():
        out = model.fused_states(txt, model.image_tokens(img))
        cls = out.last_hidden_state[:, 0]  # [n, width]
        dense = model.text_encoder.pooler.dense
        by_hand = torch.tanh(cls @ dense.weight.T + dense.bias)
        assert torch.allclose(out.pooler_output, by_hand, atol=1e-6)
        assert torch.allclose(model.fuse(txt, img), by_hand, atol=1e-6)


def test_blip_ff_cross_attends_to_the_image(blip_ff):
    model = blip_ff
    txt = model.tokenize(TEXTS)
    with torch.no_grad():
        q_a = model.encode_query(side(txt, images(9)))
        q_b = model.encode_query(side(txt, images(10)))
        one = images(9)
        one[0, :, :4, :4] += 3.0  # one patch of the first image
        q_one = model.encode_query(side(txt, one))
    assert (q_a - q_b).norm(dim=-1).min() > 1e-4
    assert (q_a[0] - q_one[0]).norm() > 1e-5 and torch.equal(q_a[1:], q_one[1:])


def test_blip_ff_starts_from_copies_of_the_given_towers(cfg):
    med = build_blip(cfg, head="med")
    model = build_blip_ff(cfg, med=med)
    for k, v in med.retrieval.text_encoder.state_dict().items():
        assert torch.equal(v, model.text_encoder.state_dict()[k])
    for k, v in med.retrieval.vision_model.state_dict().items():
        assert torch.equal(v, model.vision_model.state_dict()[k])
    assert model.text_encoder is not med.retrieval.text_encoder
    assert model.temp.item() == pytest.approx(0.07)


def test_blip_ff_pretrained_path_offline(cfg, tmp_path):
    retrieval = build_blip(cfg, head="retrieval")
    retrieval.save_pretrained(tmp_path / "blip")
    model = build_blip_ff(cfg, pretrained=tmp_path / "blip").eval()
    for k, v in retrieval.text_encoder.state_dict().items():
        assert torch.allclose(v, model.text_encoder.state_dict()[k])
    with torch.no_grad():
        assert torch.isfinite(model.fuse(model.tokenize(TEXTS), images(11))).all()


def test_factory_builds_random_feature_fusion_models(cfg):
    """`build_uniir` finds both kinds; `init="random"` needs no trained tower (and no data)."""
    for kind, cls in (("clip_ff", ClipFF), ("blip_ff", BlipFF)):
        model = build_uniir(kind, cfg, root=None, init="random")
        assert isinstance(model, cls) and model.recipe["kind"] == kind and model.recipe["init"] == "random"
        again = build_uniir(kind, cfg, root=None, init="random")
        for (k, v), w in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(v, w), k  # seeded: the same untrained model every time
