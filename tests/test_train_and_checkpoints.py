"""The trainer, checkpoints, the one train-or-load, image loading and offline tokenizers."""

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from uniir_lite.checkpoints import has_checkpoint, load_checkpoint, save_checkpoint, saved_log, train_or_load
from uniir_lite.data.images import ImageLoader
from uniir_lite.models.tokenizers import BERT_VOCAB_SIZE, CLIP_VOCAB_SIZE, ClipTokenizer, bert_tokenizer
from uniir_lite.train import TrainConfig, cosine_schedule, fit, param_groups


def test_fit_learns_a_linear_map():
    torch.manual_seed(0)
    w_true = torch.randn(8, 1)
    x = torch.randn(256, 8)
    batches = [{"x": x[i:i + 32], "y": x[i:i + 32] @ w_true} for i in range(0, 256, 32)]
    model = torch.nn.Linear(8, 1)

    def loss_fn(m, b):
        return {"loss": torch.nn.functional.mse_loss(m(b["x"]), b["y"])}

    log = fit(model, loss_fn, batches, TrainConfig(max_steps=200, lr=0.05, weight_decay=0.0, log_every=20, progress=False))
    assert list(log.step) == list(range(20, 201, 20))
    assert log.loss.iloc[-1] < 0.01 * log.loss.iloc[0]
    assert log.lr.iloc[-1] == pytest.approx(0.0, abs=1e-9)  # cosine to zero
    assert (log.samples_per_s > 0).all()


def test_fit_writes_periodic_checkpoints(tmp_path):
    model = torch.nn.Linear(2, 1)
    seen = []

    def loss_fn(m, b):
        if has_checkpoint(tmp_path / "ckpt"):
            seen.append(load_checkpoint(tmp_path / "ckpt")[1]["step"])
        return {"loss": m(b).pow(2).mean()}

    cfg = TrainConfig(max_steps=7, progress=False, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=3,
                      model_config={"kind": "linear"})
    fit(model, loss_fn, [torch.ones(4, 2)], cfg)
    assert sorted(set(seen)) == [3, 6]
    state, config = load_checkpoint(tmp_path / "ckpt")
    assert config == {"kind": "linear", "step": 7} and torch.equal(state["weight"], model.weight.detach())


def test_fit_stops_on_a_nan_loss():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(FloatingPointError, match="step 0"):
        fit(model, lambda m, b: {"loss": m(b).sum() * float("nan")}, [torch.ones(4, 2)], TrainConfig(max_steps=3, progress=False))


