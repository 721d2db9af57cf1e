"""The M-BEIR format layer on well-formed input: constants, ids, paths, readers, validator."""

import json
import shutil
from pathlib import Path

import ir_measures
import pytest

from uniir_lite.data import mbeir
from uniir_lite.data.mbeir import (
    DATASET_IDS,
    DATASET_NAMES,
    EVAL_PAIRS,
    TASKS,
    format_string,
    global_pool_path,
    hash_did,
    hash_qid,
    instructions_path,
    local_pool_path,
    parse_id,
    pool_modalities,
    qrels_path,
    query_path,
    read_instructions,
    read_pool,
    read_qrels,
    read_queries,
    task_id_for,
    union_train_path,
    unhash_did,
    unhash_qid,
    write_instructions,
)
from uniir_lite.data.validate import validate_command, validate_dir

MINI = Path(__file__).parent / "fixtures" / "mbeir_mini"

# Paper Tables 2 and 6, top to bottom.
PAPER_ROWS = [
    "visualnews_task0", "mscoco_task0", "fashion200k_task0", "webqa_task1", "edis_task2",
    "webqa_task2", "visualnews_task3", "mscoco_task3", "fashion200k_task3", "nights_task4",
    "oven_task6", "infoseek_task6", "fashioniq_task7", "cirr_task7", "oven_task8", "infoseek_task8",
]


# --- constants ----------------------------------------------------------------------------------

def test_dataset_ids_are_uniirs():
    assert DATASET_IDS == {"VisualNews": 0, "Fashion200K": 1, "WebQA": 2, "EDIS": 3, "NIGHTS": 4,
                           "OVEN": 5, "INFOSEEK": 6, "FashionIQ": 7, "CIRR": 8, "MSCOCO": 9}
    assert DATASET_NAMES[6] == "INFOSEEK" and DATASET_NAMES[9] == "MSCOCO"
    assert mbeir.DATASET_DOMAINS["EDIS"] == "news" and mbeir.DATASET_DOMAINS["CIRR"] == "common"


