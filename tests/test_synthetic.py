"""The synthetic benchmark: M-BEIR layout, validity, determinism, and the roles of its datasets."""

import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uniir_lite.data import synthetic
from uniir_lite.data.synthetic import encyclopedia, scenes
from uniir_lite.data.mbeir import (
    DATASET_IDS,
    DATASET_STEMS,
    EVAL_PAIRS,
    PAIRS_BY_NAME,
    TASKS,
    global_pool_path,
    instructions_path,
    local_pool_path,
    parse_id,
    qrels_path,
    query_path,
    read_instructions,
    read_queries,
    union_train_path,
)
from uniir_lite.data.validate import validate_dir
from uniir_lite.data.synthetic import SIZES, SynthSize, ensure_benchmark, synth_command, write_benchmark

# Small enough that a full benchmark takes a fraction of a second: for determinism and caching.
MICRO = SynthSize("micro", eval_queries=4, pool_size=12, train_large=8, train_small=4, upsample=2,
                  entities=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    start = time.perf_counter()
    write_benchmark(root, "tiny", seed=0)
    print(f"\ntiny synthetic benchmark written in {time.perf_counter() - start:.1f} s")
    return root


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def src(record: dict, key: str = "src_content") -> dict:
    return json.loads(record[key])


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def pool_of(root: Path, pair: str, split: str = "test") -> dict[str, dict]:
    return {r["did"]: r for r in jsonl(local_pool_path(root, pair, split))}


# ---------------------------------------------------------------------------------------------
# Layout and validity
# ---------------------------------------------------------------------------------------------


def test_layout_has_every_m_beir_file(tiny):
    for pair in EVAL_PAIRS:
        for split in ("val", "test"):
            queries = jsonl(query_path(tiny, split, pair.name))
            assert len(queries) == SIZES["tiny"].eval_queries, (pair.name, split, len(queries))
            assert {q["task_id"] for q in queries} == {pair.task_id}
            assert qrels_path(tiny, split, pair.name).is_file()
            assert 50 <= len(jsonl(local_pool_path(tiny, pair.name, split))) <= 1600  # MSCOCO: 5 captions per image
    # MSCOCO alone has split-specific pools; there is no generic MSCOCO pool file.
    assert not (tiny / "cand_pool" / "local" / "mbeir_mscoco_task0_cand_pool.jsonl").exists()
    assert (tiny / "cand_pool" / "local" / "mbeir_mscoco_task0_val_cand_pool.jsonl").is_file()
    for name in DATASET_IDS:
        assert query_path(tiny, "train", DATASET_STEMS[name]).is_file()
        assert qrels_path(tiny, "train", DATASET_STEMS[name]).is_file()
    assert 3000 <= len(jsonl(union_train_path(tiny))) <= 5000
    assert (tiny / "query" / "union_val" / "mbeir_union_val.jsonl").is_file()
    for split in ("train", "val", "test"):
        assert global_pool_path(tiny, split).is_file()
    assert not list(tiny.rglob("*.tmp"))


def test_qrels_lines_are_the_five_m_beir_columns(tiny):
    queries = {q["qid"]: q for q in jsonl(query_path(tiny, "test", "infoseek_task6"))}
    lines = qrels_path(tiny, "test", "infoseek_task6").read_text().splitlines()
    assert sum(len(q["pos_cand_list"]) for q in queries.values()) == len(lines)
    for line in lines:
        qid, zero, did, relevance, task_id = line.split(" ")
        assert (zero, relevance, task_id) == ("0", "1", "6")
        assert did in queries[qid]["pos_cand_list"]


def test_instructions_four_distinct_prompts_per_pair(tiny):
    table = read_instructions(instructions_path(tiny))
    assert len(table) == 16
    for pair in EVAL_PAIRS:
        task = TASKS[pair.task_id]
        prompts = table[(pair.dataset_id, task.query_modality, task.cand_modality)]
        assert len(prompts) == 4 and len(set(prompts)) == 4, pair.name


def test_passes_the_validator(tiny):
    assert validate_dir(tiny) == []
    # the upsampled union file reads, repeats included (UniIR's upsampling is by repetition)
    assert len(read_queries(union_train_path(tiny))) == len(jsonl(union_train_path(tiny)))


def test_union_train_repeats_the_upsampled_datasets(tiny):
    manifest = json.loads((tiny / "synthetic.json").read_text())
    assert {n for n, f in manifest["upsample"].items() if f > 1} == set(synthetic.UPSAMPLED)
    union = Counter(q["qid"] for q in jsonl(union_train_path(tiny)))
    for name in DATASET_IDS:
        train = [q["qid"] for q in jsonl(query_path(tiny, "train", DATASET_STEMS[name]))]
        assert {union[qid] for qid in train} == {manifest["upsample"][name]}, name
    assert sum(union.values()) == manifest["files"]["query/union_train/mbeir_union_up_train.jsonl"]


def test_images_exist_as_64px_jpegs(tiny):
    paths = {q["query_img_path"] for q in jsonl(union_train_path(tiny)) if q["query_img_path"]}
    paths |= {r["img_path"] for r in jsonl(global_pool_path(tiny, "test")) if r["img_path"]}
    assert len(paths) > 1000
    for rel in sorted(paths)[::200]:
        with Image.open(tiny / rel) as im:
            assert (im.format, im.size, im.mode) == ("JPEG", (64, 64), "RGB")
    assert all((tiny / rel).is_file() for rel in paths)


def test_ids_count_from_one_with_one_qid_sequence_per_dataset_and_split(tiny):
    for split in ("val", "test"):
        by_dataset: dict[int, list[int]] = {}
        for pair in EVAL_PAIRS:
            for q in jsonl(query_path(tiny, split, pair.name)):
                dataset_id, n = parse_id(q["qid"])
                by_dataset.setdefault(dataset_id, []).append(n)
        for numbers in by_dataset.values():
            assert sorted(numbers) == list(range(1, len(numbers) + 1))
    dids = [r["did"] for r in jsonl(global_pool_path(tiny, "train"))]
    dids += [r["did"] for r in jsonl(global_pool_path(tiny, "val")) + jsonl(global_pool_path(tiny, "test"))]
    per_dataset: dict[int, set[int]] = {}
    for did in dids:
        dataset_id, n = parse_id(did)
        per_dataset.setdefault(dataset_id, set()).add(n)
    for numbers in per_dataset.values():
        assert min(numbers) == 1


def test_texts_are_short_and_the_vocabulary_small(tiny):
    texts = [q["query_txt"] for q in jsonl(union_train_path(tiny)) if q["query_txt"]]
    texts += [r["txt"] for r in jsonl(global_pool_path(tiny, "train")) + jsonl(global_pool_path(tiny, "test"))
              if r["txt"]]
    for text in texts:
        for sentence in re.split(r"(?<=[.?!])\s+", text):
            assert len(sentence.split()) <= 20, sentence
    words = {w.lower() for text in texts for w in re.findall(r"[A-Za-z]+", text)}
    assert 150 <= len(words) <= 500


# ---------------------------------------------------------------------------------------------
# Determinism, caching, refusing foreign directories
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = (write_benchmark(tmp_path / name, MICRO, seed=s) for name, s in (("a", 0), ("b", 0), ("c", 1)))
    digest = tree_digest(a)
    assert len(digest) > 100
    assert tree_digest(b) == digest
    other = tree_digest(c)
    assert other.keys() == digest.keys()  # same layout and counts ...
    changed = [path for path in digest if other[path] != digest[path]]
    assert len(changed) > 0.9 * len(digest)  # ... different content


def test_cached_rerun_writes_nothing_and_a_new_seed_replaces_everything(tmp_path, tiny):
    stamp = (tiny / "synthetic.json").stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_benchmark(tiny, "tiny", 0) == tiny
    assert time.perf_counter() - start < 1.0
    assert (tiny / "synthetic.json").stat().st_mtime_ns == stamp
    # A new seed into a used directory leaves exactly what a fresh directory gets: nothing stale.
    write_benchmark(tmp_path / "reused", MICRO, seed=0)
    write_benchmark(tmp_path / "reused", MICRO, seed=1)
    write_benchmark(tmp_path / "fresh", MICRO, seed=1)
    assert tree_digest(tmp_path / "reused") == tree_digest(tmp_path / "fresh")


def test_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "query").mkdir()
    (tmp_path / "query" / "keep.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="not a synthetic benchmark"):
        write_benchmark(tmp_path, MICRO)
    assert (tmp_path / "query" / "keep.jsonl").is_file()
    (tmp_path / "synthetic.json").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"synthetic\.json:1: not valid JSON"):
        write_benchmark(tmp_path, MICRO)
    with pytest.raises(ValueError, match="unknown synthetic size 'huge'"):
        write_benchmark(tmp_path / "new", "huge")


