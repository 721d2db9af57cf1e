"""Bad M-BEIR input: every error or problem names the file and the right line."""

import json
import shutil
from pathlib import Path

import pytest

from uniir_lite.data import validate
from uniir_lite.data.mbeir import (
    MBEIRFormatError,
    instructions_path,
    local_pool_path,
    qrels_path,
    query_path,
    read_instructions,
    read_pool,
    read_qrels,
    read_queries,
)
from uniir_lite.data.validate import Problem, validate_command, validate_dir

MINI = Path(__file__).parent / "fixtures" / "mbeir_mini"


def good_query(**changes):
    record = {"qid": "8:1", "query_txt": "make it red", "query_img_path": "mbeir_images/a.jpg",
              "query_modality": "image,text", "query_src_content": None,
              "pos_cand_list": ["8:2"], "neg_cand_list": [], "task_id": 7}
    record.update(changes)
    return {k: v for k, v in record.items() if v != "<drop>"}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def expect_error(call, path, line, match):
    with pytest.raises(MBEIRFormatError, match=match) as info:
        call(path)
    assert info.value.path == str(path) and info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert isinstance(info.value, ValueError)


# --- query records ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    ('{"qid": "8:2", "query_txt": ', "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    (good_query(qid="8:2", query_modality="video"), "query_modality must be one of"),
    (good_query(qid="8:2", query_modality="text,image"), "query_modality must be one of"),
    (good_query(qid="8:2", query_txt=None), "query_txt is missing or empty"),
    (good_query(qid="8:2", query_img_path="<drop>"), "query_img_path is missing or empty"),
    (good_query(qid="8:2", query_modality="text", task_id=1), "query_img_path is set"),
    (good_query(qid="8:2", pos_cand_list=[]), "pos_cand_list must be a non-empty list"),
    (good_query(qid="8:2", pos_cand_list=["8-2"]), "bad M-BEIR id '8-2'"),
    (good_query(qid="8:2", neg_cand_list="8:3"), "neg_cand_list must be a non-empty list"),
    (good_query(qid="8:2", task_id=5), r"task_id must be one of \[0, 1, 2, 3, 4, 6, 7, 8\]"),
    (good_query(qid="8:2", task_id=3), "does not match query_modality 'image,text'"),
    (good_query(qid="8:2", task_id="7"), "task_id must be one of"),
    (good_query(qid="8:2", query_src_content=3), "query_src_content must be a JSON string"),
    (good_query(qid="8:1"), "duplicate qid '8:1' \\(first on line 1\\)"),
])
def test_bad_query_line_is_located(tmp_path, bad, match):
    path = write_lines(tmp_path / "q.jsonl", [good_query(), "", bad, good_query(qid="8:9")])
    expect_error(read_queries, path, 3, match)


def test_bad_utf8_is_located(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(json.dumps(good_query()).encode() + b"\n" + b'{"qid": "\xff"}\n')
    expect_error(read_queries, path, 2, "not valid UTF-8")


# --- pools --------------------------------------------------------------------------------------

def good_cand(did, **changes):
    record = {"did": did, "txt": None, "img_path": "mbeir_images/a.jpg", "modality": "image"}
    record.update(changes)
    return record


@pytest.mark.parametrize("bad, line, match", [
    (good_cand("9:3", modality="images"), 3, "modality must be one of"),
    (good_cand("9:3", txt="a caption"), 3, "txt is set but modality is 'image'"),
    (good_cand("9:3", modality="image,text"), 3, "txt is missing or empty"),
    (good_cand("9:1"), 3, "duplicate did '9:1' \\(first on line 1\\)"),
    ('{"did": "9:3",}', 3, "malformed JSON"),
    (good_cand("x"), 3, "bad M-BEIR id 'x'"),
])
def test_bad_pool_line_is_located(tmp_path, bad, line, match):
    path = write_lines(tmp_path / "pool.jsonl", [good_cand("9:1"), good_cand("9:2"), bad, good_cand("9:4")])
    expect_error(lambda p: read_pool(p, cache_dir=tmp_path / "cache"), path, line, match)
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written is left in the cache


def test_pool_duplicate_reports_the_first_repeat(tmp_path):
    path = write_lines(tmp_path / "pool.jsonl", [good_cand(f"9:{i}") for i in (1, 2, 3, 2, 1)])
    expect_error(lambda p: read_pool(p, cache_dir=tmp_path), path, 4, "duplicate did '9:2' \\(first on line 2\\)")


# --- qrels --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    ("9:6 0 9:2", "expected 5 columns"),
    ("9:6 0 9:2 1 3 extra", "expected 5 columns"),
    ("9:6 0 9:2 yes 3", "relevance must be an integer, got 'yes'"),
    ("9:6 0 9:2 1 three", "task_id must be an integer"),
    ("9:6 0 9:2 1 5", "unknown task_id 5"),
    ("9:6 0 9:2 1 0", "qid 9:6 has task_id 0 here but 3 on line 1"),
])
def test_bad_qrels_line_is_located(tmp_path, bad, match):
    path = tmp_path / "qrels.txt"
    path.write_text(f"9:6 0 9:3 1 3\n\n{bad}\n9:6 0 9:4 1 3\n")
    expect_error(read_qrels, path, 3, match)


