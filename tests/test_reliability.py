"""Crashes and resumes as a user meets them: a real `neuqi quantize` process, SIGKILLed at seeded
random moments in every stage (after a completion record, in the middle of a zarr array write, in
the middle of an output file, after a wall-clock delay), resumed each time; the final output must
be bitwise the output of an uninterrupted run.

The CI run kills 5 times (one kill in each of embed, hessian, solve, forward and pack); ``-m slow``
runs 22 targeted kills in one chain and 3 wall-clock kills.

Which bytes may differ between two runs: only ``created.time`` in ``neuqi.json`` (when the output
was written). Every other byte of every file of the output folder is compared.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import TINY, assert_same_output, neuqi, neuqi_cmd, one_line_error, output_files

from neuqi.model.layers import LLAMA_LIKE
from neuqi.pipeline.store import JobStore
from neuqi.util import faults

OPTIONS = ["--bits", "3", "--group-size", "16", "--method", "neuqi-int", *TINY]
LAYERS = 3  # tiny_llama
BATCHES = 2  # ceil(nsamples / batch-size): row writes of each activation array


# A process that imports neuqi once and then forks one child per command: each child is a real
# `neuqi` process (its own pid, files, SIGKILL) running neuqi.cli.main() with the command's
# arguments, minus the seconds of importing torch and transformers again. The zygote itself
# never computes anything, so forking it is safe (no thread pools, no zarr I/O loop yet).
_ZYGOTE = r"""
import json, os, sys
import neuqi.cli, neuqi.pipeline.runner, safetensors.torch, zarr  # noqa: F401 - warm imports
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401 - transformers imports lazily
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.update(req["env"])
        fd = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = ["neuqi", *req["argv"]]
        code = 0
        try:
            neuqi.cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print(json.dumps({"returncode": code}), flush=True)
