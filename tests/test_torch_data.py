"""Instruction policies, the torch datasets and the collator."""

import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from uniir_lite.data.mbeir import (
    Query,
    instructions_path,
    local_pool_path,
    pool_modalities,
    query_path,
    read_pool,
    union_train_path,
)
from uniir_lite.data.torch_data import (
    MBEIRCollator,
    MBEIREmbedDataset,
    MBEIRTrainDataset,
    _PoolRows,
    target_modality,
)
from uniir_lite.instructions import InstructionTable, choose, instruct_query

MINI = Path(__file__).parent / "fixtures" / "mbeir_mini"
PROMPTS = ["First prompt", "Second prompt.", "Third prompt?", "Fourth prompt!"]
CIRR_PROMPTS = InstructionTable.from_tsv(instructions_path(MINI)).prompts(8, "image,text", "image")


# --- instructions -------------------------------------------------------------------------------

def test_table_lookup_and_clear_key_error():
    table = InstructionTable.from_tsv(instructions_path(MINI))
    assert table.prompts(9, "image", "text")[0] == "Find an image caption describing the following everyday image."
    with pytest.raises(KeyError) as info:
        table.prompts(4, "image", "image")
    message = str(info.value)
    assert "dataset 4 (NIGHTS), image -> image" in message and str(instructions_path(MINI)) in message


def test_fixed_policy_is_a_stable_hash_of_the_qid():
    qids = [f"{d}:{n}" for d in range(10) for n in range(1, 30)]
    forward = {q: choose(PROMPTS, q, "fixed") for q in qids}
    backward = {q: choose(PROMPTS, q, "fixed") for q in reversed(qids)}
    assert forward == backward
    assert all(forward[q] == PROMPTS[zlib.crc32(q.encode()) % 4] for q in qids)
    assert len(set(forward.values())) == 4  # it spreads over all prompts


def test_fixed_policy_is_identical_in_fresh_processes():
    code = ("from uniir_lite.instructions import choose; "
            f"print([choose({PROMPTS!r}, f'9:{{n}}', 'fixed') for n in range(40)])")
    outputs = set()
    for hash_seed in ("1", "2"):  # Python's own hash() differs between these two processes
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        outputs.add(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                   capture_output=True, text=True).stdout)
    assert len(outputs) == 1
    assert outputs.pop().strip() == str([choose(PROMPTS, f"9:{n}", "fixed") for n in range(40)])