# --- instructions -------------------------------------------------------------------------------

HEADER = "query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\n"


@pytest.mark.parametrize("bad, match", [
    ("text\timage\tMSCOCO\t9", "at least one prompt; got 4 column"),
    ("text image MSCOCO 9 Find it.", "got 1 column"),
    ("text\timage\tMSCOCO\tnine\tFind it.", "dataset_id must be an integer, got 'nine'"),
    ("text\tpicture\tMSCOCO\t9\tFind it.", "cand_modality must be one of"),
    ("text\timage\tVisualNews\t0\tAgain.", r"duplicate instructions for \(0, 'text', 'image'\) \(first on line 2\)"),
])
def test_bad_tsv_line_is_located(tmp_path, bad, match):
    path = tmp_path / "query_instructions.tsv"
    path.write_text(HEADER + "text\timage\tVisualNews\t0\tFind it.\n" + bad + "\n")
    expect_error(read_instructions, path, 3, match)


def test_tsv_without_header_or_rows_is_refused(tmp_path):
    path = tmp_path / "query_instructions.tsv"
    path.write_text("text\timage\tVisualNews\t0\tFind it.\n")
    expect_error(read_instructions, path, 1, "expected the header")
    path.write_text(HEADER)
    with pytest.raises(MBEIRFormatError, match="no instruction rows") as info:
        read_instructions(path)
    assert str(info.value) == f"{path}: no instruction rows below the header"
    path.write_bytes(HEADER.encode() + b"text\timage\tVisualNews\t0\tFind \xe9.\n")
    expect_error(read_instructions, path, 2, "not valid UTF-8")


# --- the validator ------------------------------------------------------------------------------

@pytest.fixture
def mini(tmp_path) -> Path:
    root = tmp_path / "M-BEIR"
    shutil.copytree(MINI, root)
    return root


