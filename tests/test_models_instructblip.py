"""The instruction-aware Q-Former, the question tasks, the probe, and the image-token guard of InstructBLIP."""

import dataclasses

import pytest
import torch

from uniir_lite.checkpoints import as_json
from uniir_lite.config import resolve
from uniir_lite.models import instructblip as ib
from uniir_lite.recipes import instructblip as ib_recipe
from uniir_lite.models.tokenizers import bert_tokenizer


@pytest.fixture(scope="module")
def cfg():
    return dataclasses.replace(resolve("tiny"), device="cpu")


@pytest.fixture(scope="module")
def tiny_full(cfg):
    torch.manual_seed(0)
    return ib.build_instructblip(cfg)


SCENE = {"background": "sky", "count": 4, "groups": [
    {"shape": "star", "colour": "red", "count": 2, "size": "large", "pattern": "dotted", "positions": ["top left", "top right"]},
    {"shape": "star", "colour": "blue", "count": 1, "size": "small", "pattern": "plain", "positions": ["bottom left"]},
    {"shape": "circle", "colour": "red", "count": 1, "size": "medium", "pattern": "striped", "positions": ["bottom right"]},
]}


def test_questions_have_one_right_answer():
    # two kinds of star: "what colour is the star?" is ambiguous, only the circle is asked about
    assert ib.scene_questions(SCENE, "colour") == [({"shape": "circle", "colour": "red"}, "red")]
    # red is used twice: only the blue object can be asked for its shape
    assert ib.scene_questions(SCENE, "shape") == [({"shape": "star", "colour": "blue"}, "star")]
    # the two red stars have no single position
    assert [a for _, a in ib.scene_questions(SCENE, "position")] == ["bottom left", "bottom right"]
    assert ib.scene_questions(SCENE, "count") == [({}, "four")]
    assert [a for _, a in ib.scene_questions(SCENE, "pattern")] == ["dotted", "plain", "striped"]
    assert set(ib.HELD_IN).isdisjoint(ib.HELD_OUT) and set(ib.HELD_IN) | set(ib.HELD_OUT) == set(ib.TASKS)
    for task in ib.TASKS.values():
        assert len(task.templates) >= 3 and len(set(task.templates)) == len(task.templates)
        for slots, answer in ib.scene_questions(SCENE, task.name):
            assert answer in task.answers and "{" not in task.templates[0].format(**slots)


def test_instructions_fit_without_truncation():
    longest = max((t.format(shape="triangle", colour="purple") for task in ib.TASKS.values() for t in task.templates), key=len)
    assert len(bert_tokenizer()(longest)["input_ids"]) <= ib.MAX_INSTRUCTION_TOKENS
    ids, mask = ib.tokenize_instructions([longest, "Where?"])
    assert ids.shape == (2, ib.MAX_INSTRUCTION_TOKENS) and mask[1].sum() < mask[0].sum()
    assert bert_tokenizer().unk_token_id not in ids[0].tolist()


def test_make_examples_is_deterministic_and_uses_every_template():
    scenes = [("a.jpg", SCENE)] * 30
    a, b = ib.make_examples(scenes, ["colour", "background"], seed=3), ib.make_examples(scenes, ["colour", "background"], seed=3)
    assert a.questions == b.questions and torch.equal(a.input_ids, b.input_ids)
    assert len(a) == 60 and len(a.of_task("colour")) == 30
    assert set(a.of_task("background").questions) == set(ib.TASKS["background"].templates)
    assert {ib.ANSWERS[i] for i in a.of_task("colour").answer.tolist()} == {"red"}


def test_aware_features_depend_on_the_instruction_blind_ones_do_not():
    torch.manual_seed(0)
    config = ib.qformer_config("tiny", encoder_hidden_size=32)
    aware = ib.InstructQFormer(config, 4).eval()
    blind = ib.InstructQFormer(config, 4, instruction_aware=False).eval()
    blind.load_state_dict(aware.state_dict())
    z = torch.randn(1, 10, 32).expand(2, -1, -1)  # one image, two instructions
    ids, mask = ib.tokenize_instructions(["What colour is the star?", "Where is the red circle?"])
    with torch.no_grad():
        fa, fb = aware(z, ids, mask), blind(z, ids, mask)
        f_none = aware(z)  # no instruction at all: the blind computation
    assert fa.shape == (2, 4, 64)
    assert (fa[0] - fa[1]).abs().max() > 1e-3
    assert torch.equal(fb[0], fb[1]) and torch.allclose(fb, f_none)
    # padding is masked: extra pad tokens change nothing
    long_ids, long_mask = ib.tokenize_instructions(["What colour is the star?"], max_length=24)
    with torch.no_grad():
        assert torch.allclose(aware(z[:1], long_ids, long_mask), fa[:1], atol=1e-5)
    # the attention weights of the queries over the image tokens are a distribution
    weights = ib.cross_attention_weights(aware, z, ids, mask)
    assert weights.shape == (2, 2, 2, 4, 10) and torch.allclose(weights.sum(-1), torch.ones(2, 2, 2, 4), atol=1e-5)


