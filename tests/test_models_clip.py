"""CLIP through open_clip: the builder per profile, the loss, train-or-load, embedding (notebook 01)."""

import dataclasses
import math

import open_clip
import pytest
import torch

from uniir_lite.checkpoints import load_checkpoint
from uniir_lite.config import resolve
from uniir_lite.data.images import ImageLoader
from uniir_lite.data.pairs import image_caption_pairs
from uniir_lite.data.synthetic import SynthSize, write_benchmark
from uniir_lite.models import clip as clip_module
from uniir_lite.models.clip import build_clip, clip_loss, encode_images, encode_texts, image_token_width, save_clip_pretrained
from uniir_lite.recipes import clip as clip_recipe
from uniir_lite.recipes.clip import ClipRecipe, clip_checkpoint_dir, clip_training_log, train_clip, train_or_load_clip
from uniir_lite.models.tokenizers import CLIP_VOCAB_SIZE

MICRO = SynthSize("micro", eval_queries=8, pool_size=16, train_large=24, train_small=8, upsample=2, entities=8)


@pytest.fixture
def cfg(tmp_path):
    return resolve("tiny", OUT_DIR=str(tmp_path / "out"), FIG_DIR=str(tmp_path / "fig"), MAX_STEPS=8, BATCH_SIZE=16,
                   EMBED_DIM=32, DEVICE="cpu")


@pytest.fixture(scope="module")
def micro_root(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("micro") / "bench", MICRO, seed=0)


def test_clip_loss_matches_open_clip_and_is_symmetric():
    torch.manual_seed(0)
    img, txt = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.tensor(7.5)
    ours = clip_loss(img, txt, scale)
    theirs = open_clip.ClipLoss()(torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1), scale)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(ours, clip_loss(txt, img, scale), atol=1e-6)  # both directions, averaged
    assert torch.allclose(clip_loss(3 * img, txt, scale), ours, atol=1e-6)  # normalises its inputs


def test_clip_loss_limits():
    # all embeddings equal: every softmax is uniform over the batch -> log N
    same = torch.ones(5, 4)
    assert clip_loss(same, same, 10.0).item() == pytest.approx(math.log(5), abs=1e-6)
    # orthogonal matching pairs at a large scale: the loss vanishes
    eye = torch.eye(4)
    assert clip_loss(eye, eye, 100.0).item() < 1e-6
    # swapping two captions makes it large
    assert clip_loss(eye, eye[[1, 0, 2, 3]], 100.0).item() > 10


def test_tiny_build_follows_the_knobs(cfg):
    model, tokenizer = build_clip(cfg)
    assert not model.training
    assert model.uniir_model_cfg["embed_dim"] == cfg.embed_dim
    assert tokenizer.vocab_size == CLIP_VOCAB_SIZE and tokenizer.context_length == model.context_length
    img_emb = model.encode_image(torch.randn(2, 3, cfg.image_size, cfg.image_size))
    txt_emb = model.encode_text(tokenizer(["a red circle", "two blue squares on the sand"]))
    assert img_emb.shape == txt_emb.shape == (2, cfg.embed_dim)
    assert model.logit_scale.exp().item() == pytest.approx(1 / clip_module.INIT_TEMPERATURE, rel=1e-5)
    bigger, _ = build_clip(dataclasses.replace(cfg, image_size=48, embed_dim=24))
    assert bigger.encode_image(torch.randn(1, 3, 48, 48)).shape == (1, 24)


def test_pretrained_path_round_trips_offline(cfg, tmp_path):
    cfg = dataclasses.replace(cfg, embed_dim=open_clip.get_model_config(clip_module.TINY_ARCH)["embed_dim"])
    torch.manual_seed(1)
    model, tokenizer = build_clip(cfg)
    save_clip_pretrained(model, tmp_path / "saved")
    loaded, loaded_tokenizer = build_clip(cfg, pretrained=tmp_path / "saved")
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    tokens = tokenizer(["a green star", "a dotted pink dress"])
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), loaded.encode_image(images))
        assert torch.allclose(model.encode_text(tokens), loaded.encode_text(tokens))
    assert loaded_tokenizer.context_length == tokenizer.context_length
    # a weights file for a named architecture (its shapes as configured) goes through the same builder
    loaded_file, _ = build_clip(cfg, arch=clip_module.TINY_ARCH, pretrained=tmp_path / "saved" / "open_clip_model.safetensors")
    assert torch.allclose(model.logit_scale, loaded_file.logit_scale)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), loaded_file.encode_image(images), atol=1e-6)