def rewrite_record(path: Path, line: int, **changes) -> None:
    lines = path.read_text().splitlines()
    record = json.loads(lines[line - 1])
    record.update(changes)
    lines[line - 1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


def located(problems: list[Problem]) -> set[tuple[str, int | None]]:
    return {(p.path, p.line) for p in problems}


def test_positive_not_in_pool(mini):
    q = query_path(mini, "test", "cirr_task7")
    rewrite_record(q, 2, pos_cand_list=["8:99"])
    problems = validate_dir(mini, pairs=["cirr_task7"], splits=("test",))
    assert (str(q), 2) in located(problems)
    (p,) = [p for p in problems if "8:99" in p.message and p.path == str(q)]
    assert "positive 8:99 of query 8:2 is not in" in p.message
    assert str(local_pool_path(mini, "cirr_task7")) in p.message
    assert str(p).startswith(f"{q}:2: ")


def test_negative_not_in_union_train_pool(mini):
    q = query_path(mini, "train", "cirr")
    rewrite_record(q, 2, neg_cand_list=["8:1", "8:77"])
    problems = validate_dir(mini, pairs=["cirr_task7"], splits=("train",))
    assert [(p.path, p.line) for p in problems] == [(str(q), 2)]
    assert "negative 8:77 of query 8:11" in problems[0].message
    assert "mbeir_union_train_cand_pool.jsonl" in problems[0].message


def test_missing_image_is_located_and_counted(mini, monkeypatch):
    (mini / "mbeir_images/cirr_images/test/tgt2.jpg").unlink()
    problems = validate_dir(mini, pairs=["cirr_task7"], splits=("test",))
    pool = local_pool_path(mini, "cirr_task7")
    assert [(p.path, p.line) for p in problems] == [(str(pool), 3)]
    assert "image of candidate 8:3 not found" in problems[0].message
    # With everything gone, a few are listed and the rest counted.
    shutil.rmtree(mini / "mbeir_images")
    monkeypatch.setattr(validate, "MAX_LISTED_MISSING_IMAGES", 2)
    problems = validate_dir(mini)
    assert sum("not found" in p.message for p in problems) == 2
    assert problems[-1].message == "6 referenced images are missing in total (the first 2 are listed)"
    assert validate_dir(mini, check_images=False) == []


def test_qrels_query_mismatch(mini):
    qrels = qrels_path(mini, "test", "mscoco_task3")
    lines = qrels.read_text().splitlines()
    lines[3] = "9:6 0 9:8 1 3"  # a caption that is not a positive of 9:6
    lines.append("9:7 0 9:2 1 3")  # a query that does not exist
    qrels.write_text("\n".join(lines) + "\n")
    cirr_qrels = qrels_path(mini, "test", "cirr_task7")
    cirr_qrels.write_text("8:1 0 8:2 1 6\n")  # wrong task; no judgements for 8:2
    problems = validate_dir(mini, pairs=["mscoco_task3", "cirr_task7"], splits=("test",))
    by_place = {(p.path, p.line): p.message for p in problems}
    assert "positives of 9:6 are" in by_place[(str(qrels), 1)]
    assert "is not in" in by_place[(str(qrels), 6)] and "9:7" in by_place[(str(qrels), 6)]
    assert "task_id of 8:1 is 6 here but 7 in" in by_place[(str(cirr_qrels), 1)]
    q = query_path(mini, "test", "cirr_task7")
    assert "query 8:2 has no judgements" in by_place[(str(q), 2)]
    assert len(problems) == 4


def test_bad_files_do_not_stop_the_others(mini):
    q = query_path(mini, "test", "cirr_task7")
    lines = q.read_text().splitlines()
    q.write_text(lines[0] + "\n{oops\n")
    pool = local_pool_path(mini, "mscoco_task3")
    with open(pool, "a") as f:
        f.write(json.dumps({"did": "9:2", "txt": "again", "img_path": None, "modality": "text"}) + "\n")
    tsv = instructions_path(mini)
    tsv.write_text("\n".join(l for l in tsv.read_text().splitlines() if "\tCIRR\t" not in l) + "\n")
    problems = validate_dir(mini, splits=("test",))
    places = located(problems)
    assert (str(q), 2) in places
    assert (str(pool), 7) in places
    assert any(p.path == str(tsv) and "no instructions for dataset 8 (CIRR), image,text -> image"
               in p.message for p in problems)


def test_query_in_wrong_pair_file(mini):
    q = query_path(mini, "test", "mscoco_task0")
    rewrite_record(q, 2, qid="0:2")
    problems = validate_dir(mini, pairs=["mscoco_task0"], splits=("test",))
    assert any(p.line == 2 and "not from dataset 9 (MSCOCO)" in p.message for p in problems)


def test_first_positive_has_the_tasks_modality(mini):
    q = query_path(mini, "test", "mscoco_task0")
    pool = local_pool_path(mini, "mscoco_task0")
    with open(pool, "a") as f:
        f.write(json.dumps({"did": "9:30", "txt": "a caption", "img_path": None, "modality": "text"}) + "\n")
    rewrite_record(q, 1, pos_cand_list=["9:30"])
    qrels = qrels_path(mini, "test", "mscoco_task0")
    qrels.write_text("9:1 0 9:30 1 0\n9:2 0 9:1 1 0\n")
    problems = validate_dir(mini, pairs=["mscoco_task0"], splits=("test",))
    assert [(p.path, p.line) for p in problems] == [(str(q), 1)]
    assert "is 'text' but task 0 retrieves 'image'" in problems[0].message


def test_nothing_found(tmp_path):
    problems = validate_dir(tmp_path)
    assert len(problems) == 1 and problems[0].path == str(tmp_path) and problems[0].line is None
    assert "no M-BEIR files found" in str(problems[0])


def test_missing_instruction_table(mini):
    instructions_path(mini).unlink()
    problems = validate_dir(mini, splits=("test",))
    assert [str(p) for p in problems] == [f"{instructions_path(mini)}: missing: every M-BEIR "
                                          "directory needs its instruction table"]


def test_max_problems_and_command_output(mini, capsys):
    q = query_path(mini, "test", "mscoco_task0")
    q.write_text("".join(f'{{"qid": "9:{i}", "query_modality": "audio"}}\n' for i in range(1, 31)))
    assert len(validate_dir(mini, max_problems=5)) == 5
    assert validate_command(str(mini), ["mscoco_task0"], max_show=3) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [f"{q}:{i}: query_modality must be one of 'text', 'image', 'image,text', "
                       f"got 'audio'" for i in (1, 2, 3)]
    # 30 bad lines + the 2 qids of the qrels that are no longer in the query file
    assert out[3] == "... and 29 more problems" and len(out) == 4


def test_union_file_keeps_identical_repeats_but_not_conflicting_ones(tmp_path):
    record = {"qid": "8:1", "query_txt": "add a circle", "query_img_path": "mbeir_images/cirr_images/a.jpg",
              "query_modality": "image,text", "query_src_content": None, "pos_cand_list": ["8:2"],
              "neg_cand_list": [], "task_id": 7}
    union = tmp_path / "mbeir_union_up_train.jsonl"
    union.write_text("\n".join(json.dumps(r) for r in [record, record]) + "\n")
    assert [q.qid for q in read_queries(union)] == ["8:1", "8:1"]
    union.write_text("\n".join(json.dumps(r) for r in [record, {**record, "query_txt": "other"}]) + "\n")
    with pytest.raises(MBEIRFormatError, match=r"mbeir_union_up_train.jsonl:2: duplicate qid '8:1' with different content \(first on line 1\)"):
        read_queries(union)
    single = tmp_path / "mbeir_cirr_train.jsonl"
    single.write_text("\n".join(json.dumps(r) for r in [record, record]) + "\n")
    with pytest.raises(MBEIRFormatError, match=r"mbeir_cirr_train.jsonl:2: duplicate qid"):
        read_queries(single)
