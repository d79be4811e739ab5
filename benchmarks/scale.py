"""70B / 72B / 405B layer shapes: what a job needs (planned) and what it takes (measured here).

    python benchmarks/scale.py [--workdir /work/scratch/scale] [--measure llama-3.1-70b]
        [--layers 2,4] [--nsamples 8,32] [--seqlen 128] [--method minmax] [--keep]

For each shape of :data:`neuqi.model.synthetic.SHAPES` (Llama-3.1-70B, Qwen2.5-72B with q/k/v biases,
Llama-3.1-405B: exact layer shapes, the vocabulary cut to 4096):

1. **Planned, full model** (``neuqi plan --json``; the checkpoint is written with real headers
   and sparse data, no disk used, at full depth and vocabulary): peak device memory of the
   acceptance jobs ``--method neuqi [--gptq] --nsamples 128 --seqlen 2048`` under a 20 GiB budget
   on ``--device cuda`` (a 24 GB consumer GPU with room to spare), their smallest working budget,
   job-store peak disk, output size, and the time on this machine from the plan's probe.
2. **Measured, a few layers** (``--measure``; default the 70B shape): bf16 checkpoints of 2 and 4
   decoder layers (5 GB shards, written tensor by tensor), then the real ``neuqi quantize`` on
   ``--device cpu`` in a fresh process each (peak RSS from ``wait4``, the job store's size sampled
   every 50 ms, seconds per layer from the CLI's per-layer lines), next to the plan of the same
   job. A 70B layer takes over an hour to solve with NeUQI at this CPU's speed, so the measured
   runs use ``--method minmax`` and small ``--nsamples/--seqlen`` (printed): memory is what they
   measure; NeUQI's time is projected from the probe. The 405B shape is planned only unless
   named in ``--measure``: one layer is 6.4 GB of bf16 and 12.7 GB in float32, which this
   2-core, 24 GB machine shared with other jobs cannot run in the time given.

Printed: the ratios peak RSS 4 layers / 2 layers and ``--nsamples`` largest / smallest (goal
1.0 +- 0.1), measured / planned for RSS, disk and output, and the projection to the full model.
No GPU is used; device figures are the plan's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import records
from memory import _neuqi_executable, measure  # stdlib-only: the parent holds no torch

from neuqi.model.synthetic import FULL_MODELS, SHAPES  # imports no torch

GiB = 2**30
LAYER_LINE = re.compile(  # the CLI's per-layer line, with or without its timestamp and progress
    r"^(?:\S+ \S+ )?layer (\d+)/(\d+): [^\n]*?\((\d+(?:\.\d+)?) s\)(?: \[[^\n]*\])?\s*$", re.MULTILINE)
WORKDIR = Path("/work/scratch/scale")
ACCEPT = ["--method", "neuqi", "--nsamples", "128", "--seqlen", "2048"]


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def build(folder: Path, key: str, layers: int, vocab: int | None, sparse: bool,
          background: bool = False) -> subprocess.Popen | None:
    """A child process writes the checkpoint (torch stays out of this process); ``background``:
    return it running."""
    if (folder / "model.safetensors.index.json").is_file():
        return None
    code = (
        "import dataclasses, sys; from pathlib import Path; "
        "from neuqi.model.synthetic import SHAPES, build_checkpoint; "
        f"s = SHAPES[{key!r}]; s = dataclasses.replace(s, vocab={vocab}) if {vocab!r} else s; "
        f"build_checkpoint(Path({str(folder)!r}), s, {layers}, sparse={sparse})"
    )
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code])
    if background:
        return child
    if child.wait() != 0:
        raise SystemExit(f"building {folder} failed")
    if not sparse:
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"  built {folder.name}: {size / 1e9:.2f} GB in "
              f"{len(list(folder.glob('*.safetensors')))} shard(s), "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return None


def plan(model: Path, *args: str) -> dict:
    r = subprocess.run([_neuqi_executable(), "plan", str(model), *args, "--json"],
                       capture_output=True, text=True, check=False)
    if r.returncode not in (0, 1):
        raise SystemExit(f"neuqi plan failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


class DiskPeak(threading.Thread):
    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder, self.peak, self.stop = folder, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            # by inode: an array renamed into the store's trash while the walk runs would
            # otherwise be counted twice (at its old place and in the trash)
            sizes: dict[tuple[int, int], int] = {}
            for root, _, files in os.walk(self.folder):
                for f in files:
                    try:
                        st = os.lstat(os.path.join(root, f))
                    except OSError:
                        continue
                    sizes[(st.st_dev, st.st_ino)] = st.st_size
            self.peak = max(self.peak, sum(sizes.values()))
            self.stop.wait(0.05)


def run_job(model: Path, out: Path, job: list[str], log: Path) -> dict:
    for stale in (out, out.with_name(out.name + ".job")):
        shutil.rmtree(stale, ignore_errors=True)
    disk = DiskPeak(out.with_name(out.name + ".job"))
    disk.start()
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="1000")
    run = measure([_neuqi_executable(), "quantize", str(model), "--out", str(out), *job], log,
                  env)
    disk.stop.set()
    disk.join()
    text = log.read_text(errors="replace")
    if run.exit_code != 0:
        sys.stderr.write(text[-3000:])
        raise SystemExit(f"neuqi quantize failed ({run.exit_code}); log {log}")
    per_layer = [float(m[2]) for m in LAYER_LINE.findall(text)]
    output = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"rss": run.peak_rss, "disk": disk.peak, "wall": run.wall_s, "per_layer": per_layer,
            "output": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/work/scratch/scale"))
    parser.add_argument("--measure", default="llama-3.1-70b",
                        help="comma-separated shapes to run for real ('' for none)")
    parser.add_argument("--layers", default="2,4")
    parser.add_argument("--nsamples", default="8,32", help="the smallest is used for --layers")
    parser.add_argument("--seqlen", type=int, default=32)
    parser.add_argument("--skip-planned", action="store_true",
                        help="only the measured part")
    parser.add_argument("--no-probe", action="store_true",
                        help="plans without the time probe (no time estimate)")
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--keep", action="store_true", help="keep the measured checkpoints")
    args = parser.parse_args()
    layer_counts = sorted({int(x) for x in args.layers.split(",")})
    nsamples = sorted({int(x) for x in args.nsamples.split(",")})
    measured = [m for m in args.measure.split(",") if m]
    args.workdir.mkdir(parents=True, exist_ok=True)
    global WORKDIR
    WORKDIR = args.workdir
    print(f"host: {platform.platform()}, {os.cpu_count()} CPUs, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; no GPU lent: device figures are "
          "the plan's", flush=True)

    if not args.skip_planned:
        planned(not args.no_probe)
    for key in measured:
        measure_shape(args, key, layer_counts, nsamples)


def hours(seconds: float | None) -> str:
    return "-" if not seconds else f"{seconds / 3600:.1f} h" if seconds < 36000 else \
        f"{seconds / 3600:.0f} h"


PLANNED_COLUMNS = ["model", "job", "peak device GiB", "fits 20 GiB",
                   "smallest budget GiB (its largest piece)", "held at once", "host GiB",
                   "job store GiB", "output GiB", "RTX 4090", "H100", "this CPU"]
SUMMARY_COLUMNS = ["model", "job", "peak GPU memory", "fits a 24 GB GPU (20 GiB)", "job store",
                   "output (4-bit, g128)", "RTX 4090", "H100"]


def planned(probe: bool) -> None:
    where = records.machine()
    print("\n## planned, full models (`neuqi plan --device cuda --max-memory 20GiB "
          f"{' '.join(ACCEPT)} [--gptq]`)\n")
    print("| " + " | ".join(PLANNED_COLUMNS) + " |")
    print("|---" * len(PLANNED_COLUMNS) + "|")
    assumptions = {}
    rows, summary = [], []
    for key in FULL_MODELS:
        layers, vocab = FULL_MODELS[key]
        full = WORKDIR / f"{key}-full-sparse"
        build(full, key, layers, vocab, sparse=True)
        for gptq in ("--no-gptq", "--gptq"):
            job = [*ACCEPT, gptq, "--max-memory", "20GiB"]
            p = plan(full, *job, "--device", "cuda", "--no-probe")
            gpu_hours = []
            for gpu in ("rtx4090", "h100"):
                g = plan(full, *job, "--device", "cuda", "--gpu", gpu)
                gpu_hours.append(hours(g["seconds"]))
                assumptions[gpu] = g["probe"]
            cpu = plan(full, *job, "--device", "cpu")["seconds"] if probe else None
            k = p["knobs"]
            held = (f"{k['windows']} win" + (f", MLP {k['mlp_chunk']} tok" if k["mlp_chunk"]
                                              else "")
                    + (", 1 linear" if k["linear_at_a_time"] else "")
                    + (f", {k['gptq_rows'] if gptq == '--gptq' else k['solve_rows']} rows"
                       if k["solve_rows"] else ""))
            row = [key, f"neuqi {gptq}", gib(p["device_peak"]), "yes" if p["fits"] else "NO",
                   f"{gib(p['floor'])} ({p['floor_piece']})", held, gib(p["host_peak"]),
                   gib(p["disk_peak"]), gib(p["output_bytes"]), *gpu_hours, hours(cpu)]
            rows.append(row)
            summary.append([key, "NeUQI + GPTQ" if gptq == "--gptq" else "NeUQI",
                            f"{gib(p['device_peak'])} GiB", "yes" if p["fits"] else
                            f"no (needs {gib(p['floor'])} GiB)", f"{gib(p['disk_peak'])} GiB",
                            f"{gib(p['output_bytes'])} GiB", *gpu_hours])
            print("| " + " | ".join(row) + " |", flush=True)
    from neuqi.pipeline.gpu_time import gpu_assumptions  # the CLI's line, torch-free

    lines = [gpu_assumptions(speed, "float32") for speed in assumptions.values()]
    print("\nTime: the plan's GPU time model (no GPU was measured), one line each:")
    for line in lines:
        print(f"- {line}")
    print("- this CPU: the plan's probe of this machine (`--device cpu`, same budget)")
    command = (f"python benchmarks/scale.py --measure ''{'' if probe else ' --no-probe'}")
    note = ("Planned by `neuqi plan MODEL --device cuda --max-memory 20GiB "
            f"{' '.join(ACCEPT)} [--gptq]` on synthetic checkpoints with the models' exact "
            "shapes (real headers over sparse files); the GPU hours are the plan's time model, "
            "not measured: " + "; ".join(lines) + ".")
    records.save("scale-planned", "Huge checkpoints, planned", PLANNED_COLUMNS, rows, command,
                 note + (" This CPU: the plan's probe of this machine." if probe else ""),
                 where=where)
    records.save("scale-summary", "70B to 405B on one 24 GB GPU, planned", SUMMARY_COLUMNS,
                 summary, command, note, where=where)


def measure_shape(args: argparse.Namespace, key: str, layer_counts: list[int],
                  nsamples: list[int]) -> None:
    shape = SHAPES[key]
    n_small = nsamples[0]
    job = ["--method", args.method, "--seqlen", str(args.seqlen), "--batch-size", "8",
           "--device", "cpu"]
    print(f"\n## measured here: {key} shape (hidden {shape.hidden}, intermediate "
          f"{shape.intermediate}, heads {shape.heads}/{shape.kv_heads}, vocab cut to "
          f"{shape.vocab}), `neuqi quantize {' '.join(job)} --nsamples N`\n", flush=True)
    runs = []
    cases = [(n, n_small) for n in layer_counts] + [(layer_counts[0], s) for s in nsamples[1:]]
    print("| layers | nsamples | peak RSS GiB measured | planned | ratio | job store GiB "
          "measured | planned | ratio | output GiB measured | planned | s/layer (minmax) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    builders = {}
    for layers in sorted({c[0] for c in cases}):  # written while the runs go on
        builders[layers] = build(args.workdir / f"{key}-{layers}L", key, layers, None,
                                 sparse=False, background=True)
    for layers, samples in cases:
        model = args.workdir / f"{key}-{layers}L"
        child = builders.pop(layers, None)
        if child is not None and child.wait() != 0:
            raise SystemExit(f"building {model} failed")
        this = [*job, "--nsamples", str(samples)]
        p = plan(model, *this, "--no-probe")
        out = args.workdir / f"{key}-{layers}L-n{samples}-out"
        m = run_job(model, out, this, args.workdir / f"{key}-{layers}L-n{samples}.log")
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".job"), ignore_errors=True)
        runs.append((layers, samples, p, m))
        per = sum(m["per_layer"]) / max(1, len(m["per_layer"]))
        print(f"| {layers} | {samples} | {gib(m['rss'])} | {gib(p['host_peak'])} | "
              f"{m['rss'] / p['host_peak']:.3f} | {gib(m['disk'])} | {gib(p['disk_peak'])} | "
              f"{m['disk'] / p['disk_peak']:.3f} | {gib(m['output'])} | "
              f"{gib(p['output_bytes'])} | {per:.1f} |", flush=True)
    print(f"(load at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; checkpoints "
          f"built in the background while the first runs went on)")
    by = {(layers, s): m for layers, s, _, m in runs}
    lo, hi = layer_counts[0], layer_counts[-1]
    if hi != lo:
        r = by[(hi, n_small)]["rss"] / by[(lo, n_small)]["rss"]
        print(f"\npeak RSS {hi} layers / {lo} layers: {r:.3f} (goal 1.0 +- 0.1: "
              f"{'OK' if abs(r - 1) <= 0.1 else 'OUT OF RANGE'})")
    if len(nsamples) > 1:
        r = by[(lo, nsamples[-1])]["rss"] / by[(lo, n_small)]["rss"]
        print(f"peak RSS --nsamples {nsamples[-1]} / {n_small}: {r:.3f} (goal 1.0 +- 0.1: "
              f"{'OK' if abs(r - 1) <= 0.1 else 'OUT OF RANGE'})")
    layers_full, _ = FULL_MODELS.get(key, (0, 0))
    per = [sum(m["per_layer"]) / len(m["per_layer"]) for *_, m in runs if m["per_layer"]]
    if layers_full and per:
        print(f"projection to {layers_full} layers on this CPU with this job: "
              f"{min(per) * layers_full / 3600:.1f} h ({args.method}, --nsamples {n_small} "
              f"--seqlen {args.seqlen}); memory as above (it does not grow with depth)")
    if not args.keep:
        for layers in layer_counts:
            shutil.rmtree(args.workdir / f"{key}-{layers}L", ignore_errors=True)


if __name__ == "__main__":
    main()
