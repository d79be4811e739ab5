"""Peak host memory of a quantization job: about one layer plus one batch, whatever the depth.

    python benchmarks/memory.py [--layers 8,16] [--hidden 1024] [--intermediate 2816]
        [--heads 16] [--kv-heads 8] [--vocab 4096] [--method minmax|neuqi|neuqi-int]
        [--nsamples 8] [--seqlen 256] [--batch-size 4] [--max-shard-mb 200] [--seed 0]
        [--workdir DIR] [--keep]

It writes one synthetic LLaMA checkpoint per layer count with :mod:`neuqi.model.synthetic` (seeded
heavy-tailed bf16 weights, the same layer shape for all of them, sharded safetensors plus an index,
and a small byte-level BPE tokenizer), then runs the real command line on each, every time in a fresh process::

    neuqi quantize MODEL --out OUT --bits 4 --group-size 128 --method minmax --nsamples 8
        --seqlen 256 --batch-size 4 --device cpu

and reads that process's peak resident set (``ru_maxrss``) from ``os.wait4``, which is exact for
the one child waited for (``RUSAGE_CHILDREN`` would be the maximum over all children so far).
The method only changes the time of the solve stage; the memory behaviour is the pipeline's.

The measuring process imports nothing but the standard library: on Linux a child's ``ru_maxrss``
also counts the address space it had before ``exec`` (the parent's, with ``posix_spawn``/vfork),
so a parent that held torch or a model would raise every reading. The checkpoints are written by
a child process too (``--build-into``, internal), tensor by tensor, one shard in memory at a time.

Printed: the fixed overhead (a process that only imports neuqi, torch and transformers), then per
layer count the peak RSS, the wall time and the time per layer, the ratio of the largest to the
smallest layer count's peak (goal 1.0 ± 0.1), and the size of one decoder layer in the compute
dtype (float32) with the peaks expressed in layers.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from neuqi.model.synthetic import Shape, build_checkpoint  # imports no torch until it writes

MIB = 1024 * 1024
COMPUTE_BYTES = 4  # float32, the CLI's default --dtype
# The line the CLI prints when a layer is done: "layer 3/16: weighted loss ... (5.4 s)".
LAYER_LINE = re.compile(  # the CLI's per-layer line, with or without its timestamp and progress
    r"^(?:\S+ \S+ )?layer (\d+)/(\d+): [^\n]*?\((\d+(?:\.\d+)?) s\)(?: \[[^\n]*\])?\s*$", re.MULTILINE)


# ---------------------------------------------------------------------------- measuring (parent)


@dataclass
class Run:
    peak_rss: int  # bytes, exact (wait4)
    wall_s: float
    exit_code: int
    phases: list[tuple[str, int]]  # (phase, sampled max RSS in bytes), in order


class Sampler(threading.Thread):
    """Polls the child's RSS and attributes it to the phase its log shows.

    A phase is what runs after the log's last ``layer i/n:`` line (the CLI prints one when a
    layer is finished): ``layer i+1`` or, after the last, ``pack``. The samples only locate the
    peak; the peak itself is the exact ``wait4`` value.
    """

    def __init__(self, pid: int, log: Path, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.log, self.interval = pid, log, interval
        self.stop = threading.Event()
        self.phases: dict[str, int] = {}
        self.page = os.sysconf("SC_PAGE_SIZE")

    def phase(self) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "start"
        done = LAYER_LINE.findall(text)
        if not done:
            return "setup, embed, layer 1"
        i, n = int(done[-1][0]), int(done[-1][1])
        return "pack" if i >= n else f"layer {i + 1}"

    def run(self) -> None:
        statm = f"/proc/{self.pid}/statm"
        while not self.stop.is_set():
            try:
                with open(statm) as f:
                    rss = int(f.read().split()[1]) * self.page
            except (OSError, ValueError, IndexError):
                break
            name = self.phase()
            self.phases[name] = max(self.phases.get(name, 0), rss)
            self.stop.wait(self.interval)


def measure(argv: list[str], log: Path, env: dict[str, str] | None = None,
            sample: bool = False) -> Run:
    """Run ``argv`` in a fresh process, stdout+stderr to ``log``; its own peak RSS via wait4."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        actions = [
            (os.POSIX_SPAWN_DUP2, fd, 1),
            (os.POSIX_SPAWN_DUP2, fd, 2),
            (os.POSIX_SPAWN_CLOSE, fd),
        ]
        started = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env or dict(os.environ), file_actions=actions)
    finally:
        os.close(fd)
    sampler = Sampler(pid, log) if sample and os.path.exists(f"/proc/{pid}") else None
    if sampler is not None:
        sampler.start()
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    phases: list[tuple[str, int]] = []
    if sampler is not None:
        sampler.stop.set()
        sampler.join()
        phases = list(sampler.phases.items())
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return Run(usage.ru_maxrss * scale, wall, os.waitstatus_to_exitcode(status), phases)