"""


class Zygote:
    """Runs `neuqi` commands in forked children of one warm process (see ``_ZYGOTE``)."""

    def __init__(self, tmp: Path, warm: tuple[str, ...] = ()) -> None:
        """``warm``: more modules the zygote imports once (e.g. a model family's modelling)."""
        self.tmp = tmp
        started = time.monotonic()
        script = "".join(f"import {module}\n" for module in warm) + _ZYGOTE
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"
        self.startup_seconds = time.monotonic() - started  # what a plain `neuqi` spends first
        self.runs = 0

    def __call__(self, *args: str, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.runs += 1
        err = self.tmp / f"stderr-{self.runs}.txt"
        self.proc.stdin.write(json.dumps(
            {"argv": list(args), "env": env or {}, "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the zygote process died"
        code = json.loads(reply)["returncode"]
        return subprocess.CompletedProcess(args, code, "", err.read_text())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def forked(tmp_path_factory: pytest.TempPathFactory):
    zygote = Zygote(tmp_path_factory.mktemp("zygote"))
    yield zygote
    zygote.close()


@dataclass(frozen=True)
class Reference:
    out: Path
    seconds: float  # wall time of an uninterrupted `neuqi quantize`, process start included


@pytest.fixture(scope="module")
def reference(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory, forked: Zygote
) -> Reference:
    """The uninterrupted run every crashed run must match."""
    out = tmp_path_factory.mktemp("reliability-ref") / "out"
    started = time.monotonic()
    r = forked("quantize", str(tiny_llama), "--out", str(out), *OPTIONS)
    seconds = time.monotonic() - started + forked.startup_seconds
    assert r.returncode == 0, r.stderr
    return Reference(out, seconds)


# ------------------------------------------------------------------------------ the kill plan


def steps() -> list[str]:
    """Completion records in the order the runner writes them."""
    out = ["embed"]
    for i in range(LAYERS):
        out.append(f"hessian/{i}")
        out += [f"solve/{i}/{linear}" for _, linears in LLAMA_LIKE.linear_groups
                for linear in linears]
        if i < LAYERS - 1:
            out.append(f"forward/{i}")
    return [*out, "pack"]


STEPS = steps()


@dataclass(frozen=True)
class KillPoint:
    """Where to kill: inside step ``step`` (a write or output kill) or right after its record."""

    step: str
    kind: str  # "write" | "output" | "record"
    spec: str = ""  # the fault variable's value (write/output); record kills compute theirs

    @property
    def stage(self) -> str:
        return self.step.split("/")[0]

    def order(self) -> tuple[int, int]:
        return STEPS.index(self.step), 1 if self.kind == "record" else 0

    def env(self, job: Path) -> dict[str, str]:
        if self.kind == "write":
            return {faults.KILL_IN_WRITE: self.spec}
        if self.kind == "output":
            return {faults.KILL_IN_OUTPUT: self.spec}
        # the k-th record this process writes: count the steps still to do up to this one
        store = JobStore.open_existing(job) if job.exists() else None
        remaining = [s for s in STEPS if store is None or not store.is_done(s)]
        return {faults.KILL_AFTER_RECORDS: str(remaining.index(self.step) + 1)}


def kill_points(reference: Path) -> list[KillPoint]:
    """Every place the harness can kill the tiny job, in pipeline order."""
    points = [KillPoint("embed", "write", "calib/tokens:1")]
    points += [KillPoint("embed", "write", f"acts/0:{k}") for k in range(1, BATCHES + 1)]
    for i in range(LAYERS):
        points += [KillPoint(f"hessian/{i}", "write", f"layers/{i}/h/{group}:1")
                   for group, _ in LLAMA_LIKE.linear_groups]
        for _, linears in LLAMA_LIKE.linear_groups:
            for linear in linears:
                points += [KillPoint(f"solve/{i}/{linear}", "write",
                                     f"layers/{i}/q/{linear}/{part}:1")
                           for part in ("codes", "scale", "zero_point", "loss")]
        if i < LAYERS - 1:
            points += [KillPoint(f"forward/{i}", "write", f"acts/{i + 1}:{k}")
                       for k in range(1, BATCHES + 1)]
    points += [KillPoint(step, "record") for step in STEPS[:-1]]
    # output files, under the names they have while written (shards are renamed at the end)
    files = sorted(p.name for p in reference.iterdir())
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    points += [KillPoint("pack", "output", f"model-{k + 1:05d}.safetensors:1")
               for k in range(len(shards))]
    points += [KillPoint("pack", "output", f"{name}:1") for name in files if name not in shards]
    return points


def choose(points: list[KillPoint], count: int, seed: int) -> list[KillPoint]:
    """``count`` seeded random kill points, one or more in each stage, in pipeline order."""
    rng = random.Random(seed)
    stages = ["embed", "hessian", "solve", "forward", "pack"]
    chosen = [rng.choice([p for p in points if p.stage == stage]) for stage in stages]
    rest = [p for p in points if p not in chosen]
    chosen += rng.sample(rest, count - len(chosen))
    return sorted(chosen, key=KillPoint.order)


def unrecorded_arrays(job: Path) -> list[str]:
    store = JobStore.open_existing(job)
    recorded = {a for r in store.records().values() for a in r.get("arrays", [])}
    return [a for a in store.array_names() if a not in recorded]


def kill_and_resume(
    model: Path, out: Path, plan: list[KillPoint], reference: Path, run=neuqi
) -> None:
    """Run the job with each kill in turn, check what each kill left, resume, compare."""
    job = out.with_name(out.name + ".job")
    cmd = ["quantize", str(model), "--out", str(out), *OPTIONS]
    for point in plan:
        before = set(JobStore.open_existing(job).records()) if job.exists() else set()
        r = run(*cmd, env=point.env(job))
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])
        assert not out.exists(), point  # never an output that looks complete
        store = JobStore.open_existing(job)
        assert store.lock_info() is not None and not store.lock_is_live()  # stale: taken over
        done = set(store.records())
        assert before <= done, point  # finished work is never lost
        if point.kind == "record":
            assert point.step in done and STEPS[STEPS.index(point.step) + 1] not in done
        else:
            assert point.step not in done, point
        if point.kind == "write":
            # the torn array is there, without a record: it must be redone, not read
            name = point.spec.rpartition(":")[0]
            torn = unrecorded_arrays(job)
            assert name in torn, (point, torn)
        if point.kind == "output":
            partial = list(out.parent.glob(f"{out.name}.partial-*"))
            assert partial, point  # the torn file lies in the unpublished temporary folder
    r = run("resume", str(job), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "resuming job" in r.stderr
    assert not list(out.parent.glob(f"{out.name}.partial-*"))  # debris of killed writers gone
    assert_same_output(out, reference)


# ------------------------------------------------------------------------------ the tests


def test_kill_points_cover_every_stage(reference: Reference) -> None:
    points = kill_points(reference.out)
    assert {p.stage for p in points} == {"embed", "hessian", "solve", "forward", "pack"}
    assert {p.kind for p in points} == {"write", "record", "output"}
    plan = choose(points, 5, seed=7)
    assert len(plan) == 5 and {p.stage for p in plan} == {
        "embed", "hessian", "solve", "forward", "pack"}


def test_killed_in_every_stage_then_resumed_is_bitwise_identical(
    reference: Reference, tiny_llama: Path, tmp_path: Path, forked: Zygote
) -> None:
    plan = choose(kill_points(reference.out), 5, seed=2026)
    kill_and_resume(tiny_llama, tmp_path / "out", plan, reference.out, forked)


@pytest.mark.slow
def test_killed_22_times_then_resumed_is_bitwise_identical(
    reference: Reference, tiny_llama: Path, tmp_path: Path, forked: Zygote
) -> None:
    plan = choose(kill_points(reference.out), 22, seed=7)
    assert {p.kind for p in plan} == {"write", "record", "output"}
    kill_and_resume(tiny_llama, tmp_path / "out", plan, reference.out, forked)


@pytest.mark.slow
def test_killed_after_a_random_delay_then_resumed_is_bitwise_identical(
    reference: Reference, tiny_llama: Path, tmp_path: Path
) -> None:
    """SIGKILL at seeded random wall-clock moments of the uninterrupted run's duration, three
    fresh jobs, plain `python -c` processes (imports included, as a user runs it)."""
    kills = 0
    for seed in (1, 2, 3):
        out = tmp_path / f"out{seed}"
        cmd = ["quantize", str(tiny_llama), "--out", str(out), *OPTIONS]
        delay = random.Random(seed).uniform(0.2, 0.95) * reference.seconds
        child = subprocess.Popen(neuqi_cmd(*cmd), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
        if child.returncode == -signal.SIGKILL:
            kills += 1
            # either no output yet, or (killed between publishing it and its record) the
            # complete one
            if out.exists():
                assert_same_output(out, reference.out)
            r = neuqi(*cmd)  # the same command again (the job store may not exist yet)
            assert r.returncode == 0, r.stderr
        else:
            assert child.returncode == 0  # finished before its kill time
        assert_same_output(out, reference.out)
    assert kills >= 2  # the delays lie within the run's duration: most runs are killed


# ------------------------------------------------------------------------------ bad input


def copy_model(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def edit_json(file: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def rewrite_header(file: Path, edit: Callable[[dict], object]) -> None:
    """Give a safetensors file a new header (the data bytes stay as they are)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f"{out.name}.partial-*"))
    assert not list(out.parent.glob(f"{out.name}.old-*"))


def _truncated(model: Path, tmp: Path) -> tuple[list[str], list[str]]:
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    return [], [str(shard), "truncated", "re-download"]


def _header_size_lie(model: Path, tmp: Path) -> tuple[list[str], list[str]]:
    # q_proj claims twice its shape: its bytes would run into k_proj's
    name = "model.layers.1.self_attn.q_proj.weight"
    rewrite_header(model / "model.safetensors", lambda h: h[name].update(shape=[128, 64]))
    return [], ["model.safetensors", "header lies", name]


def _header_offset_lie(model: Path, tmp: Path) -> tuple[list[str], list[str]]:
    # two tensors of one shape claim the same bytes (sizes right, offsets overlapping)
    a, b = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    rewrite_header(model / "model.safetensors",
                   lambda h: h[b].update(data_offsets=h[a]["data_offsets"]))
    return [], ["model.safetensors", "header lies about the offsets"]


def _index_names_missing_file(model: Path, tmp: Path) -> tuple[list[str], list[str]]:
    edit_json(model / "model.safetensors.index.json",
              lambda d: d["weight_map"].update({"model.norm.weight": "model-00009-of-00009.safetensors"}))
    return [], ["model-00009-of-00009.safetensors", "missing", "re-download"]


def _index_names_parent(model: Path, tmp: Path) -> tuple[list[str], list[str]]:
    (tmp / "x").write_bytes((model / min(p.name for p in model.glob("model-*"))).read_bytes())
    edit_json(model / "model.safetensors.index.json",
              lambda d: d["weight_map"].update({"model.norm.weight": "../x"}))
    return [], ["model.safetensors.index.json", "'../x'", "not a plain file name"]


def _bits(bits: int) -> Callable[[Path, Path], tuple[list[str], list[str]]]:
    return lambda model, tmp: (["--bits", str(bits)], [f"--bits {bits}", "2, 3 or 4 bits"])


def _calib_too_short(model: Path, tmp: Path) -> tuple[list[str], list[str]]:
    calib = tmp / "short.txt"
    calib.write_text("Only a few words of text.\n")
    return ["--calib", str(calib)], ["--seqlen 32", "--calib"]


def _calib_not_text(model: Path, tmp: Path) -> tuple[list[str], list[str]]:
    calib = tmp / "calib.txt"
    calib.write_bytes(bytes(range(256)) * 64)
    return ["--calib", str(calib)], [f"--calib {calib}", "not a UTF-8 text file"]


def _tokenizer_field_is_a_path(model: Path, tmp: Path) -> tuple[list[str], list[str]]:
    secret = tmp / "secret.json"
    secret.write_text(json.dumps({"not": "yours"}))
    edit_json(model / "tokenizer_config.json", lambda d: d.update(vocab_file="../secret.json"))
    return [], ["tokenizer_config.json", "vocab_file", "'../secret.json'", "outside the model"]


def _config_field_is_a_path(model: Path, tmp: Path) -> tuple[list[str], list[str]]:
    edit_json(model / "config.json", lambda d: d.update(tokenizer_file="/etc/passwd"))
    return [], ["config.json", "tokenizer_file", "/etc/passwd", "outside the model"]


def _pickle_only(model: Path, tmp: Path) -> tuple[list[str], list[str]]:
    """A pickle checkpoint whose unpickling would create a file: it must never be loaded."""
    for f in model.glob("*.safetensors"):
        f.unlink()

    class Payload:
        def __reduce__(self):  # runs os.system(...) when unpickled
            return (os.system, (f"touch {tmp / 'PWNED'}",))

    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    return [], [str(model), "safetensors checkpoints only"]


BAD_INPUT = {
    "truncated-shard": ("tiny_llama", _truncated),
    "header-lies-about-size": ("tiny_llama", _header_size_lie),
    "header-lies-about-offsets": ("tiny_llama", _header_offset_lie),
    "index-names-missing-file": ("tiny_llama_sharded", _index_names_missing_file),
    "index-names-../x": ("tiny_llama_sharded", _index_names_parent),
    "bits-1": ("tiny_llama", _bits(1)),
    "bits-9": ("tiny_llama", _bits(9)),
    "bits-7": ("tiny_llama", _bits(7)),  # the solver takes it, the README documents 2, 3 and 4
    "calib-shorter-than-seqlen": ("tiny_llama", _calib_too_short),
    "calib-not-text": ("tiny_llama", _calib_not_text),
    "tokenizer-config-field-is-a-path": ("tiny_llama", _tokenizer_field_is_a_path),
    "config-field-is-a-path": ("tiny_llama", _config_field_is_a_path),
    "pickle-checkpoint": ("tiny_llama", _pickle_only),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: str, request: pytest.FixtureRequest, tmp_path: Path, forked: Zygote
) -> None:
    fixture, make = BAD_INPUT[case]
    model = copy_model(request.getfixturevalue(fixture), tmp_path)
    args, expected = make(model, tmp_path)
    out = tmp_path / "out"
    line = one_line_error(forked("quantize", str(model), "--out", str(out), *OPTIONS, *args))
    for text in expected:
        assert text in line, (text, line)
    assert_nothing_written(out)
    assert not out.with_name("out.job").exists()  # refused before any work
    assert not (tmp_path / "PWNED").exists()


def test_job_store_of_another_model_is_refused(
    tiny_llama: Path, tiny_model_factory: Callable[..., Path], tmp_path: Path, forked: Zygote
) -> None:
    """The model folder's weights were replaced (a different model) under a half-done job."""
    model = copy_model(tiny_llama, tmp_path)
    out = tmp_path / "out"
    cmd = ["quantize", str(model), "--out", str(out), *OPTIONS]
    r = forked(*cmd, env={faults.KILL_AFTER_RECORDS: "2"})
    assert r.returncode == -signal.SIGKILL
    job = out.with_name("out.job")
    records = JobStore.open_existing(job).records()
    other = tiny_model_factory("llama", seed=1)
    shutil.copyfile(other / "model.safetensors", model / "model.safetensors")
    line = one_line_error(forked(*cmd))
    assert str(job) in line and "different options" in line and "model_fingerprint" in line
    assert "--job" in line
    assert_nothing_written(out)
    assert JobStore.open_existing(job).records() == records  # the old job is left alone


# ------------------------------------------------------------------------------ one writer


_HOLDER = """
import sys, time
from neuqi.pipeline.store import JobStore
JobStore.open_existing(sys.argv[1]).acquire_lock()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_writer_is_refused_then_a_dead_owners_lock_is_taken_over(
    reference: Reference, tiny_llama: Path, tmp_path: Path, forked: Zygote
) -> None:
    out = tmp_path / "out"
    job = out.with_name("out.job")
    cmd = ["quantize", str(tiny_llama), "--out", str(out), *OPTIONS]
    r = forked(*cmd, env={faults.KILL_AFTER_RECORDS: "2"})  # a half-done job
    assert r.returncode == -signal.SIGKILL
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(job)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        line = one_line_error(forked(*cmd))
        assert f"in use by process {holder.pid}" in line and str(job) in line
        assert_nothing_written(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the owner died without releasing its lock: the next run takes the stale lock over
    assert JobStore.open_existing(job).lock_info()["pid"] == holder.pid
    r = forked(*cmd)
    assert r.returncode == 0, r.stderr
    assert JobStore.open_existing(job).lock_info() is None
    assert_same_output(out, reference.out)


# ------------------------------------------------------------------------------ full disk


def disk_full_error(r: subprocess.CompletedProcess) -> str:
    """The error line of a run that ran out of disk (after its progress lines)."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
    assert "no space left on device" in errors[0]
    assert "free space and run the same command again; finished steps are kept" in errors[0]
    return errors[0]


def test_full_disk_is_one_line_and_resumes_bitwise_identical(
    reference: Reference, tiny_llama: Path, tmp_path: Path, forked: Zygote
) -> None:
    out = tmp_path / "out"
    job = out.with_name("out.job")
    cmd = ["quantize", str(tiny_llama), "--out", str(out), *OPTIONS]
    # 1. the disk fills while the job store is written (the first activations)
    line = disk_full_error(forked(*cmd, env={faults.DISK_FULL_AFTER_BYTES: "10000"}))
    assert f"{job}/arrays/acts/0" in line
    assert_nothing_written(out)
    assert not JobStore.open_existing(job).lock_is_live()  # the lock was released
    # 2. space freed: every step but the output is done, then the disk fills again in the
    #    middle of writing the output folder
    r = forked(*cmd, env=KillPoint(STEPS[-2], "record").env(job))
    assert r.returncode == -signal.SIGKILL
    done = set(JobStore.open_existing(job).records())
    line = disk_full_error(forked(*cmd, env={faults.DISK_FULL_AFTER_BYTES: "1000"}))
    assert f"{out}.partial-" in line and ".safetensors" in line
    assert_nothing_written(out)  # nothing published, the temporary folder removed
    assert set(JobStore.open_existing(job).records()) == done  # finished steps kept
    # 3. space freed again: the same command finishes, bitwise as if nothing happened
    r = forked(*cmd)
    assert r.returncode == 0, r.stderr
    assert_same_output(out, reference.out)


def test_full_disk_while_replacing_an_output_keeps_the_previous_one(
    reference: Reference, tiny_llama: Path, tmp_path: Path, forked: Zygote
) -> None:
    """A rerun into an existing output that fails for space leaves the previous output intact."""
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    before = output_files(out)
    cmd = ["quantize", str(tiny_llama), "--out", str(out), "--bits", "4", *OPTIONS[2:]]
    r = forked(*cmd, env=KillPoint(STEPS[-2], "record").env(out.with_name("out.job")))
    assert r.returncode == -signal.SIGKILL  # all done but the output
    line = disk_full_error(forked(*cmd, env={faults.DISK_FULL_AFTER_BYTES: "1000"}))
    assert f"{out}.partial-" in line
    assert output_files(out) == before
    assert not list(out.parent.glob("out.partial-*"))


# ------------------------------------------------------------------------------ hostile input


def test_tensor_names_and_metadata_are_data_not_paths(
    tiny_llama: Path, tmp_path: Path, forked: Zygote
) -> None:
    """A checkpoint with a tensor named like a path and path-like metadata: they stay names."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = copy_model(tiny_llama, tmp_path / "in")
    tensors = load_file(model / "model.safetensors")
    evil = "../../../evil.weight"
    tensors[evil] = tensors["model.norm.weight"].clone()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt", "path": "../../x"})
    out = tmp_path / "deep" / "out"
    r = forked("quantize", str(model), "--out", str(out), *OPTIONS)
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][evil]  # stored under its name, in a shard of the output
    with safe_open(out / shard, framework="pt") as f:
        assert f.get_tensor(evil).shape == tensors[evil].shape
    assert sorted(p.name for p in tmp_path.rglob("*evil*")) == []  # no file was named after it
    assert not (tmp_path / "x").exists()



def test_no_unpickling_and_no_remote_code_in_the_package() -> None:
    """Weights come from safetensors only; no model code or pickle is ever run."""
    src = Path(__file__).resolve().parents[1] / "src" / "neuqi"
    pattern = re.compile(
        r"\bpickle\b|\bdill\b|torch\.load\s*\(|weights_only\s*=\s*False"
        r"|trust_remote_code\s*=\s*True|\bexec\s*\(|\bmarshal\b"
    )
    hits = [
        f"{path.relative_to(src)}:{n}: {line.strip()}"
        for path in sorted(src.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
        and path.name != "safety.py"  # its docstring names them
    ]
    assert hits == []