def test_tasks_code_ids_and_paper_numbers():
    assert sorted(TASKS) == [0, 1, 2, 3, 4, 6, 7, 8]  # 5 is unused in UniIR
    assert [TASKS[i].paper_number for i in sorted(TASKS)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert TASKS[0].short == "qt->ci" and TASKS[8].short == "(qi,qt)->(ci,ct)"
    assert task_id_for("text", "image,text") == 2
    assert task_id_for("image,text", "image") == 7
    with pytest.raises(ValueError, match="no M-BEIR task"):
        task_id_for("image", "image,text")  # code id 5, not a task
    with pytest.raises(ValueError, match="no M-BEIR task"):
        task_id_for("video", "text")


def test_eval_pairs_in_paper_order():
    assert [p.name for p in EVAL_PAIRS] == PAPER_ROWS
    ten = {p.name for p in EVAL_PAIRS if p.metric_k == 10}
    assert ten == {"fashion200k_task0", "fashion200k_task3", "fashioniq_task7"}
    infoseek = EVAL_PAIRS[11]
    assert (infoseek.dataset, infoseek.dataset_id, infoseek.task_id) == ("InfoSeek", 6, 6)
    for pair in EVAL_PAIRS:
        assert pair.name == f"{pair.dataset.lower()}_task{pair.task_id}"
        assert DATASET_NAMES[pair.dataset_id].lower() == pair.dataset.lower()
    assert mbeir.get_pair("cirr_task7").dataset_id == 8
    with pytest.raises(ValueError, match="unknown M-BEIR pair 'cirr_task3'"):
        mbeir.get_pair("cirr_task3")


# --- ids ----------------------------------------------------------------------------------------

def test_hashing_matches_uniir_and_round_trips():
    assert hash_qid("9:6") == 9 * 500_000 + 6 == 4_500_006
    assert hash_did("9:6") == 9 * 10_000_000 + 6 == 90_000_006
    for s in ["0:1", "9:6", "0:1061233", "6:499999", "8:0"]:
        assert parse_id(s) == tuple(int(x) for x in s.split(":"))
        assert unhash_did(hash_did(s)) == s
    for s in ["0:1", "9:6", "6:499999"]:
        assert unhash_qid(hash_qid(s)) == s
    with pytest.raises(ValueError, match="below 500,000"):
        hash_qid("1:500000")  # would collide with dataset 2


@pytest.mark.parametrize("bad", ["9-6", "a:b", "10:1", " 9:6", "9:6:1", 96, None])
def test_parse_id_rejects(bad):
    with pytest.raises(ValueError, match="bad M-BEIR id"):
        parse_id(bad)


# --- format_string (uniir_checkpoints.md §5 vectors) -----------------------------------------

@pytest.mark.parametrize("given, expected", [
    (None, ""),
    ("   ", ""),
    ('"', ""),
    (" hello world ", "Hello world."),
    ('"quoted"', "Quoted."),
    ("What?", "What?"),
    ("wow!", "Wow!"),
    ("hello.\r\n", "Hello."),
    ('a "b"', 'A "b.'),
    ('" x "', " x ."),
    ("ends with )", "Ends with )."),
    ("été", "Été."),
    ("line\rbreak", "Linebreak."),
    ("ßtraße", "SStraße."),
])
def test_format_string_vectors(given, expected):
    assert format_string(given) == expected


# --- paths --------------------------------------------------------------------------------------

def test_paths_follow_the_real_layout():
    r = Path("/m")
    assert query_path(r, "test", "cirr_task7") == r / "query/test/mbeir_cirr_task7_test.jsonl"
    assert query_path(r, "train", "cirr") == r / "query/train/mbeir_cirr_train.jsonl"
    assert union_train_path(r) == r / "query/union_train/mbeir_union_up_train.jsonl"
    assert local_pool_path(r, "cirr_task7") == r / "cand_pool/local/mbeir_cirr_task7_cand_pool.jsonl"
    assert local_pool_path(r, "cirr_task7", "val") == local_pool_path(r, "cirr_task7", "test")
    assert local_pool_path(r, "mscoco_task3") == r / "cand_pool/local/mbeir_mscoco_task3_test_cand_pool.jsonl"
    assert local_pool_path(r, "mscoco_task0", "val") == r / "cand_pool/local/mbeir_mscoco_task0_val_cand_pool.jsonl"
    assert global_pool_path(r) == r / "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
    assert global_pool_path(r, "train") == r / "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
    assert qrels_path(r, "test", "oven_task6") == r / "qrels/test/mbeir_oven_task6_test_qrels.txt"
    assert qrels_path(r, "train", "cirr") == r / "qrels/train/mbeir_cirr_train_qrels.txt"
    assert instructions_path(r) == r / "instructions/query_instructions.tsv"


# --- readers ------------------------------------------------------------------------------------

def test_read_queries_real_quirks():
    (image_query,) = read_queries(query_path(MINI, "test", "mscoco_task3"))
    assert image_query.qid == "9:6" and image_query.txt is None  # null query_txt
    assert image_query.modality == "image" and image_query.task_id == 3
    assert image_query.pos == ["9:2", "9:3", "9:4", "9:5", "9:6"]  # multi-positive
    assert image_query.dataset_id == 9
    first, second = read_queries(query_path(MINI, "test", "cirr_task7"))
    assert first.modality == "image,text" and first.txt == "make the car red"
    assert first.img_path == "mbeir_images/cirr_images/test/ref1.jpg"
    assert first.neg == [] and second.neg == []  # neg_cand_list key absent
    assert json.loads(first.src_content) == {"id": "test1-0-0"}  # a JSON string, kept as is
    assert second.src_content is None
    assert second.txt == '"show two of them"'  # raw: format_string is applied at use


def test_read_queries_accepts_real_sample_records(tmp_path):
    # Verbatim M-BEIR MSCOCO test records.
    lines = [
        '{"qid": "9:6", "query_txt": null, "query_img_path": "mbeir_images/mscoco_images/val2014/COCO_val2014_000000391895.jpg", "query_modality": "image", "query_src_content": null, "pos_cand_list": ["9:2", "9:3", "9:4", "9:5", "9:6"], "neg_cand_list": [], "task_id": 3}',
        "",
        '{"qid": "9:1", "query_txt": "A man with a red helmet on a small moped on a dirt road.", "query_img_path": null, "query_modality": "text", "query_src_content": null, "pos_cand_list": ["9:1"], "neg_cand_list": [], "task_id": 0}',
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("\r\n".join(lines) + "\r\n")  # CRLF and a blank line are tolerated
    queries = read_queries(path)
    assert [q.qid for q in queries] == ["9:6", "9:1"]
    assert [line for line, _ in mbeir.iter_jsonl(path)] == [1, 3]


def test_read_pool_is_memory_mapped_and_cached(tmp_path):
    pool_file = tmp_path / "pool.jsonl"
    shutil.copy(local_pool_path(MINI, "cirr_task7"), pool_file)
    with open(pool_file, "a") as f:  # one candidate with "src_content": null, others without key
        f.write(json.dumps({"did": "9:1", "txt": None, "img_path": "x.jpg", "modality": "image",
                            "src_content": None}) + "\n")
    cache = tmp_path / "cache"
    pool = read_pool(pool_file, cache_dir=cache)
    assert pool.column_names == ["did", "txt", "img_path", "modality", "src_content"]
    assert pool["did"][:] == ["8:1", "8:2", "8:3", "9:1"]
    assert pool[0] == {"did": "8:1", "txt": None, "img_path": "mbeir_images/cirr_images/test/ref1.jpg",
                       "modality": "image", "src_content": None}
    assert pool[3]["src_content"] is None
    assert pool.cache_files and Path(pool.cache_files[0]["filename"]).parent == cache
    arrow = Path(pool.cache_files[0]["filename"])
    built = arrow.stat().st_mtime_ns
    again = read_pool(pool_file, cache_dir=cache)  # unchanged file: the Arrow file is reused
    assert again.cache_files[0]["filename"] == str(arrow) and arrow.stat().st_mtime_ns == built
    with open(pool_file, "a") as f:
        f.write(json.dumps({"did": "9:2", "txt": "A caption", "img_path": None, "modality": "text"}) + "\n")
    assert read_pool(pool_file, cache_dir=cache)["did"][:][-1] == "9:2"  # edited file: rebuilt
    assert pool_modalities(pool) == {"8:1": "image", "8:2": "image", "8:3": "image", "9:1": "image"}


def test_read_pool_image_text_candidates(tmp_path):
    pool = read_pool(local_pool_path(MINI, "webqa_task2"), cache_dir=tmp_path)
    assert pool_modalities(pool) == {"2:1": "image,text", "2:2": "image,text"}
    assert json.loads(pool[0]["src_content"]) == {"title": "Library"}
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, not left behind


def test_read_qrels_five_columns():
    qrels = read_qrels(qrels_path(MINI, "test", "mscoco_task3"))
    assert qrels.rel == {"9:6": {d: 1 for d in ["9:2", "9:3", "9:4", "9:5", "9:6"]}}
    assert qrels.task == {"9:6": 3}


def test_read_qrels_four_columns_agrees_with_ir_measures(tmp_path):
    path = tmp_path / "trec.qrels"
    path.write_text("q1 0 d1 1\nq1 0 d2 0\nq2 Q0 d3 2\n\nq3 0 d4 -1\n")
    qrels = read_qrels(path)
    assert qrels.rel == {"q1": {"d1": 1}, "q2": {"d3": 2}}  # relevance <= 0 dropped, as UniIR
    assert qrels.task == {}
    independent = {}
    for q in ir_measures.read_trec_qrels(str(path)):
        if q.relevance > 0:
            independent.setdefault(q.query_id, {})[q.doc_id] = q.relevance
    assert qrels.rel == independent


def test_read_instructions_uniir_rules(tmp_path):
    table = read_instructions(instructions_path(MINI))
    assert set(table) == {(0, "text", "image"), (9, "text", "image"), (2, "text", "image,text"),
                          (9, "image", "text"), (8, "image,text", "image")}
    assert all(len(p) == 4 for p in table.values())
    assert table[(9, "text", "image")][0] == "Find me an everyday image that matches the given caption."
    path = tmp_path / "i.tsv"
    path.write_text("query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\n"
                    "image\timage\tNIGHTS\t4\tFind a similar image.\t\t\n"
                    "\n"
                    "text\ttext\tWebQA\t2\tAnswer this.\tFind a passage.\n")
    assert read_instructions(path) == {(4, "image", "image"): ["Find a similar image."],
                                       (2, "text", "text"): ["Answer this.", "Find a passage."]}


def test_write_instructions_round_trip(tmp_path):
    rows = [("image,text", "image", "CIRR", 8, ["One.", "Two.", "Three.", "Four."]),
            ("text", "text", "WebQA", 2, ["Only one"])]
    path = tmp_path / "instructions" / "query_instructions.tsv"
    write_instructions(path, rows)
    lines = path.read_text().splitlines()
    assert lines[0] == ("query_modality\tcand_modality\tdataset_name\tdataset_id\t"
                        "prompt_1\tprompt_2\tprompt_3\tprompt_4")
    assert lines[1] == "image,text\timage\tCIRR\t8\tOne.\tTwo.\tThree.\tFour."
    assert read_instructions(path) == {(8, "image,text", "image"): ["One.", "Two.", "Three.", "Four."],
                                       (2, "text", "text"): ["Only one"]}
    with pytest.raises(ValueError, match="tab"):
        write_instructions(path, [("text", "text", "WebQA", 2, ["a\tb"])])
    assert read_instructions(path)[(2, "text", "text")] == ["Only one"]  # the failed write left it intact


# --- validation ---------------------------------------------------------------------------------

def test_fixture_directory_is_valid():
    assert validate_dir(MINI) == []
    assert validate_dir(MINI, pairs=["cirr_task7"], splits=("test",)) == []


def test_validate_command_ok(capsys):
    assert validate_command(str(MINI), None) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("OK: ") and "8 query files" in out and "6 images" in out


def test_validate_command_unknown_pair(capsys):
    assert validate_command(str(MINI), ["cirr_task9"]) == 2
    assert "unknown M-BEIR pair 'cirr_task9'" in capsys.readouterr().out