def test_full_profile_asks_for_openai_weights(cfg, monkeypatch):
    seen = {}

    def fake_create_model(name, **kwargs):
        seen.update(name=name, **kwargs)
        raise RuntimeError("offline")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(RuntimeError, match="offline"):
        build_clip(dataclasses.replace(cfg, profile="full", pretrained=True))
    assert seen["name"] == "ViT-B-32" and seen["pretrained"] == "openai"
    assert seen["force_quick_gelu"] and seen["require_pretrained"]
    seen.clear()
    with pytest.raises(RuntimeError, match="offline"):
        build_clip(dataclasses.replace(cfg, profile="gpu"), arch="ViT-L-14")
    assert seen["name"] == "ViT-L-14" and "pretrained" not in seen  # real size, random init
    assert seen["embed_dim"] == cfg.embed_dim and seen["force_image_size"] == cfg.image_size


def test_encoders_are_normalised_and_batch_size_free(cfg, micro_root):
    model, tokenizer = build_clip(cfg)
    pairs = image_caption_pairs(micro_root, "test")[:7]
    loader = ImageLoader(micro_root, cfg.image_size)
    img = encode_images(model, loader, [p.img_path for p in pairs])
    img_small = encode_images(model, loader, [p.img_path for p in pairs], batch_size=3)
    txt = encode_texts(model, tokenizer, [p.caption for p in pairs])
    raw = encode_texts(model, tokenizer, [p.caption for p in pairs], normalize=False)
    assert img.shape == txt.shape == (7, cfg.embed_dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(7), atol=1e-5)
    assert torch.allclose(img, img_small, atol=1e-5)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), txt, atol=1e-5)


def test_training_lowers_the_loss_and_a_fixed_temperature_stays_fixed(cfg, micro_root):
    recipe = ClipRecipe.from_config(cfg, steps=30, lr=3e-3)
    model, _, log = train_clip(cfg, micro_root, recipe)
    assert not model.training and list(log["step"]) == [10, 20, 30]
    assert log["loss"].iloc[-1] < log["loss"].iloc[0] - 0.5  # windows of 10 steps
    frozen, _, log = train_clip(cfg, micro_root, ClipRecipe.from_config(cfg, steps=2, fixed_temperature=0.5))
    assert frozen.logit_scale.exp().item() == pytest.approx(2.0, rel=1e-5)
    assert (log["logit_scale"] - 2.0).abs().max() < 1e-5


def test_log_every_step_logs_every_step_and_trains_the_same(cfg, micro_root):
    recipe = ClipRecipe.from_config(cfg, steps=4)
    model, _, log = train_clip(cfg, micro_root, recipe)
    stepwise, _, every = train_clip(cfg, micro_root, recipe, log_every=1)
    assert list(log["step"]) == [4] and list(every["step"]) == [1, 2, 3, 4]
    assert every["loss"].mean() == pytest.approx(log["loss"].iloc[0], rel=1e-4)  # the 4-step window is their mean
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), stepwise.parameters()))


def test_train_or_load_saves_then_loads(cfg, micro_root, monkeypatch):
    model, _ = train_or_load_clip(cfg, micro_root)
    _, saved = load_checkpoint(clip_checkpoint_dir(cfg))
    assert saved["recipe"]["steps"] == cfg.max_steps // 2 and len(clip_training_log(cfg)) >= 1
    # a second call loads: no training, same weights
    monkeypatch.setattr(clip_recipe, "fit_clip", lambda *a, **k: pytest.fail("trained again"))
    again, _ = train_or_load_clip(cfg, micro_root)
    assert not again.training
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    # another recipe (here: another seed) does not reuse the checkpoint, nor does `force`
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        train_or_load_clip(dataclasses.replace(cfg, seed=cfg.seed + 1), micro_root)
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        train_or_load_clip(cfg, micro_root, force=True)


def test_image_token_width_is_the_built_towers(cfg):
    """Read from the config without building anything, it is the width of the tokens the ViT outputs."""
    model, _ = build_clip(cfg)
    assert image_token_width(cfg) == model.visual.ln_post.normalized_shape[0] == model.visual.transformer.width