def test_synth_command_prints_one_summary_line(tiny, tmp_path, capsys):
    assert synth_command(str(tiny), "tiny", 0) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "already there" in out[0] and "union training queries" in out[0]
    assert synth_command(str(tmp_path), "enormous", 0) == 1
    assert capsys.readouterr().out.startswith("error: unknown synthetic size 'enormous'")


def test_sizes_grow_as_documented():
    assert SIZES["tiny"].eval_queries < SIZES["small"].eval_queries < SIZES["gpu"].eval_queries
    assert SIZES["tiny"].pool_size < SIZES["small"].pool_size < SIZES["gpu"].pool_size
    gpu = SIZES["gpu"]
    union = 4 * gpu.train_large + gpu.train_small + len(synthetic.UPSAMPLED) * gpu.train_small * gpu.upsample
    assert union >= 100_000 and gpu.pool_size >= 5_000


# ---------------------------------------------------------------------------------------------
# The roles of the datasets
# ---------------------------------------------------------------------------------------------


def test_mscoco_image_queries_have_their_five_captions(tiny):
    for split in ("val", "test"):
        captions = pool_of(tiny, "mscoco_task3", split)
        for q in jsonl(query_path(tiny, split, "mscoco_task3")):
            assert len(q["pos_cand_list"]) == 5
            assert {captions[did]["modality"] for did in q["pos_cand_list"]} == {"text"}
            assert len({captions[did]["txt"] for did in q["pos_cand_list"]}) == 5  # paraphrases
            assert all(src(captions[did]) == src(q, "query_src_content") for did in q["pos_cand_list"])
        # A caption query finds itself among the text candidates: the modality lure.
        texts = {r["txt"] for r in captions.values()}
        assert all(q["query_txt"] in texts for q in jsonl(query_path(tiny, split, "mscoco_task0")))


