"""`neuqi plan` and `--max-memory`: the plan against a measured run, budgets, bad input.

The measured runs are real `neuqi quantize` processes on a synthetic checkpoint
(:mod:`neuqi.model.synthetic`); their peak RSS comes from ``wait4`` in a small stdlib-only wrapper (a
child's ``ru_maxrss`` can include what its parent held before ``exec``, so pytest must not be the
direct parent), and the job store's size is sampled every 20 ms.

Tolerances, stated once (the README explains them):
- peak host RSS on ``--device cpu``: measured / planned in [``RSS_LOW``, ``RSS_HIGH``]. The plan
  models the tensors alive at each stage's peak plus a fixed process baseline
  (``plan.PROCESS_BASE``) and the heap glibc keeps for reuse (``plan.ALLOCATOR_PAD``, 256 MiB,
  which small tensors fill and large ones do not): it may over-estimate by that much, the safe
  side of a budget, and must not under-estimate by more than 5 %.
- job-store peak disk: measured / planned in [``DISK_LOW``, 1.0 + small]: the arrays are
  uncompressed, so the plan is exact up to zarr's metadata files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neuqi.model.synthetic import Shape, build_checkpoint
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.plan import GiB, Knobs, make_plan, parse_size

RSS_LOW, RSS_HIGH = 0.75, 1.05
DISK_LOW, DISK_HIGH = 0.97, 1.03
JOB = ["--method", "minmax", "--nsamples", "8", "--seqlen", "512", "--batch-size", "8",
       "--device", "cpu"]

_MEASURE = r"""
import json, os, sys, threading, time
disk, argv = sys.argv[1], sys.argv[2:]
peak = [0]
done = threading.Event()
def size():
    # by inode: an array renamed into the store's trash while the walk runs would otherwise be
    # counted twice (at its old place and in the trash); a slow walk on a busy machine sees it
    sizes = {}
    for root, _, files in os.walk(disk):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            sizes[(st.st_dev, st.st_ino)] = st.st_size
    return sum(sizes.values())
def poll():
    while not done.is_set():
        peak[0] = max(peak[0], size())
        done.wait(0.02)
t = threading.Thread(target=poll, daemon=True)
t.start()
log = open(os.environ["MEASURE_LOG"], "w")
pid = os.posix_spawn(argv[0], argv, dict(os.environ),
                     file_actions=[(os.POSIX_SPAWN_DUP2, log.fileno(), 1),
                                   (os.POSIX_SPAWN_DUP2, log.fileno(), 2)])
_, status, usage = os.wait4(pid, 0)
done.set()
t.join()
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "rss": usage.ru_maxrss * 1024,
                  "disk": peak[0]}))
"""


def neuqi_exe() -> str:
    return str(Path(sys.executable).with_name("neuqi"))


def neuqi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([neuqi_exe(), *args], check=False, capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="200"), timeout=600)


def measured(job_dir: Path, log: Path, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(job_dir), neuqi_exe(), *args],
                       check=False, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, MEASURE_LOG=str(log), COLUMNS="200"))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers of hidden 1024, intermediate 4096: the layer passes, not the imports, set the
    peak (one 8 x 512-token batch of MLP activations is 200 MB)."""
    folder = tmp_path_factory.mktemp("plan") / "mid"
    build_checkpoint(folder, Shape(1024, 4096, 8, 2, 1024), 2, max_shard_bytes=50_000_000)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plan") / "tiny"
    build_checkpoint(folder, Shape(256, 768, 4, 2, 1024, "qwen2"), 2, max_shard_bytes=1_000_000)
    return folder


def _plan_json(model: Path, *args: str) -> dict:
    r = neuqi("plan", str(model), *JOB, "--no-probe", "--json", *args)
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout)


def test_plan_matches_a_measured_run(mid_model: Path, tmp_path: Path) -> None:
    budget = ["--max-memory", "8GiB"]  # the default moves with the memory free at the time
    plan = _plan_json(mid_model, *budget)
    out = tmp_path / "out"
    run = measured(tmp_path / "out.job", tmp_path / "log", "quantize", str(mid_model), "--out",
                   str(out), *JOB, *budget)
    log = (tmp_path / "log").read_text()
    assert run["rc"] == 0, log[-2000:]
    assert plan["summary"] in log  # quantize prints the plan's line when it starts
    rss = run["rss"] / plan["host_peak"]
    disk = run["disk"] / plan["disk_peak"]
    assert RSS_LOW <= rss <= RSS_HIGH, (run, plan["host_peak"])
    assert DISK_LOW <= disk <= DISK_HIGH, (run, plan["disk_peak"])
    output = sum(f.stat().st_size for f in out.glob("model-*.safetensors"))
    assert 0.9 <= output / plan["output_bytes"] <= 1.1