def test_random_policy_reproducible_and_varying():
    draws = [choose(PROMPTS, "9:1", "random", random.Random(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    rng = random.Random(7)
    sequence = [choose(PROMPTS, "9:1", "random", rng) for _ in range(40)]
    assert set(sequence) == set(PROMPTS)  # a new draw every call, as UniIR's random.choice
    rng = random.Random(7)
    assert sequence == [choose(PROMPTS, "9:1", "random", rng) for _ in range(40)]
    with pytest.raises(ValueError, match="needs an rng"):
        choose(PROMPTS, "9:1", "random")
    with pytest.raises(ValueError, match="unknown instruction policy 'first'"):
        choose(PROMPTS, "9:1", "first")


@pytest.mark.parametrize("query_txt, prompt, expected", [
    ("a red car", "Find an image", "Find an image. a red car."),
    (None, "find the caption", "Find the caption."),  # image-only query: the prompt alone
    ("", "Find it?", "Find it?"),
    ('"two dogs"', '"Retrieve this."', 'Retrieve this. "two dogs.'),
])
def test_instruct_query_as_uniir(query_txt, prompt, expected):
    assert instruct_query(query_txt, prompt) == expected


def test_target_modality_prefers_the_querys_own_dataset():
    modality = {"6:1": "text", "5:2": "image,text", "5:3": "text"}.__getitem__
    oven = Query("5:9", "q", "a.jpg", "image,text", None, ["6:1", "5:2"], [], 8)
    assert target_modality(oven, modality) == "image,text"
    other = Query("5:9", "q", "a.jpg", "image,text", None, ["6:1"], [], 6)
    assert target_modality(other, modality) == "text"


# --- datasets -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_pool(tmp_path_factory):
    return read_pool(MINI / "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
                     cache_dir=tmp_path_factory.mktemp("cache"))


def test_pool_rows_are_cached_up_to_a_cap(train_pool):
    rows = _PoolRows(train_pool, cache_size=2)
    dids = train_pool["did"][:3]
    for did in dids + dids:
        assert rows[did] == train_pool[rows.row_of[did]] and len(rows._rows) <= 2
    assert rows[dids[0]] is rows[dids[0]]  # the second read comes from the cache
    with pytest.raises(KeyError, match="not in the pool"):
        rows["no-such-did"]


def test_train_dataset_items(train_pool):
    table = InstructionTable.from_tsv(instructions_path(MINI))
    data = MBEIRTrainDataset(union_train_path(MINI), train_pool, table, policy="fixed",
                             hard_negatives=1, root=MINI)
    assert len(data) == 3
    item = data[0]
    assert item["qid"] == "8:10" and item["task_id"] == 7
    prompt = CIRR_PROMPTS[zlib.crc32(b"8:10") % 4]
    assert item["query_txt"] == f"{prompt} make it blue."
    assert item["query_img"] == str(MINI / "mbeir_images/cirr_images/test/ref1.jpg")
    assert item["pos"]["did"] in ("8:2", "8:3") and item["pos"]["txt"] == ""
    assert Path(item["pos"]["img_path"]).is_file()
    assert [n["did"] for n in item["negs"]] == ["8:1"]
    assert len(data[1]["negs"]) == 1 and data[1]["negs"][0]["did"] in ("8:1", "8:2")
    text_query = data[2]  # MSCOCO text -> image
    assert text_query["query_img"] is None
    assert text_query["query_txt"].endswith(" A red moped.") and text_query["negs"] == []


def test_train_dataset_draws_are_seeded_per_epoch(train_pool):
    data = MBEIRTrainDataset(union_train_path(MINI), train_pool, None, seed=3, root=MINI)
    assert data[0]["query_txt"] == "Make it blue."  # no instructions: format_string(query_txt)
    assert data[0] == data[0]  # the same (seed, epoch, index) gives the same draw
    seen = set()
    for epoch in range(20):
        data.set_epoch(epoch)
        seen.add(data[0]["pos"]["did"])
    assert seen == {"8:2", "8:3"}  # the positive is re-drawn each epoch (UniIR's shuffle_cand)
    other = MBEIRTrainDataset(union_train_path(MINI), train_pool, None, seed=3, root=MINI)
    other.set_epoch(19)
    assert other[0] == data[0]


def test_train_dataset_random_instructions_vary(train_pool):
    table = InstructionTable.from_tsv(instructions_path(MINI))
    data = MBEIRTrainDataset(union_train_path(MINI), train_pool, table, policy="random", root=MINI)
    texts = set()
    for epoch in range(30):
        data.set_epoch(epoch)
        texts.add(data[0]["query_txt"])
    assert texts == {f"{p} make it blue." for p in CIRR_PROMPTS}


def test_embed_dataset_queries_and_candidates(tmp_path):
    pool = read_pool(local_pool_path(MINI, "mscoco_task3"), cache_dir=tmp_path)
    table = InstructionTable.from_tsv(instructions_path(MINI))
    queries = MBEIREmbedDataset.from_queries(
        query_path(MINI, "test", "mscoco_task3"), root=MINI, instructions=table,
        modality_of=pool_modalities(pool).__getitem__)
    (item,) = list(queries)
    assert zlib.crc32(b"9:6") % 4 == 1  # prompt_2, which has no final period in the table
    assert item == {"id": "9:6", "txt": "Retrieve the caption that best describes this photo.",
                    "img_path": str(MINI / "mbeir_images/mscoco_images/val2014/COCO_val2014_000000391895.jpg")}
    plain = MBEIREmbedDataset.from_queries(query_path(MINI, "test", "cirr_task7"), root=MINI)
    assert plain[1]["txt"] == "Show two of them."  # quotes stripped by format_string
    cands = MBEIREmbedDataset.from_pool(pool, root=MINI)
    assert len(cands) == 6 and cands[5] == {"id": "9:8", "img_path": None,
                                            "txt": "Girl blowing out the candle on an ice-cream."}
    with pytest.raises(IndexError):
        cands[6]
    with pytest.raises(ValueError, match="need modality_of"):
        MBEIREmbedDataset.from_queries(query_path(MINI, "test", "cirr_task7"), root=MINI, instructions=table)


# --- collator -----------------------------------------------------------------------------------

def tokenize(texts: list[str]) -> torch.Tensor:
    # Toy tokenizer: word lengths, padded to 6 tokens.
    rows = [[len(w) for w in t.split()][:6] for t in texts]
    return torch.tensor([r + [0] * (6 - len(r)) for r in rows], dtype=torch.long).reshape(len(texts), 6)


def load_image(path: str) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((4, 4))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # [3, 4, 4]


def test_collator_embed_batch_masks(tmp_path):
    collate = MBEIRCollator(tokenize, load_image, 4)
    items = [{"id": "9:1", "txt": "A red moped.", "img_path": None},
             {"id": "9:6", "txt": "", "img_path": str(MINI / "mbeir_images/webqa_images/w1.jpg")},
             {"id": "2:1", "txt": "A library roof.", "img_path": str(MINI / "mbeir_images/webqa_images/w1.jpg")}]
    batch = collate(items)
    assert batch["ids"] == ["9:1", "9:6", "2:1"]
    assert batch["txt"].shape == (3, 6) and batch["txt"][0, :3].tolist() == [1, 3, 6]
    assert batch["img"].shape == (3, 3, 4, 4)
    assert batch["txt_mask"].tolist() == [1, 0, 1] and batch["img_mask"].tolist() == [0, 1, 1]
    assert torch.count_nonzero(batch["img"][0]) == 0  # a missing image is all zeros
    assert batch["img"][1].max() > 0.5


def test_collator_train_batch_through_a_dataloader(train_pool):
    data = MBEIRTrainDataset(union_train_path(MINI), train_pool, None, hard_negatives=2, root=MINI)
    loader = DataLoader(data, batch_size=3, collate_fn=MBEIRCollator(tokenize, load_image, (4, 4)))
    (batch,) = list(loader)
    assert batch["query"]["ids"] == ["8:10", "8:11", "9:100"]
    assert batch["query"]["txt_mask"].tolist() == [1, 1, 1]
    assert batch["query"]["img_mask"].tolist() == [1, 1, 0]
    assert batch["pos"]["img"].shape == (3, 3, 4, 4) and batch["pos"]["txt_mask"].tolist() == [0, 0, 0]
    assert batch["neg_query_index"].tolist() == [0, 1, 1]  # 8:10 has one negative, 8:11 two
    assert batch["neg"]["img"].shape == (3, 3, 4, 4)
    assert batch["task_id"].tolist() == [7, 7, 0]
    data.hard_negatives = 0
    assert MBEIRCollator(tokenize, load_image, 4)([data[0]])["neg"] is None


def test_collator_names_a_missing_image(tmp_path):
    collate = MBEIRCollator(tokenize, load_image, 4)
    missing = str(tmp_path / "mbeir_images/gone.jpg")
    with pytest.raises(FileNotFoundError) as info:
        collate([{"id": "8:1", "txt": "x", "img_path": missing}])
    assert "8:1" in str(info.value) and missing in str(info.value)