def _check(run: Run, log: Path, what: str) -> None:
    if run.exit_code != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise SystemExit(f"{what} failed with exit code {run.exit_code} (log: {log})")


def _neuqi_executable() -> str:
    beside = Path(sys.executable).with_name("neuqi")
    if beside.is_file():
        return str(beside)
    found = shutil.which("neuqi")
    if found is None:
        raise SystemExit("the `neuqi` command is not installed beside this Python or on PATH")
    return found


def _mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _layer_seconds(log: Path) -> list[float]:
    """Per-layer times the CLI prints (``layer i/n: ... (12.3 s)``)."""
    return [float(m[2]) for m in LAYER_LINE.findall(log.read_text(errors="replace"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="8,16", help="comma-separated layer counts")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--method", default="minmax", choices=["minmax", "neuqi", "neuqi-int"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-shard-mb", type=int, default=200, help="checkpoint shard size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where checkpoints and outputs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--build-into", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    shape = Shape(args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        parser.error("--hidden must divide by --heads, and --heads by --kv-heads")
    layer_counts = sorted({int(x) for x in args.layers.split(",") if x.strip()})
    if not layer_counts or min(layer_counts) < 1:
        parser.error("--layers: give one or more positive counts, e.g. 8,16")

    if args.build_into is not None:  # internal: the child that writes one checkpoint
        build_checkpoint(args.build_into, shape, layer_counts[0], seqlen=args.seqlen,
                         seed=args.seed, max_shard_bytes=args.max_shard_mb * 1_000_000)
        return

    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="neuqi-memory-")
        workdir = Path(tmp)
    else:
        workdir = args.workdir.expanduser()
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        report(args, shape, layer_counts, workdir)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            print(f"\nkept {tmp}")


def report(args: argparse.Namespace, shape: Shape, layer_counts: list[int], workdir: Path) -> None:
    python, neuqi = sys.executable, _neuqi_executable()
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="1000")
    print(f"host: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"workdir: {workdir}")
    print(
        f"model: LLaMA hidden {shape.hidden}, intermediate {shape.intermediate}, heads "
        f"{shape.heads}/{shape.kv_heads} kv, vocab {shape.vocab}; bf16 shards <= "
        f"{args.max_shard_mb} MB"
    )
    print(
        f"job: --bits {args.bits} --group-size {args.group_size} --method {args.method} "
        f"--nsamples {args.nsamples} --seqlen {args.seqlen} --batch-size {args.batch_size} "
        f"--device cpu (compute dtype float32)\n"
    )

    # Fixed overhead: the imports alone.
    log = workdir / "baseline.log"
    base = measure([python, "-c", "import neuqi, torch, transformers"], log, env)
    _check(base, log, "baseline import")
    job_imports = (
        "import neuqi, torch, transformers, neuqi.cli, neuqi.pipeline.runner; "
        "from transformers.models.llama import modeling_llama; "
        "from transformers import AutoTokenizer, PreTrainedTokenizerFast"
    )
    base_job = measure([python, "-c", job_imports], log, env)
    _check(base_job, log, "baseline import")

    rows: list[tuple[int, Run, Run, int, list[float]]] = []
    for n in layer_counts:
        model = workdir / f"llama-{n}L"
        log = workdir / f"build-{n}L.log"
        if model.exists():
            shutil.rmtree(model)
        build = measure(
            [python, os.path.abspath(__file__), "--build-into", str(model), "--layers", str(n),
             "--hidden", str(shape.hidden), "--intermediate", str(shape.intermediate),
             "--heads", str(shape.heads), "--kv-heads", str(shape.kv_heads),
             "--vocab", str(shape.vocab), "--seqlen", str(args.seqlen),
             "--seed", str(args.seed), "--max-shard-mb", str(args.max_shard_mb)],
            log, env,
        )
        _check(build, log, f"building the {n}-layer checkpoint")
        out = workdir / f"out-{n}L"
        for stale in (out, out.with_name(out.name + ".job")):  # a fresh job, never a resume
            if stale.exists():
                shutil.rmtree(stale)
        log = workdir / f"quantize-{n}L.log"
        run = measure(
            [neuqi, "quantize", str(model), "--out", str(out), "--bits", str(args.bits),
             "--group-size", str(args.group_size), "--method", args.method,
             "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
             "--batch-size", str(args.batch_size), "--device", "cpu"],
            log, env, sample=True,
        )
        _check(run, log, f"neuqi quantize ({n} layers)")
        shards = len(list(model.glob("*.safetensors")))
        print(
            f"built {n:>3}-layer checkpoint: {_mib(_dir_bytes(model))} MiB in {shards} shard(s), "
            f"builder peak RSS {_mib(build.peak_rss)} MiB ({build.wall_s:.1f} s)"
        )
        rows.append((n, run, build, _dir_bytes(model), _layer_seconds(log)))
        if not args.keep and args.workdir is None:
            shutil.rmtree(model, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.with_name(out.name + ".job"), ignore_errors=True)

    layer_bytes = shape.layer_params() * COMPUTE_BYTES
    batch_bytes = args.batch_size * args.seqlen * shape.hidden * COMPUTE_BYTES
    mlp_batch_bytes = args.batch_size * args.seqlen * shape.intermediate * COMPUTE_BYTES
    all_acts = args.nsamples * args.seqlen * shape.hidden * COMPUTE_BYTES

    print()
    print(f"baseline peak RSS, `import neuqi, torch, transformers`: {_mib(base.peak_rss)} MiB")
    print(f"baseline peak RSS, + the CLI, runner, LLaMA and tokenizer modules: "
          f"{_mib(base_job.peak_rss)} MiB")
    print(f"this measuring process's own peak RSS (a floor for every reading): "
          f"{_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)} MiB")
    print()
    print(f"one decoder layer: {shape.layer_params():,} params = {layer_bytes:,} bytes in float32 "
          f"({_mib(layer_bytes)} MiB); largest linear {shape.largest_linear_params():,} params")
    print(f"one batch of layer inputs: {batch_bytes:,} bytes ({_mib(batch_bytes)} MiB); its MLP "
          f"intermediate {_mib(mlp_batch_bytes)} MiB; all calibration inputs {_mib(all_acts)} MiB")
    print()
    header = ("| layers | checkpoint MiB | peak RSS MiB | above baseline MiB | layer loop MiB* "
              "| pack MiB* | wall s | s/layer | layer-loop s/layer | peak / layer "
              "| (peak - baseline) / layer |")
    print(header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
    for n, run, _build, ckpt_bytes, per_layer in rows:
        above = run.peak_rss - base.peak_rss
        loop = f"{sum(per_layer) / len(per_layer):.2f}" if per_layer else "-"
        loop_rss, pack_rss = _split_phases(run)
        print(
            f"| {n} | {_mib(ckpt_bytes)} | {_mib(run.peak_rss)} | {_mib(above)} | "
            f"{_mib(loop_rss)} | {_mib(pack_rss)} | {run.wall_s:.1f} | {run.wall_s / n:.2f} | "
            f"{loop} | {run.peak_rss / layer_bytes:.2f} | {above / layer_bytes:.2f} |"
        )
    print("* sampled every 20 ms: 'layer loop' is setup, embed and every layer; 'pack' is what "
          "follows the last layer's line (writing the output folder)")
    print()
    print("sampled RSS by phase, MiB ('layer i' runs until the CLI prints its line):")
    for n, run, *_ in rows:
        series = ", ".join(f"{name} {_mib(rss)}" for name, rss in run.phases)
        print(f"  {n} layers: {series}")
    if len(rows) >= 2:
        (n0, r0, *_), (n1, r1, *_) = rows[0], rows[-1]
        ratio = r1.peak_rss / r0.peak_rss
        above_ratio = (r1.peak_rss - base.peak_rss) / max(1, r0.peak_rss - base.peak_rss)
        verdict = "OK" if abs(ratio - 1.0) <= 0.1 else "OUT OF RANGE"
        loop0, pack0 = _split_phases(r0)
        loop1, pack1 = _split_phases(r1)
        print()
        print(f"peak({n1}) / peak({n0}) = {ratio:.3f}  (goal 1.0 ± 0.1: {verdict}); "
              f"above baseline: {above_ratio:.3f}; checkpoint size ratio "
              f"{rows[-1][3] / rows[0][3]:.2f}")
        if loop0 and pack0:
            print(f"sampled layer loop: {loop1 / loop0:.3f}; sampled pack: {pack1 / pack0:.3f}")


def _split_phases(run: Run) -> tuple[int, int]:
    """Sampled max RSS of the layer loop (everything before pack) and of pack; 0 if unsampled."""
    loop = max((rss for name, rss in run.phases if name != "pack"), default=0)
    pack = max((rss for name, rss in run.phases if name == "pack"), default=0)
    return loop, pack

if __name__ == "__main__":
    main()
