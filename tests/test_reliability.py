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
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from neuqi import faults
from neuqi.models import LLAMA_LIKE
from neuqi.pipeline.store import JobStore

TINY = ["--nsamples", "4", "--seqlen", "32", "--batch-size", "3", "--device", "cpu"]
OPTIONS = ["--bits", "3", "--group-size", "16", "--method", "neuqi-int", *TINY]
LAYERS = 3  # tiny_llama
BATCHES = 2  # ceil(nsamples / batch-size): row writes of each activation array


def neuqi_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from neuqi.cli import main; main()", *args]


def neuqi(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        neuqi_cmd(*args), check=False, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600,
    )


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

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE,
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


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of an output folder, byte for byte; neuqi.json without its creation time."""
    files = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.name == "neuqi.json":
            meta = json.loads(data)
            del meta["created"]["time"]
            data = json.dumps(meta, sort_keys=True).encode()
        files[path.relative_to(out).as_posix()] = data
    return files


def assert_same_output(out: Path, reference: Path) -> None:
    got, want = output_files(out), output_files(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"


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
        store = JobStore.open_existing(job)
        remaining = [s for s in STEPS if not store.is_done(s)]
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
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_after_a_random_delay_then_resumed_is_bitwise_identical(
    seed: int, reference: Reference, tiny_llama: Path, tmp_path: Path
) -> None:
    """SIGKILL at a seeded random wall-clock moment of the uninterrupted run's duration."""
    out = tmp_path / "out"
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
        # killed mid-run: either no output yet, or (killed between publishing it and the last
        # record) the complete one
        if out.exists():
            assert_same_output(out, reference.out)
        r = neuqi(*cmd)  # the same command again (the job store may not exist yet)
        assert r.returncode == 0, r.stderr
    else:
        assert child.returncode == 0  # this machine was faster than the reference run
    assert_same_output(out, reference.out)
