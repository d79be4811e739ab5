"""The command line as a batch job sees it: logs in a file, the job store after the run, status."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import neuqi, neuqi_cmd

from neuqi.pipeline.store import JobStore

TINY = ["--bits", "3", "--group-size", "16", "--nsamples", "4", "--seqlen", "32",
        "--batch-size", "3", "--device", "cpu"]
LAYERS = 3  # the tiny LLaMA's
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
PROGRESS = re.compile(r"\[(\d+)/(\d+) steps, (\S+) elapsed, ETA (\S+)\]$")


def neuqi_to_file(log: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI with stderr redirected to ``log`` (not a terminal), as nohup or a scheduler runs
    it; a narrow COLUMNS would make rich wrap lines if it did."""
    with log.open("w") as f:
        return subprocess.run(
            neuqi_cmd(*args), check=False, stdout=subprocess.PIPE, stderr=f, text=True,
            timeout=600,
            env={**os.environ, "COLUMNS": "60"},
        )


@pytest.fixture(scope="module")
def logged_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("log") / "out"
    log = out.with_name("quantize.log")
    r = neuqi_to_file(log, "quantize", str(tiny_llama), "--out", str(out), *TINY)
    assert r.returncode == 0, log.read_text()
    assert r.stdout.strip() == str(out)
    return out, log.read_text()


def test_redirected_log_has_one_line_per_layer_with_eta_and_no_wrapped_line(logged_run):
    _, log = logged_run
    lines = log.splitlines()
    assert lines and all(STAMP.match(line) for line in lines), log  # a wrapped line has none
    assert "\x1b" not in log  # no terminal control codes
    assert max(len(line) for line in lines) > 100  # long lines stay whole
    for i in range(1, LAYERS + 1):
        for stage in ("hessian", "forward"):
            if stage == "forward" and i == LAYERS:
                continue  # the last layer has no forward pass
            assert sum(f"layer {i}/{LAYERS} {stage} [" in line for line in lines) == 1, stage
        solved = [line for line in lines if f"layer {i}/{LAYERS}: weighted loss" in line]
        assert len(solved) == 1, log
        m = PROGRESS.search(solved[0])
        assert m, solved[0]
        assert int(m.group(2)) == 1 + LAYERS * (1 + 7) + (LAYERS - 1) + 1
        assert re.fullmatch(r"(\d+h)?(\d+m)?\d+s", m.group(4)), m.group(4)  # a known ETA
    done = [int(PROGRESS.search(line).group(1)) for line in lines if PROGRESS.search(line)]
    assert done == sorted(done)


def test_log_json_is_one_object_per_line(tiny_llama: Path, tmp_path: Path):
    log = tmp_path / "q.jsonl"
    r = neuqi_to_file(log, "quantize", str(tiny_llama), "--out", str(tmp_path / "o"), *TINY,
                      "--method", "minmax", "--log-json")
    assert r.returncode == 0, log.read_text()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    layers = [e for e in records if e["message"].startswith(f"layer 2/{LAYERS}: weighted loss")]
    assert len(layers) == 1
    assert layers[0]["total"] == 1 + LAYERS * 8 + LAYERS - 1 + 1
    assert layers[0]["eta_s"] >= 0 and layers[0]["elapsed_s"] > 0
    assert {"time", "event", "message"} <= set(records[-1])


# ----------------------------------------------------------------------- the job store after
def test_a_complete_run_deletes_the_job_stores_arrays_and_says_how_much(logged_run):
    out, log = logged_run
    job = out.with_name("out.job")
    assert JobStore.open_existing(job).array_names() == []
    left = sum(f.stat().st_size for f in job.rglob("*") if f.is_file())
    assert left < 20_000  # the manifest, the records, empty group metadata
    assert (job / "zarr.json").is_file() and (job / "done" / "pack.json").is_file()
    assert re.search(rf"job store {re.escape(str(job))}: deleted its intermediate arrays "
                     r"\(\d+\.\d (kB|MB)\), kept .* \(\d+\.\d kB\)", log), log
    status = json.loads(neuqi("status", str(job), "--json").stdout)
    assert status["complete"] and status["done"] == status["total"]


def test_a_finished_pruned_job_says_it_is_complete_and_refuses_a_lost_output(
    logged_run, tiny_llama: Path
):
    out, _ = logged_run
    job = out.with_name("out.job")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for cmd in (["quantize", str(tiny_llama), "--out", str(out), *TINY],
                ["resume", str(job)]):
        r = neuqi(*cmd)
        assert r.returncode == 0, r.stderr
        assert "is complete" in r.stderr and r.stdout.strip() == str(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    moved = out.with_name("moved")
    out.rename(moved)
    try:
        r = neuqi("resume", str(job))
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and f"delete {job}" in r.stderr, r.stderr
        assert not out.exists()
    finally:
        moved.rename(out)


def test_keep_job_keeps_the_arrays(tiny_llama: Path, tmp_path: Path):
    out = tmp_path / "o"
    r = neuqi("quantize", str(tiny_llama), "--out", str(out), *TINY, "--method", "minmax",
              "--keep-job")
    assert r.returncode == 0, r.stderr
    job = out.with_name("o.job")
    assert any((job / "arrays").rglob("zarr.json"))
    assert f"job store {job} kept whole" in r.stderr


# ----------------------------------------------------------------------- status, errors
def test_status_imports_neither_torch_nor_transformers(logged_run):
    out, _ = logged_run
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from neuqi.cli import main; main()",
         "status", str(out.with_name("out.job"))],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "complete" in r.stdout
    modules = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()
               if line.startswith("import time:")}
    assert "rich" in modules and not {"torch", "transformers", "zarr", "numpy"} & modules


def test_a_missing_model_is_named_as_the_usage_names_it(tmp_path: Path):
    r = neuqi("quantize", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr == f"error: MODEL {tmp_path / 'nothing'}: folder does not exist\n"
    wikitext = Path(__file__).resolve().parents[1] / "data" / "wikitext2-test.raw"
    r = neuqi("eval", str(tmp_path / "nothing"), "--data", str(wikitext))
    assert r.returncode == 2 and r.stderr.startswith(f"error: MODEL_OR_OUTPUT {tmp_path}")


def test_version_and_every_help_ends_with_an_example() -> None:
    from importlib.metadata import version

    exe = str(Path(sys.executable).with_name("neuqi"))
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"neuqi {version('neuqi')}"
    for command in ("quantize", "plan", "resume", "status", "eval", "export", "distill"):
        r = subprocess.run([exe, command, "--help"], capture_output=True, text=True,
                           check=False, timeout=120, env={**os.environ, "COLUMNS": "300"})
        assert r.returncode == 0, r.stderr
        lines = [line.strip() for line in r.stdout.splitlines() if line.strip()]
        assert lines[-1].startswith(f"Example: neuqi {command} "), (command, lines[-1])