def test_schedule_and_no_decay_groups():
    assert cosine_schedule(0, 100) == 1.0 and cosine_schedule(50, 100) == pytest.approx(0.5)
    assert cosine_schedule(0, 100, warmup_steps=10) == pytest.approx(0.1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.logit_scale = torch.nn.Parameter(torch.ones([]))
    decay, rest = param_groups(model, 0.2)
    assert len(decay["params"]) == 1 and decay["params"][0] is model[0].weight
    assert len(rest["params"]) == 4 and rest["weight_decay"] == 0.0


def test_checkpoint_round_trip_and_replace(tmp_path):
    model = torch.nn.Linear(3, 2)
    target = tmp_path / "ckpt"
    save_checkpoint(target, model, {"width": 3})
    assert has_checkpoint(target)
    state, config = load_checkpoint(target)
    assert config == {"width": 3} and torch.equal(state["weight"], model.weight.detach())
    save_checkpoint(target, torch.nn.Linear(3, 2), {"width": 4})  # replaces the old one whole
    assert load_checkpoint(target)[1] == {"width": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert not (target / "model.safetensors").read_bytes().startswith(b"\x80")  # not a pickle
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_image_loader(tmp_path):
    Image.fromarray(np.full((10, 10, 3), 255, np.uint8)).save(tmp_path / "white.png")
    loader = ImageLoader(tmp_path, image_size=4)
    x = loader("white.png")
    assert x.shape == (3, 4, 4)
    assert torch.allclose(x[0], torch.full((4, 4), (1 - 0.48145466) / 0.26862954))
    imgs, mask = loader.batch(["white.png", None])
    assert imgs.shape == (2, 3, 4, 4) and mask.tolist() == [1.0, 0.0] and imgs[1].abs().sum() == 0
    with pytest.raises(FileNotFoundError, match="nope.png"):
        loader("nope.png")


def test_image_cache_is_shared_and_sees_rewritten_files(tmp_path):
    Image.fromarray(np.full((10, 10, 3), 255, np.uint8)).save(tmp_path / "img.png")
    first = ImageLoader(tmp_path, image_size=4)("img.png")
    assert ImageLoader(tmp_path, image_size=4)("img.png") is first  # another loader: decoded once
    assert ImageLoader(tmp_path, image_size=4, cache=False)("img.png") is not first
    big = ImageLoader(tmp_path, image_size=224)  # real-size images are not kept unless asked
    assert big("img.png") is not big("img.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "img.png")
    os.utime(tmp_path / "img.png", ns=(1, 1))  # a rewrite within the clock's resolution still differs
    again = ImageLoader(tmp_path, image_size=4)("img.png")
    assert again[0, 0, 0] < 0 < first[0, 0, 0]  # black now, white before


def test_clip_tokenizer_cache_returns_what_the_bpe_returns():
    import open_clip

    reference = open_clip.tokenizer.SimpleTokenizer(context_length=8)
    ClipTokenizer._memos.pop(8, None)
    tok = ClipTokenizer(context_length=8, cache_size=3)
    for texts in (["a red circle", "", "a red circle"], ["two blue stars", "a red circle", "x", "y"], []):
        ids = tok(texts)
        assert ids.shape == (len(texts), 8)
        if texts:
            assert torch.equal(ids, reference(texts, context_length=8))
    assert len(tok._cache) <= 4  # cleared when full: never more than the cap plus one batch
    assert ClipTokenizer(context_length=8)._cache is tok._cache  # one memo per context length
    assert torch.equal(ClipTokenizer(context_length=9)(["a red circle"]), reference(["a red circle"], context_length=9))


def test_offline_tokenizers_have_their_real_vocabularies():
    clip = ClipTokenizer(context_length=8)
    ids = clip(["a red circle"])
    assert clip.vocab_size == CLIP_VOCAB_SIZE and ids.shape == (1, 8)
    assert clip.decode(ids[0]).replace("<start_of_text>", "").replace("<end_of_text>", "").strip() == "a red circle"
    bert = bert_tokenizer()
    assert bert.vocab_size == BERT_VOCAB_SIZE
    ids = bert("a red circle")["input_ids"]
    assert bert.unk_token_id not in ids and len(ids) == 5


def test_samples_are_counted_from_the_first_tensor_whatever_the_dict_order():
    from uniir_lite.train import _batch_size

    assert _batch_size({"name": "x", "query": {"txt": torch.zeros(4, 7)}, "task_id": torch.zeros(4)}) == 4
    assert _batch_size({"temperature": torch.tensor(0.07), "img": torch.zeros(6, 3)}) == 6  # a 0-d tensor is skipped
    assert _batch_size([None, (torch.zeros(5, 2),)]) == 5


@dataclasses.dataclass
class _Recipe:
    width: int
    tasks: tuple[str, ...] = ("a", "b")  # a tuple: compared as the JSON list it is saved as


class _Calls:
    """`build` and `train` for `train_or_load`, counting how often the model is trained."""

    def __init__(self, recipe: _Recipe):
        self.recipe, self.trained = recipe, 0

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(self.recipe.width, 1)

    def train(self, model: torch.nn.Module) -> pd.DataFrame:
        self.trained += 1
        with torch.no_grad():
            model.bias.fill_(float(self.trained))
        return pd.DataFrame({"step": [1, 2], "loss": [1.0, 0.5]})


def _run(directory, recipe, force=False, extra=None):
    calls = _Calls(recipe)
    trained = train_or_load(directory, recipe, calls.build, calls.train, force=force, extra=extra)
    return trained, calls.trained


def test_train_or_load_trains_once_then_loads_the_same_recipe(tmp_path):
    first, n = _run(tmp_path / "m", _Recipe(3), extra=lambda m: {"note": "kept"})
    assert n == 1 and not first.loaded and not first.model.training
    assert first.saved["complete"] and first.saved["recipe"] == {"width": 3, "tasks": ["a", "b"]}
    again, n = _run(tmp_path / "m", _Recipe(3))
    assert n == 0 and again.loaded and again.saved["note"] == "kept"
    assert again.model.bias.item() == 1.0  # the trained weights, not a fresh build
    assert again.log.equals(first.log) and saved_log(tmp_path / "m").equals(first.log)


def test_train_or_load_retrains_on_another_recipe_force_or_an_unfinished_checkpoint(tmp_path):
    _run(tmp_path / "m", _Recipe(3))
    assert _run(tmp_path / "m", _Recipe(3, tasks=("a",)))[1] == 1  # another recipe
    assert _run(tmp_path / "m", _Recipe(3, tasks=("a",)), force=True)[1] == 1
    state, saved = load_checkpoint(tmp_path / "m")
    model = torch.nn.Linear(3, 1)
    model.load_state_dict(state)
    save_checkpoint(tmp_path / "m", model, {**saved, "complete": False})  # a run killed before its end
    assert _run(tmp_path / "m", _Recipe(3, tasks=("a",)))[1] == 1


def test_train_or_load_retrains_when_the_synthetic_benchmark_changed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    manifest = {"generator": "uniir_lite.data.synthetic", "version": 2, "size": "tiny", "seed": 0, "image_px": 64,
                "sizes": {"eval_queries": 150}, "complete": True, "images": 10}

    def run(**changes):
        (data / "synthetic.json").write_text(json.dumps({**manifest, **changes}))
        calls = _Calls(_Recipe(3))
        trained = train_or_load(tmp_path / "m", _Recipe(3), calls.build, calls.train, data=data)
        return trained, calls.trained

    first, n = run()
    assert n == 1 and first.saved["data"]["version"] == 2
    assert run(images=11)[1] == 0  # what was written, not how: the same benchmark
    assert run(version=3)[1] == 1 and run(version=3)[1] == 0
    assert run(sizes={"eval_queries": 50})[1] == 1
    (data / "synthetic.json").unlink()  # real M-BEIR: no manifest, identity None
    assert train_or_load(tmp_path / "m", _Recipe(3), _Calls(_Recipe(3)).build, _Calls(_Recipe(3)).train,
                         data=data).saved["data"] is None


def test_train_or_load_keeps_a_log_in_parts(tmp_path):
    def train(model):
        return {"aware": pd.DataFrame({"loss": [2.0]}), "blind": pd.DataFrame({"loss": [3.0]})}

    train_or_load(tmp_path / "m", {"k": 1}, lambda: torch.nn.Linear(2, 1), train)
    loaded = train_or_load(tmp_path / "m", {"k": 1}, lambda: torch.nn.Linear(2, 1), lambda m: pytest.fail("trained"))
    assert loaded.loaded and set(loaded.log) == {"aware", "blind"} and loaded.log["blind"]["loss"].tolist() == [3.0]