def test_an_accepted_tight_budget_holds(mid_model: Path, tmp_path: Path) -> None:
    """At the smallest budget the plan accepts, the run holds to it (no OOM, RSS below it)."""
    floor = _plan_json(mid_model)["floor"]
    budget = f"{floor // 2**20 + 1}MiB"
    plan = _plan_json(mid_model, "--max-memory", budget)
    assert plan["fits"] and plan["knobs"]["linear_at_a_time"]
    run = measured(tmp_path / "out.job", tmp_path / "log", "quantize", str(mid_model), "--out",
                   str(tmp_path / "out"), *JOB, "--max-memory", budget)
    assert run["rc"] == 0, (tmp_path / "log").read_text()[-2000:]
    assert run["rss"] <= parse_size(budget) * RSS_HIGH


def test_the_smallest_knobs_give_the_same_output(tiny_model: Path, tmp_path: Path) -> None:
    """One window per pass, the MLP in 16-token chunks, one linear at a time and 64-row solver
    calls give bitwise the output of holding everything: the codes (Min-Max) and the Hessian
    diagonals (hessian_diag.safetensors) that NeUQI solves with."""
    from rich.console import Console

    from neuqi.pipeline.runner import quantize

    outputs = {}
    for name, knobs in (("all", None), ("least", Knobs(1, 16, True, 64, 64).encode())):
        config = QuantizeConfig(model=str(tiny_model), out=str(tmp_path / name), method="minmax",
                                nsamples=4, seqlen=64, batch_size=2, memory_knobs=knobs)
        quantize(config, None, "cpu", Console(stderr=True, quiet=True))
        outputs[name] = {k: v for f in sorted((tmp_path / name).glob("*.safetensors"))
                         for k, v in load_file(f).items()}
    assert outputs["all"].keys() == outputs["least"].keys()
    for key, value in outputs["all"].items():
        assert torch.equal(value, outputs["least"][key]), key


def test_the_plan_shrinks_what_it_holds_to_the_budget(tiny_model: Path, tmp_path: Path) -> None:
    config = QuantizeConfig(model=str(tiny_model), out="-", method="minmax", nsamples=64,
                            seqlen=512, batch_size=8)
    roomy = make_plan(config, "cpu", budget=64 * GiB, with_probe=False)
    assert roomy.fits and roomy.knobs == Knobs(8, 0, False, 0, 0)
    tight = make_plan(config, "cpu", budget=roomy.floor, with_probe=False)
    assert tight.fits and tight.device_peak < roomy.device_peak
    assert tight.knobs.windows == 1 and tight.knobs.linear_at_a_time
    below = make_plan(config, "cpu", budget=roomy.floor - 1, with_probe=False)
    assert not below.fits
    # depth and the number of calibration windows change the disk, not the memory
    more = make_plan(replace(config, nsamples=256), "cpu", budget=64 * GiB, with_probe=False)
    assert more.device_peak == roomy.device_peak and more.disk_peak > roomy.disk_peak
    deep = tmp_path / "deep"
    build_checkpoint(deep, Shape(256, 768, 4, 2, 1024, "qwen2"), 8, sparse=True)
    deeper = make_plan(replace(config, model=str(deep)), "cpu", budget=64 * GiB,
                       with_probe=False)
    assert deeper.device_peak == roomy.device_peak and deeper.disk_peak > roomy.disk_peak


