"""UniIR's recipe (`uniir_lite.multitask`) and a UniIR model's evaluation (`uniir_lite.evaluation`):
instructed embedding, training, train-or-load, on the mini M-BEIR fixture (real record formats) with
tiny random towers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import uniir_lite.evaluation as evaluation
import uniir_lite.multitask as multitask
from uniir_lite.config import resolve
from uniir_lite.data.mbeir import format_string, instructions_path, query_path, read_queries
from uniir_lite.evaluation import load_pairs
from uniir_lite.metrics import bootstrap_average
from uniir_lite.fusion import build_uniir
from uniir_lite.fusion import UniIRModel
from uniir_lite.instructions import InstructionTable

MINI = Path(__file__).parent / "fixtures" / "mbeir_mini"


@pytest.fixture()
def cfg(tmp_path):
    return dataclasses.replace(resolve("tiny"), out_dir=tmp_path, device="cpu", batch_size=3, eval_batch_size=4)


class _Recorder(UniIRModel):
    """Records the texts it is asked to tokenize; embeddings are constant."""

    kind, image_size = "recorder", 8

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.w = torch.nn.Parameter(torch.ones(2))

    def tokenize(self, texts):
        self.texts += list(texts)
        return torch.zeros(len(texts), 4, dtype=torch.long)

    @property
    def embed_dim(self) -> int:
        return 2

    def encode_query(self, side):
        return self.w.expand(side["img"].shape[0], 2)

    encode_candidate = encode_query


def test_queries_are_instructed_as_uniir_and_candidates_never(cfg):
    model = _Recorder()
    table = InstructionTable.from_tsv(instructions_path(MINI))
    embed_queries, embed_candidates = evaluation.embed_fns(model, cfg, MINI, instructions=True, policy="fixed")
    text_queries = read_queries(query_path(MINI, "test", "mscoco_task0"))  # text -> image
    image_queries = read_queries(query_path(MINI, "test", "mscoco_task3"))  # image -> text
    emb = embed_queries(text_queries + image_queries)
    assert emb.shape == (len(text_queries) + len(image_queries), 2)
    for q, txt in zip(text_queries + image_queries, model.texts):
        prompts = [format_string(p) for p in table.prompts(q.dataset_id, q.modality, "image" if q.task_id == 0 else "text")]
        if q.txt:
            assert any(txt == format_string(f"{p} {q.txt}") for p in prompts), txt
        else:  # image-only query: the instruction alone is its text
            assert txt in prompts
    model.texts.clear()
    pool = load_pairs(MINI, "test")[0].pool
    embed_candidates(pool)
    assert model.texts == [format_string(t) for t in pool["txt"]]
    # no instructions: the query text alone
    model.texts.clear()
    plain_queries, _ = evaluation.embed_fns(model, cfg, MINI, instructions=False)
    plain_queries(text_queries + image_queries)
    assert model.texts == [format_string(q.txt) for q in text_queries + image_queries]


def test_random_policy_depends_on_the_seed_fixed_does_not(cfg):
    queries = read_queries(query_path(MINI, "test", "mscoco_task0")) * 1
    texts = {}
    for policy in ("random", "fixed"):
        for seed in range(6):
            model = _Recorder()
            evaluation.embed_fns(model, cfg, MINI, instructions=True, policy=policy, seed=seed)[0](queries)
            texts[policy, seed] = tuple(model.texts)
    assert len({texts["fixed", s] for s in range(6)}) == 1
    assert len({texts["random", s] for s in range(6)}) > 1


def test_train_uniir_lowers_the_loss_and_train_or_load_reuses_the_checkpoint(cfg, monkeypatch):
    model, log = multitask.train_or_load_uniir("clip_sf", cfg, MINI, instructions=True, init="random",
                                               max_steps=12, lr=3e-3, warmup_steps=0)
    assert list(log.columns[:3]) == ["step", "lr", "loss"]
    assert log["loss"].iloc[-1] < log["loss"].iloc[0] - 0.3
    assert log["samples_per_s"].iloc[-1] > 0
    directory = cfg.checkpoint_dir / "uniir" / "clip_sf-instruct-random-seed0"
    assert (directory / "model.safetensors").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the checkpoint should have been loaded")

    monkeypatch.setattr(multitask, "train_uniir", no_training)
    loaded, loaded_log = multitask.train_or_load_uniir("clip_sf", cfg, MINI, instructions=True, init="random",
                                                       max_steps=12, lr=3e-3, warmup_steps=0)
    assert loaded_log["loss"].tolist() == log["loss"].tolist()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # another recipe is another training run
    with pytest.raises(AssertionError, match="should have been loaded"):
        multitask.train_or_load_uniir("clip_sf", cfg, MINI, instructions=True, init="random", max_steps=13, lr=3e-3)


def test_no_instruction_setting_has_its_own_checkpoint_and_trains_deterministically(cfg):
    a, log_a = multitask.train_or_load_uniir("clip_sf", cfg, MINI, instructions=False, init="random", max_steps=4)
    b, log_b = multitask.train_or_load_uniir("clip_sf", cfg, MINI, instructions=False, init="random", max_steps=4, force=True)
    assert (cfg.checkpoint_dir / "uniir" / "clip_sf-noinstruct-random-seed0").is_dir()
    assert log_a["loss"].tolist() == log_b["loss"].tolist()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_blip_sf_trains_with_the_momentum_queue(cfg):
    model = build_uniir("blip_sf", cfg, MINI, init="random")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = multitask.train_uniir(model, cfg, MINI, instructions=True, max_steps=6, lr=1e-3, queue_size=12, warmup_steps=0)
    assert {"loss", "accuracy", "temperature", "alpha"} <= set(log.columns)
    assert np.isfinite(log["loss"]).all()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("vision_model" in n for n in changed) and any("text_encoder" in n for n in changed)
    assert not any("crossattention" in n for n in changed)


def test_evaluate_model_scores_local_and_global_pools(cfg):
    model = build_uniir("clip_sf", cfg, MINI, init="random")
    data = load_pairs(MINI, "test")
    results = evaluation.evaluate_model(model, cfg, MINI, data, instructions=True, policy="fixed")
    assert set(results) == {"local", "global"}
    for result in results.values():
        assert len(result.results) == len(data)
        assert all(0 <= r["metrics"]["recall@5"] <= 1 for r in result.results)
        assert "modality_error@5" in result.results[0]["metrics"]
    chance = evaluation.chance_level(data)
    assert set(chance) == {d.pair.name for d in data} and all(0 < v <= 1 for v in chance.values())
    big = [d for d in data if len(d.pool) > d.pair.metric_k]
    assert big and all(chance[d.pair.name] == pytest.approx(np.mean([min(1.0, d.pair.metric_k * len(q.pos) / len(d.pool)) for q in d.queries]), abs=0.35) for d in big)


def test_paper_hits_average_to_the_paper_metric(cfg):
    model = build_uniir("clip_sf", cfg, MINI, init="random")
    data = load_pairs(MINI, "test")
    local = evaluation.evaluate_model(model, cfg, MINI, data, instructions=True, policy="fixed")["local"]
    hits = evaluation.paper_hits(local, data)
    assert list(hits) == [d.pair.name for d in data]
    by_pair = {(r["dataset"], r["task_id"]): r for r in local.results}
    for d in data:
        assert len(hits[d.pair.name]) == by_pair[(d.pair.dataset, d.pair.task_id)]["n_queries"]
        assert set(np.unique(hits[d.pair.name])) <= {0.0, 1.0}
    value, low, high = bootstrap_average(hits)
    assert value == pytest.approx(evaluation.average(local.results)) and low <= value <= high