def test_visualnews_pools_lack_src_content_and_captions_lure(tiny):
    for name in ("visualnews_task0", "visualnews_task3"):
        assert all("src_content" not in r for r in pool_of(tiny, name).values())
    assert all("src_content" in r for r in pool_of(tiny, "cirr_task7").values())
    news = [r for r in jsonl(global_pool_path(tiny, "test")) if r["did"].startswith("0:")]
    assert news and all("src_content" not in r for r in news)
    captions = {r["txt"] for r in pool_of(tiny, "visualnews_task3").values()}
    for split in ("val", "test"):
        assert all(q["query_txt"] in captions for q in jsonl(query_path(tiny, split, "visualnews_task0")))


def test_infoseek_has_multi_positive_queries_and_hard_negatives(tiny):
    multi = 0
    for task in (6, 8):
        pool = pool_of(tiny, f"infoseek_task{task}")
        for q in jsonl(query_path(tiny, "test", f"infoseek_task{task}")):
            answer = src(q, "query_src_content")["answer"]
            pos, neg = q["pos_cand_list"], q["neg_cand_list"]
            multi += len(pos) > 1
            assert neg, q["qid"]
            assert all(encyclopedia.contains_word(pool[d]["txt"], answer) for d in pos)
            assert not any(encyclopedia.contains_word(pool[d]["txt"], answer) for d in neg)
            # Positives and negatives are the chunks of one entity, the one in the query's photo.
            entity = src(q, "query_src_content")["entity_id"]
            assert {src(pool[d])["wikidata_id"] for d in pos + neg} == {entity}
            assert len(pos) + len(neg) == 4
    assert multi >= 10


def test_entity_passages_describe_what_the_photo_shows(tiny):
    pool = pool_of(tiny, "oven_task6")
    for q in jsonl(query_path(tiny, "test", "oven_task6")):
        attrs = src(q, "query_src_content")
        (did,) = q["pos_cand_list"]
        text = pool[did]["txt"]
        assert text.startswith(attrs["entity"] + ". ")
        assert f"{attrs['colour']} {attrs['pattern']} {attrs['shape']}" in text


def test_edis_candidate_text_alone_cannot_decide(tiny):
    pool = pool_of(tiny, "edis_task2")
    headlines = Counter(r["txt"] for r in pool.values())
    for q in jsonl(query_path(tiny, "test", "edis_task2")):
        (did,) = q["pos_cand_list"]
        assert headlines[pool[did]["txt"]] >= 2  # its twin has the same headline, other colours


def pixels(root: Path, rel: str) -> np.ndarray:
    with Image.open(root / rel) as im:
        return np.asarray(im, dtype=np.float32)


def image_only_hits(root: Path, queries: list[dict], pool: dict[str, dict]) -> int:
    """How many queries find a positive as the pool image nearest in pixel space (image only)."""
    dids = list(pool)
    stack = np.stack([pixels(root, pool[did]["img_path"]) for did in dids])  # [n, 64, 64, 3]
    hits = 0
    for q in queries:
        mse = ((stack - pixels(root, q["query_img_path"])) ** 2).mean(axis=(1, 2, 3))  # [n]
        hits += dids[int(mse.argmin())] in q["pos_cand_list"]
    return hits


