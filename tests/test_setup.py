"""The setup cell's library call: knobs from a notebook's globals, overrides, and the data it finds."""

import pytest

import uniir_lite
from uniir_lite.config import load_profile, parse_overrides
from uniir_lite.data.sources import MissingData, require_mbeir
from uniir_lite.data.synthetic import write_benchmark


def test_setup_reads_the_knobs_from_globals(tmp_path):
    # its own DATA_DIR: seed 3 would otherwise rewrite the checkout's data/synthetic/tiny (seed 0)
    notebook = {"PROFILE": "tiny", "SEED": 3, "DEVICE": None, "OUT_DIR": str(tmp_path / "out"),
                "FIG_DIR": str(tmp_path / "fig"), "DATA_DIR": str(tmp_path / "data"), "unrelated": 1}
    cfg = uniir_lite.setup(notebook)
    assert cfg.profile == "tiny" and cfg.seed == 3 and cfg.device == "cpu"
    assert cfg.max_steps == load_profile("tiny")["MAX_STEPS"]  # absent: the profile's value
    assert (cfg.data_root / "instructions" / "query_instructions.tsv").is_file()  # the synthetic benchmark
    assert cfg.data_root == tmp_path / "data"
    assert (tmp_path / "out" / "metrics").is_dir()


def test_full_profile_without_mbeir_says_what_to_fetch(tmp_path):
    notebook = {"PROFILE": "full", "DEVICE": "cpu", "DATA_DIR": str(tmp_path / "M-BEIR"),
                "OUT_DIR": str(tmp_path / "out"), "FIG_DIR": str(tmp_path / "fig")}
    with pytest.raises(MissingData) as err:
        uniir_lite.setup(notebook)
    message = str(err.value)
    assert str(tmp_path / "M-BEIR") in message and "does not exist" in message
    assert "169 GB" in message and "git clone https://huggingface.co/datasets/TIGER-Lab/M-BEIR" in message
    # shown without a traceback in a notebook
    assert err.value._render_traceback_() == [f"MissingData: {message}"]


def test_full_profile_finds_an_mbeir_directory(tmp_path):
    # a miniature in the real layout: the synthetic benchmark is written in exactly M-BEIR's layout
    root = write_benchmark(tmp_path / "M-BEIR", size="tiny", seed=0)
    notebook = {"PROFILE": "full", "DEVICE": "cpu", "DATA_DIR": str(root), "OUT_DIR": str(tmp_path / "out"),
                "FIG_DIR": str(tmp_path / "fig")}
    assert uniir_lite.setup(notebook).data_root == root
    (root / "instructions" / "query_instructions.tsv").unlink()
    with pytest.raises(MissingData, match="lacks instructions/query_instructions.tsv"):
        require_mbeir(root)


def test_parse_overrides():
    assert parse_overrides(["DEVICE=cpu", "MAX_STEPS=20", "PRETRAINED=false"]) == {
        "DEVICE": "cpu", "MAX_STEPS": 20, "PRETRAINED": False}
    with pytest.raises(ValueError, match="not a knob"):
        parse_overrides(["DEVICES=cpu"])
    with pytest.raises(ValueError, match="KNOB=VALUE"):
        parse_overrides(["DEVICE"])
