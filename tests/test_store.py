"""Tests for neuqi.pipeline.store: the zarr v3 job store (arrays, records, lock, recovery)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from neuqi.pipeline.store import JobStore
from neuqi.util.errors import UserError

MANIFEST = {"bits": 4, "group_size": 128, "model": {"fingerprint": "abc123", "layers": 3}}


def _store(tmp_path: Path, manifest: dict | None = None) -> JobStore:
    return JobStore.create_or_open(tmp_path / "job", manifest or MANIFEST)


# ----------------------------------------------------------------------------- opening


def test_create_then_reopen(tmp_path: Path) -> None:
    s = _store(tmp_path)
    assert s.path == (tmp_path / "job").absolute()
    assert s.manifest == MANIFEST
    meta = json.loads((tmp_path / "job" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    assert meta["attributes"]["manifest"] == MANIFEST
    again = JobStore.create_or_open(tmp_path / "job", dict(MANIFEST))
    assert again.manifest == MANIFEST
    assert JobStore.open_existing(str(tmp_path / "job")).manifest == MANIFEST
    assert JobStore.open_existing(f"file://{tmp_path / 'job'}").manifest == MANIFEST


def test_manifest_mismatch_names_keys(tmp_path: Path) -> None:
    _store(tmp_path)
    other = {**MANIFEST, "bits": 3, "group_size": 64, "model": {"fingerprint": "zzz", "layers": 3}}
    with pytest.raises(UserError) as err:
        JobStore.create_or_open(tmp_path / "job", other)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "job") in msg
    assert "bits 4 -> 3" in msg
    assert "group_size 128 -> 64" in msg
    assert "model.fingerprint abc123 -> zzz" in msg
    assert "layers" not in msg
    assert "--job" in msg
    with pytest.raises(UserError, match=r"seed \(unset\) -> 1"):
        JobStore.create_or_open(tmp_path / "job", {**MANIFEST, "seed": 1})


def test_non_store_folders_refused(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="not a neuqi job store"):
        JobStore.create_or_open(busy, MANIFEST)
    with pytest.raises(UserError, match="not a neuqi job store"):
        JobStore.open_existing(busy)
    with pytest.raises(UserError, match="not a neuqi job store"):
        JobStore.open_existing(tmp_path / "missing")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        JobStore.create_or_open(f, MANIFEST)
    other_zarr = tmp_path / "other"
    other_zarr.mkdir()
    (other_zarr / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    with pytest.raises(UserError, match="zarr store but not a neuqi job store"):
        JobStore.create_or_open(other_zarr, MANIFEST)
    # An existing empty folder is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert JobStore.create_or_open(empty, MANIFEST).manifest == MANIFEST


def test_store_is_picklable_without_lock(tmp_path: Path) -> None:
    s = _store(tmp_path)
    with s.locked():
        copy = pickle.loads(pickle.dumps(s))
        assert s.holds_lock and not copy.holds_lock
        copy.write_array("a", torch.arange(3))
        assert torch.equal(s.read_array("a"), torch.arange(3))


# ----------------------------------------------------------------------------- arrays


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.uint8,
        torch.int64,
        torch.int32,
        torch.bool,
    ],
)
def test_roundtrip_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    s = _store(tmp_path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, 3, generator=g) * 100
    if dtype == torch.bool:
        t = x > 0
    elif dtype.is_floating_point:
        t = x.to(dtype)
    else:
        t = x.abs().to(dtype)
    s.write_array("w/t", t, chunks=3)
    back = s.read_array("w/t")
    assert back.dtype == dtype
    assert back.shape == t.shape
    assert torch.equal(back, t)
    assert torch.equal(s.read_array("w/t", rows=slice(2, 6)), t[2:6])
    assert s.array_dtype("w/t") == dtype and s.array_shape("w/t") == (7, 5, 3)
    # Reopened: same bytes.
    assert torch.equal(JobStore.open_existing(s.path).read_array("w/t"), t)


def test_special_shapes_and_views(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.write_array("scalar", torch.tensor(3.5))
    assert s.read_array("scalar").shape == () and s.read_array("scalar").item() == 3.5
    s.write_array("empty", torch.zeros(0, 4, dtype=torch.float16))
    assert s.read_array("empty").shape == (0, 4)
    base = torch.arange(24, dtype=torch.int32).reshape(4, 6)
    s.write_array("t", base.t())  # non-contiguous input
    assert torch.equal(s.read_array("t"), base.t())
    s.write_array("t", torch.ones(2))  # replaced, new shape and dtype
    assert torch.equal(s.read_array("t"), torch.ones(2))


def test_incremental_rows(tmp_path: Path) -> None:
    s = _store(tmp_path)
    batches = [torch.randn(4, 8, 16).bfloat16() for _ in range(3)]
    s.create_array("capture/0/inputs", (12, 8, 16), torch.bfloat16, chunks=4)
    for i, b in enumerate(batches):
        s.write_rows("capture/0/inputs", 4 * i, b)
    chunk_dir = s.path / "arrays" / "capture" / "0" / "inputs" / "c"
    assert sorted(p.name for p in chunk_dir.iterdir()) == ["0", "1", "2"]  # one chunk per batch
    assert torch.equal(s.read_array("capture/0/inputs"), torch.cat(batches))
    assert torch.equal(s.read_array("capture/0/inputs", rows=slice(4, 8)), batches[1])
    with pytest.raises(ValueError, match="do not fit"):
        s.write_rows("capture/0/inputs", 10, batches[0])
    with pytest.raises(ValueError, match="float32"):
        s.write_rows("capture/0/inputs", 0, batches[0].float())


def test_names_delete_and_discard(tmp_path: Path) -> None:
    s = _store(tmp_path)
    for name in ["capture/2/x", "capture/10/x", "capture/1/x", "solve/1/mlp.up_proj/codes"]:
        s.write_array(name, torch.zeros(2))
    assert s.array_names() == [
        "capture/1/x",
        "capture/2/x",
        "capture/10/x",
        "solve/1/mlp.up_proj/codes",
    ]
    assert s.array_names("capture/1") == ["capture/1/x"]
    assert s.has_array("capture/1/x") and not s.has_array("capture/1")
    s.delete("capture/2/x")
    assert not s.has_array("capture/2/x")
    s.delete("capture/2/x")  # absent: no error
    with pytest.raises(KeyError):
        s.read_array("capture/2/x")
    s.mark_done("capture/1", arrays=["capture/1/x"])
    with pytest.raises(ValueError, match="recorded"):
        s.discard_incomplete("capture")
    assert s.discard_incomplete("solve/1") == ["solve/1/mlp.up_proj/codes"]
    assert s.array_names("solve") == []
    with pytest.raises(ValueError):
        s.write_array("../escape", torch.zeros(1))


# ----------------------------------------------------------------------------- records


def test_records(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.write_array("solve/3/self_attn.q_proj/codes", torch.zeros(4, dtype=torch.uint8))
    assert not s.is_done("solve/3/self_attn.q_proj")
    assert s.record("solve/3/self_attn.q_proj") is None
    s.mark_done(
        "solve/3/self_attn.q_proj", {"loss": 0.25}, arrays=["solve/3/self_attn.q_proj/codes"]
    )
    s.mark_done("capture/3")
    s.mark_done("solve/30/mlp.up_proj")
    s.mark_done("export")
    with pytest.raises(ValueError, match="does not exist"):
        s.mark_done("solve/4/x", arrays=["nope"])
    assert not s.is_done("solve/4/x")

    again = JobStore.open_existing(s.path)
    rec = again.record("solve/3/self_attn.q_proj")
    assert rec is not None
    assert rec["info"] == {"loss": 0.25}
    assert rec["arrays"] == ["solve/3/self_attn.q_proj/codes"]
    assert again.is_done("capture/3") and again.record("capture/3")["info"] == {}
    assert list(again.records()) == [
        "capture/3",
        "export",
        "solve/3/self_attn.q_proj",
        "solve/30/mlp.up_proj",
    ]
    assert list(again.records("solve/3")) == ["solve/3/self_attn.q_proj"]  # not solve/30
    assert list(again.records("capture/3")) == ["capture/3"]
    assert again.progress() == {"capture": {"3": 1}, "export": {"": 1}, "solve": {"3": 1, "30": 1}}
    again.unmark("capture/3")
    assert not s.is_done("capture/3")
    # No temporary files left behind.
    assert not [p for p in s.path.rglob("*") if p.name.endswith((".tmp", ".partial"))]


def test_recover_removes_partials(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.write_array("a", torch.arange(10), chunks=5)
    chunk = s.path / "arrays" / "a" / "c" / "0"
    leftover = chunk.with_suffix(".0123abcd.partial")
    leftover.write_bytes(b"half a chunk")
    mine = s.path / "done" / ".x.json.deadbeef.tmp"
    mine.parent.mkdir(exist_ok=True)
    mine.write_text("{")
    assert s.records() == {} and not s.is_done("x")  # a temporary record is never read
    assert s.recover() == 2
    assert not leftover.exists() and not mine.exists()
    assert torch.equal(s.read_array("a"), torch.arange(10))
    # acquire_lock recovers too
    leftover.write_bytes(b"x")
    with s.locked():
        assert not leftover.exists()


# ----------------------------------------------------------------------------- lock


def _write_lock(store: JobStore, pid: int) -> None:
    info = {"pid": pid, "host": socket.gethostname(), "started": "2024-01-01T00:00:00+00:00"}
    (store.path / "LOCK").write_text(json.dumps(info))


def test_lock_basic(tmp_path: Path) -> None:
    s = _store(tmp_path)
    with s.locked():
        info = json.loads((s.path / "LOCK").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert s.lock_is_live()
        other = JobStore.open_existing(s.path)
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
            other.acquire_lock()
    assert not (s.path / "LOCK").exists()
    other.acquire_lock()  # free again
    other.release_lock()


def test_lock_refused_while_live_process_holds_it(tmp_path: Path) -> None:
    s = _store(tmp_path)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _write_lock(s, sleeper.pid)
        with pytest.raises(UserError) as err:
            s.acquire_lock()
        msg = str(err.value)
        assert f"in use by process {sleeper.pid} on {socket.gethostname()}" in msg
        assert "started 2024-01-01" in msg and "wait for it or stop it" in msg
        assert str(tmp_path / "job") in msg
        assert json.loads((s.path / "LOCK").read_text())["pid"] == sleeper.pid  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    # Now the holder is dead: the stale lock is taken over.
    s.acquire_lock()
    assert json.loads((s.path / "LOCK").read_text())["pid"] == os.getpid()
    s.release_lock()


def test_stale_lock_taken_over(tmp_path: Path) -> None:
    s = _store(tmp_path)
    finished = subprocess.Popen(["true"])
    finished.wait()
    _write_lock(s, finished.pid)
    (s.path / "arrays").mkdir(exist_ok=True)
    debris = s.path / "arrays" / "x.1234.partial"
    debris.write_text("x")
    with s.locked():
        info = json.loads((s.path / "LOCK").read_text())
        assert info["pid"] == os.getpid()
        assert not debris.exists()
    assert not (s.path / "LOCK").exists()


def test_lock_on_other_host_refused(tmp_path: Path) -> None:
    s = _store(tmp_path)
    info = {"pid": 1, "host": "elsewhere.example", "started": "2024-01-01T00:00:00+00:00"}
    (s.path / "LOCK").write_text(json.dumps(info))
    with pytest.raises(UserError, match="process 1 on elsewhere.example .* delete .*LOCK"):
        s.acquire_lock()


# ----------------------------------------------------------------------------- SIGKILL


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from neuqi.pipeline.store import JobStore

    store = JobStore.open_existing(sys.argv[1])
    store.acquire_lock()
    store.mark_done("capture/0", arrays=[])
    rows = 64
    store.create_array("capture/1/inputs", (rows * 2048, 256), torch.float32, chunks=rows)
    print("started", flush=True)
    g = torch.Generator().manual_seed(1)
    for i in range(2048):
        store.write_rows("capture/1/inputs", i * rows, torch.randn(rows, 256, generator=g))
    store.mark_done("capture/1", arrays=["capture/1/inputs"])
    print("finished", flush=True)
    """
)