def test_qformer_wiring_equals_transformers_instructblip(tiny_full):
    """Our Q-Former call (queries, mask, instruction) gives the features of transformers' own model."""
    config = tiny_full.config
    ours = ib.InstructQFormer(config.qformer_config, config.num_query_tokens)
    ours.qformer.load_state_dict(tiny_full.qformer.state_dict())
    with torch.no_grad():
        ours.query_tokens.copy_(torch.randn_like(ours.query_tokens))
        tiny_full.query_tokens.copy_(ours.query_tokens)
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = ib.tokenize_instructions(["What colour is the star?", "Count the shapes in this image."])
    with torch.no_grad():
        z = tiny_full.vision_model(pixel_values=pixels).last_hidden_state
        theirs = tiny_full.get_image_features(pixels, qformer_input_ids=ids, qformer_attention_mask=mask)
        k = config.num_query_tokens
        assert torch.allclose(ours.eval()(z, ids, mask), theirs.qformer_outputs.last_hidden_state[:, :k], atol=1e-5)


def test_language_model_ignores_the_image_without_image_tokens(tiny_full):
    config = tiny_full.config
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = ib.tokenize_instructions(["What colour is the star?"])
    prompt = ids[:, : int(mask.sum())]

    def logits(input_ids, i):
        with torch.no_grad():
            return tiny_full(pixel_values=pixels[i : i + 1], qformer_input_ids=ids, qformer_attention_mask=mask,
                             input_ids=input_ids).logits

    assert torch.equal(logits(prompt, 0), logits(prompt, 1))  # silently image-blind
    with pytest.raises(ib.MissingImageTokens, match="0 copies of image_token_index"):
        ib.check_image_tokens(prompt, config)
    with_tokens, with_mask = ib.add_image_tokens(prompt, None, config)
    ib.check_image_tokens(with_tokens, config)
    assert with_tokens.shape[1] == prompt.shape[1] + config.num_query_tokens and with_mask.all()
    assert (logits(with_tokens, 0) - logits(with_tokens, 1)).abs().max() > 1e-4
    with pytest.raises(ib.MissingImageTokens, match=f"expected num_query_tokens={config.num_query_tokens}"):
        ib.check_image_tokens(with_tokens[:, 1:], config)  # one placeholder short
    unset = type(config)(**{**config.to_dict(), "image_token_index": None})
    with pytest.raises(ib.MissingImageTokens, match="is None"):
        ib.check_image_tokens(with_tokens, unset)


def test_pretrained_path_loads_a_saved_model_offline(cfg, tiny_full, tmp_path):
    tiny_full.save_pretrained(tmp_path)
    loaded = ib.build_instructblip(cfg, pretrained=tmp_path)
    pixels = torch.randn(1, 3, 32, 32)
    ids, mask = ib.tokenize_instructions(["Where is the red circle?"])
    prompt, prompt_mask = ib.add_image_tokens(ids[:, : int(mask.sum())], None, tiny_full.config)
    with torch.no_grad():
        a = tiny_full(pixel_values=pixels, qformer_input_ids=ids, qformer_attention_mask=mask, input_ids=prompt).logits
        b = loaded(pixel_values=pixels, qformer_input_ids=ids, qformer_attention_mask=mask, input_ids=prompt).logits
    assert torch.equal(a, b)
    assert loaded.config.image_token_index == tiny_full.config.image_token_index


def test_image_tokens_are_the_vits_tokens(cfg):
    from uniir_lite.models.clip import build_clip

    torch.manual_seed(0)
    visual = build_clip(cfg)[0].visual.eval()
    images = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        x = visual.ln_pre(visual.positional_embedding + torch.cat(
            [visual.class_embedding.expand(3, 1, -1), visual.conv1(images).flatten(2).transpose(1, 2)], dim=1))
        blocks = visual.transformer.resblocks
        penultimate = x
        for block in blocks[:-1]:
            penultimate = block(penultimate)
        last = blocks[-1](penultimate)
    grid = cfg.image_size // visual.patch_size[0]
    tokens = ib.image_tokens(visual, images)
    assert tokens.shape == (3, 1 + grid * grid, ib.vision_width(visual))
    assert torch.allclose(tokens, visual.ln_post(penultimate), atol=1e-5)
    assert torch.allclose(ib.image_tokens(visual, images, layer=-1), visual.ln_post(last), atol=1e-5)


