"""--calib takes what users have: JSON lines, JSON, parquet, a datasets save_to_disk folder and
hf:NAME[:CONFIG][:SPLIT]; every mistake is one line naming the source and what to pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, neuqi, one_line_error

from neuqi.data.calib import load_calibration_text, stored_source
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.store import JobStore
from neuqi.util.errors import UserError

RECORDS = [
    {"text": "It is a truth universally acknowledged.", "id": 1, "body": "first body"},
    {"text": "The quick brown fox jumps over the lazy dog.", "id": 2, "body": "second body"},
]
JOINED = "It is a truth universally acknowledged.\n\nThe quick brown fox jumps over the lazy dog."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_records_joined_in_order(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "c.jsonl", RECORDS)
    assert load_calibration_text(f) == JOINED
    assert load_calibration_text(f, field="body") == "first body\n\nsecond body"


def test_json_as_records_or_columns(tmp_path: Path) -> None:
    records = tmp_path / "records.json"
    records.write_text(json.dumps(RECORDS))
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"text": [r["text"] for r in RECORDS]}))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": RECORDS}))
    for f in (records, columns, wrapped):
        assert load_calibration_text(f) == JOINED, f.name


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), f)
    assert load_calibration_text(f) == JOINED
    with pytest.raises(UserError, match=r"no field 'content' \(fields: text, id, body\).*--calib-field"):
        load_calibration_text(f, field="content")


def test_save_to_disk_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list(RECORDS)
    data.save_to_disk(str(tmp_path / "ds"))
    assert load_calibration_text(tmp_path / "ds") == JOINED
    # a DatasetDict: its train split
    datasets.DatasetDict({"validation": data.select([1]), "train": data.select([0])}).save_to_disk(
        str(tmp_path / "dd"))
    assert load_calibration_text(tmp_path / "dd") == RECORDS[0]["text"]


def test_a_missing_field_names_the_fields_and_the_option(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "c.jsonl", RECORDS)
    with pytest.raises(UserError, match=r"has no field 'content' \(fields: body, id, text\): name "
                                        r"the text field with --calib-field"):
        load_calibration_text(f, field="content")
    with pytest.raises(UserError, match="field 'id' holds int, not text"):
        load_calibration_text(f, field="id")


def test_bad_record_files_are_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match=r"is not valid JSONL \(line 2"):
        load_calibration_text(broken)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "  "}])
    with pytest.raises(UserError, match="holds no text"):
        load_calibration_text(empty)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3")
    with pytest.raises(UserError, match="expected a list of records"):
        load_calibration_text(scalar)


def test_a_malformed_hf_source() -> None:
    with pytest.raises(UserError, match="write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT"):
        load_calibration_text("hf:a:b:c:d")


def test_hf_source_offline_and_not_cached_is_one_line(tmp_path: Path) -> None:
    """No network in tests: offline mode and an empty cache, in a process of its own."""
    pytest.importorskip("datasets")
    code = (
        "from neuqi.data.calib import load_calibration_text\n"
        "from neuqi.util.errors import UserError\n"
        "try:\n"
        "    load_calibration_text('hf:wikitext:wikitext-2-raw-v1:train', max_chars=100)\n"
        "except UserError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300, check=False)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, (r.stdout, r.stderr)
    assert lines[0].startswith("--calib hf:wikitext:wikitext-2-raw-v1:train could not be read "
                               "(the hub cannot be reached, and it is not in the local cache)")
    assert "pass a local .txt/.jsonl/.parquet file or a save_to_disk folder" in lines[0]


def test_stored_source_keeps_hf_and_makes_paths_absolute(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert stored_source("hf:allenai/c4:en:train") == "hf:allenai/c4:en:train"
    assert stored_source("c.jsonl") == str(tmp_path / "c.jsonl")
    assert stored_source(None) is None


def test_calib_field_is_in_the_manifest_only_when_set() -> None:
    plain = QuantizeConfig(model="m", out="o").manifest("fp", "sha")
    assert "calib_field" not in plain["options"]  # job stores made before the option still match
    custom = QuantizeConfig(model="m", out="o", calib_field="body").manifest("fp", "sha")
    assert custom["options"]["calib_field"] == "body"
    assert QuantizeConfig.from_manifest(custom).calib_field == "body"


def test_quantize_from_jsonl_with_a_field(tiny_llama: Path, tmp_path: Path) -> None:
    rows = [{"body": f"Line {i}: quantization maps each weight to one of a few levels, "
                     f"w = s * (q - z), with scale s and zero-point z."} for i in range(20)]
    calib = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "out"
    bad = one_line_error(neuqi("quantize", str(tiny_llama), "--out", str(out), "--calib",
                               str(calib), "--group-size", "16", *TINY))
    assert "no field 'text' (fields: body)" in bad and "--calib-field" in bad
    assert not out.exists()
    r = neuqi("quantize", str(tiny_llama), "--out", str(out), "--calib", str(calib),
              "--calib-field", "body", "--bits", "4", "--group-size", "16", "--method", "minmax",
              *TINY)
    assert r.returncode == 0, r.stderr
    manifest = JobStore.open_existing(tmp_path / "out.job").manifest
    assert manifest["options"]["calib"] == str(calib)
    assert manifest["options"]["calib_field"] == "body"