def test_nights_positive_is_the_nearest_image(tiny):
    pool = pool_of(tiny, "nights_task4")
    queries = jsonl(query_path(tiny, "test", "nights_task4"))
    for q in queries:
        (did,) = q["pos_cand_list"]
        assert pool[did]["img_path"] != q["query_img_path"]
        near, ref = src(pool[did]), src(q, "query_src_content")
        assert near["background"] == ref["background"] and _scene_kinds(near) == _scene_kinds(ref)
    assert image_only_hits(tiny, queries, pool) >= 0.9 * len(queries)


def _garment_key(attrs: dict) -> tuple:
    return tuple(attrs[k] for k in ("kind", "colour", "shade", "pattern", "length"))


def test_fashioniq_needs_both_the_image_and_the_text(tiny):
    pool = pool_of(tiny, "fashioniq_task7")
    for q in jsonl(query_path(tiny, "test", "fashioniq_task7")):
        s = src(q, "query_src_content")
        ref, target, changes = s["reference"], s["target"], s["changes"]
        assert _garment_key(ref) != _garment_key(target)
        others = [src(r) for did, r in pool.items() if did not in q["pos_cand_list"]]
        assert all(_garment_key(src(pool[d])) == _garment_key(target) for d in q["pos_cand_list"])
        # The text alone also fits another garment; the image alone is nearest to a copy of itself.
        assert any(all(o[a] == v for a, v in changes.items()) for o in others)
        assert any(_garment_key(o) == _garment_key(ref) for o in others)
    queries = jsonl(query_path(tiny, "test", "fashioniq_task7"))
    assert image_only_hits(tiny, queries, pool) <= 0.2 * len(queries)


def _scene_kinds(attrs: dict) -> set[tuple[str, str]]:
    return {(g["shape"], g["colour"]) for g in attrs["groups"]}


def test_cirr_needs_both_the_image_and_the_text(tiny):
    pool = pool_of(tiny, "cirr_task7")
    ops = Counter()
    for q in jsonl(query_path(tiny, "test", "cirr_task7")):
        s = src(q, "query_src_content")
        ref, target, edit = s["reference"], s["target"], s["edit"]
        ops[edit["op"]] += 1
        assert (ref["background"], _scene_kinds(ref)) != (target["background"], _scene_kinds(target))
        others = [src(r) for did, r in pool.items() if did not in q["pos_cand_list"]]
        if edit["op"] in ("add", "recolour", "reshape"):
            new = (edit["new"]["shape"], edit["new"]["colour"])
            assert new in _scene_kinds(target) and any(new in _scene_kinds(o) for o in others)
        elif edit["op"] == "remove":
            old = (edit["old"]["shape"], edit["old"]["colour"])
            assert any(old not in _scene_kinds(o) and _scene_kinds(o) == _scene_kinds(target) for o in others)
        else:
            assert any(o["background"] == edit["background"] for o in others)
        look = (ref["background"], _scene_kinds(ref))
        assert any((o["background"], _scene_kinds(o)) == look for o in others)  # a near copy
        assert q["query_txt"] and len(q["query_txt"].split()) <= 12
    assert len(ops) >= 4  # every kind of edit shows up
    queries = jsonl(query_path(tiny, "test", "cirr_task7"))
    assert image_only_hits(tiny, queries, pool) <= 0.2 * len(queries)


def test_webqa_splits_ask_different_questions(tiny):
    def asked(split: str) -> set[tuple[str, str]]:
        name = "webqa" if split == "train" else "webqa_task1"  # training files are per dataset
        return {(s["entity_id"], s["question_type"]) for q in jsonl(query_path(tiny, split, name))
                if q["task_id"] == 1 for s in [src(q, "query_src_content")]}

    assert not asked("test") & asked("val")
    assert not asked("test") & asked("train")


def test_pair_modalities_follow_the_tasks(tiny):
    for pair in EVAL_PAIRS:
        task = TASKS[pair.task_id]
        pool = pool_of(tiny, pair.name)
        for q in jsonl(query_path(tiny, "test", pair.name)):
            assert q["query_modality"] == task.query_modality
            assert (q["query_txt"] is None) == ("text" not in task.query_modality)
            assert {pool[d]["modality"] for d in q["pos_cand_list"]} == {task.cand_modality}
    assert PAIRS_BY_NAME["cirr_task7"].task_id == 7


def test_drawing_is_pure():
    scene = scenes.random_scene(np.random.default_rng(3))
    assert scenes.jpeg_bytes(scene, 64) == scenes.jpeg_bytes(scene, 64)
    assert scenes.render(scene, 32).size == (32, 32)