def test_sigkill_while_writing_then_resume(tmp_path: Path) -> None:
    s = _store(tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(s.path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started"
        chunks = s.path / "arrays" / "capture" / "1" / "inputs" / "c"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (chunks.exists() and any(chunks.iterdir())):
            time.sleep(0.005)
        time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL

    store = JobStore.create_or_open(tmp_path / "job", MANIFEST)
    assert store.is_done("capture/0")
    assert not store.is_done("capture/1")
    assert store.has_array("capture/1/inputs")  # data without its record: redo it
    assert store.lock_info() is not None and not store.lock_is_live()
    with store.locked():  # stale lock of the killed child taken over; debris removed
        assert not list(store.path.rglob("*.partial"))
        assert store.discard_incomplete("capture/1") == ["capture/1/inputs"]
        data = torch.randn(10, 256)
        store.create_array("capture/1/inputs", (10, 256), torch.float32, chunks=4)
        store.write_rows("capture/1/inputs", 0, data[:4])
        store.write_rows("capture/1/inputs", 4, data[4:])
        store.mark_done("capture/1", {"rows": 10}, arrays=["capture/1/inputs"])
    reopened = JobStore.open_existing(tmp_path / "job")
    assert reopened.record("capture/1")["info"] == {"rows": 10}
    assert torch.equal(reopened.read_array("capture/1/inputs"), data)