def test_training_learns_a_planted_answer():
    """The background is written into the class token: both variants learn to read it."""
    torch.manual_seed(0)
    backgrounds = ib.TASKS["background"].answers
    scenes = [(f"{i}.jpg", {**SCENE, "background": backgrounds[i % 6]}) for i in range(96)]
    examples = ib.make_examples(scenes, ["background"], seed=0)
    embeds = torch.randn(96, 5, 32) * 0.1
    embeds[torch.arange(96), 0, torch.arange(96) % 6] += 3.0
    recipe = ib_recipe.InstructRecipe(profile="tiny", num_query_tokens=2, head_width=32, steps=40, batch_size=24, seed=0,
                               lr=1e-2, encoder={}, freeze_word_embeddings=True)
    models = ib_recipe.build_vqa_pair(recipe, embeds.shape[-1])
    histories = ib_recipe.fit_vqa_pair(models, resolve("tiny"), recipe, examples, embeds)
    for name, model in models.items():
        assert histories[name].loss.iloc[-1] < 0.3 * histories[name].loss.iloc[0], name
        assert ib.answer_hits(model, examples, embeds, "background").mean() > 0.9, name
    assert not models["aware"].qformer.qformer.embeddings.word_embeddings.weight.requires_grad


def test_linear_probe_separates_blobs_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 8, generator=g) + 4 * torch.nn.functional.one_hot(y, 8).float()
    assert ib.linear_probe_hits(x[:200], y[:200], x[200:], y[200:], 3).mean() > 0.95
    noise = torch.randn(300, 8, generator=g)
    assert ib.linear_probe_hits(noise[:200], y[:200], noise[200:], y[200:], 3).mean() < 0.6


def test_recipe_follows_the_profile(cfg):
    tiny = ib_recipe.InstructRecipe.from_config(cfg)
    assert tiny.tasks == ib.HELD_IN and tiny.freeze_word_embeddings and tiny.num_query_tokens == 8
    assert as_json(tiny)["tasks"] == list(ib.HELD_IN)  # as the checkpoint compares it
    big = ib_recipe.InstructRecipe.from_config(resolve("gpu"))
    assert big.num_query_tokens == 32 and not big.freeze_word_embeddings
    assert ib.qformer_config("gpu", 768).hidden_size == 768


def test_held_out_templates_are_never_used_for_training():
    scenes = [("a.jpg", SCENE)] * 40
    train = ib.make_examples(scenes, ["colour", "background"], seed=0, templates=ib.TRAIN_TEMPLATES)
    new = ib.make_examples(scenes, ["colour", "background"], seed=0, templates=ib.HELD_OUT_TEMPLATES)
    assert set(ib.TRAIN_TEMPLATES).isdisjoint(ib.HELD_OUT_TEMPLATES)
    assert set(train.of_task("background").questions) == {ib.TASKS["background"].templates[j] for j in ib.TRAIN_TEMPLATES}
    assert set(new.of_task("background").questions) == {ib.TASKS["background"].templates[3]}
    assert not set(new.questions) & set(train.questions) and torch.equal(new.answer, train.answer)
    assert ib_recipe.InstructRecipe.from_config(resolve("tiny")).templates == ib.TRAIN_TEMPLATES


def test_patch_region_marks_the_patches_around_a_cell():
    # patch centres at 1/8, 3/8, ...; the top-left cell's centre (0.28, 0.28) is 0.13 from (3/8, 3/8),
    # 0.18 from (1/8, 3/8) and 0.22 from (1/8, 1/8): three patches of the top-left quadrant
    top_left = ib.patch_region("top left", 4).reshape(4, 4)
    assert top_left.sum() == 3 and top_left[0, 1] and top_left[1, 0] and top_left[1, 1] and not top_left[0, 0]
    assert ib.patch_region("bottom right", 4).reshape(4, 4)[2:, 2:].sum() == 3
    assert (ib.patch_region("top left", 4) * ib.patch_region("top right", 4)).sum() == 0


def test_answer_hits_and_patch_attention():
    torch.manual_seed(0)
    examples = ib.make_examples([("a.jpg", SCENE)] * 6, ["pattern"], seed=0)
    embeds = torch.randn(6, 17, 32)
    model = ib.InstructVQA(ib.qformer_config("tiny", 32), 4, 32).eval()
    hits = ib.answer_hits(model, examples, embeds, "pattern")
    assert hits.shape == (len(examples),) and set(hits.tolist()) <= {0.0, 1.0}
    w = ib.patch_attention(model.qformer, embeds[examples.img_idx], examples.input_ids, examples.attention_mask)
    assert w.shape == (len(examples), 16) and torch.allclose(w.sum(1), torch.ones(len(examples)))