def one_line_exit_2(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_a_budget_below_the_floor_is_refused_before_any_work(mid_model: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = neuqi("quantize", str(mid_model), "--out", str(out), *JOB, "--max-memory", "100MiB")
    one_line_exit_2(r, "--max-memory", "largest unavoidable piece", "smallest budget")
    assert not out.exists() and not (tmp_path / "out.job").exists()


@pytest.mark.parametrize("command", ["plan", "quantize"])
def test_bad_input_is_one_line(command: str, tiny_model: Path, tmp_path: Path) -> None:
    extra = ["--out", str(tmp_path / "out")] if command == "quantize" else []
    one_line_exit_2(neuqi(command, str(tiny_model), *extra, "--max-memory", "lots"),
                    "--max-memory lots")
    one_line_exit_2(neuqi(command, str(tiny_model), *extra, "--group-size", "100"), "100")
    one_line_exit_2(neuqi(command, str(tmp_path / "nowhere"), *extra), "nowhere")
    other = tmp_path / "gpt2"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    one_line_exit_2(neuqi(command, str(other), *extra), "not supported")
    missing = tmp_path / "missing"
    shutil.copytree(tiny_model, missing)
    next(missing.glob("model-00002-*.safetensors")).unlink()
    one_line_exit_2(neuqi(command, str(missing), *extra), "model-00002")


@pytest.mark.parametrize(("text", "size"), [("20GiB", 20 * 2**30), ("24GB", 24 * 10**9),
                                            ("500MiB", 500 * 2**20), ("1.5g", 1_500_000_000),
                                            ("4096", 4096)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_plan_mirrors_the_refit_block():
    from neuqi.pipeline import plan
    from neuqi.quant import gptq

    assert plan.REFIT_ELEMENTS == gptq.REFIT_ELEMENTS


def test_the_gpu_time_model(tmp_path: Path) -> None:
    """`neuqi plan --device cuda --gpu NAME` estimates each stage's time from the stated GPU
    model (no GPU needed) and prints its assumptions on one line; bf16 calibration takes less
    time than float32 on an H100's tensor cores, GPTQ takes more time than none."""
    from neuqi.model.synthetic import SHAPES

    model = tmp_path / "llama70-2layers"
    build_checkpoint(model, replace(SHAPES["llama-3.1-70b"], vocab=4096), 2, sparse=True)
    job = ["--device", "cuda", "--max-memory", "20GiB", "--nsamples", "128", "--seqlen", "2048"]
    seconds = {}
    for gpu in ("rtx4090", "h100"):
        for gptq in ("--no-gptq", "--gptq"):
            p = _plan_json(model, *job, "--gpu", gpu, gptq)
            assert p["probe"]["gpu"] == gpu
            assert all(st["seconds"] > 0 for st in p["stages"]
                       if st["name"] in ("hessian", "solve", "forward"))
            seconds[gpu, gptq] = p["seconds"]
    # bf16 calibration matmuls run on the tensor cores: faster than fp32 on an H100
    bf16 = _plan_json(model, *job, "--gpu", "h100", "--dtype", "bfloat16")
    fp32 = _plan_json(model, *job, "--gpu", "h100")
    stage = {p["name"]: p["seconds"] for p in fp32["stages"]}
    assert all(st["seconds"] < stage[st["name"]] for st in bf16["stages"]
               if st["name"] in ("hessian", "forward"))
    for gpu in ("rtx4090", "h100"):
        assert seconds[gpu, "--gptq"] > seconds[gpu, "--no-gptq"]
    r = neuqi("plan", str(model), *job, "--gpu", "rtx4090")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("time model for rtx4090"))
    assert "TFLOP/s" in line and "M weights/s" in line and "assumed" in line
    # the GPU model is for --device cuda; on the CPU the time is probed
    one_line_exit_2(neuqi("plan", str(model), "--device", "cpu", "--gpu", "h100",
                          "--no-probe"), "--gpu h100")


def test_a_cuda_out_of_memory_is_one_line_naming_the_stage(tiny_model: Path) -> None:
    """The message a CUDA out-of-memory error becomes (neuqi.pipeline.tasks.on_device): the
    stage, the budget it ran under, and the smallest budget the job works in."""
    from neuqi.model.checkpoint import Checkpoint
    from neuqi.pipeline.tasks import out_of_memory

    config = QuantizeConfig(model=str(tiny_model), out="-", max_memory=20 * GiB)
    err = out_of_memory("solve/3/mlp.down_proj", Checkpoint.open(tiny_model), config,
                        torch.device("cuda"))
    text = str(err)
    assert "\n" not in text
    for word in ("CUDA out of memory in stage solve/3/mlp.down_proj", "--max-memory 20.00 GiB",
                 "smallest budget", "same command"):
        assert word in text, text


def test_store_cost_mirrors_the_gptq_hessian_blocks() -> None:
    """plan.HESSIAN_BLOCK_BYTES is the GPTQ stage's (the plan imports no stage)."""
    from neuqi.pipeline import plan
    from neuqi.stages import gptq

    assert plan.HESSIAN_BLOCK_BYTES == gptq.HESSIAN_BLOCK_BYTES
