"""Throughput and loss of the solver's backends against the paper's literal search.

    python benchmarks/solver.py --device cpu|cuda [--shapes q_proj,k_proj,gate_proj,down_proj]
        [--bits 2,3,4] [--group-sizes 64,128,-1] [--rows 16] [--methods neuqi,neuqi-int]
        [--backends reference,numba] [--paper all|grouped|none] [--seed 0] [--repeat 1]

Shapes are ``OUTxIN`` or the names of Llama-3.1-70B's linears (default: all four; ``q_proj``
8192x8192, ``k_proj`` 1024x8192, ``gate_proj`` 28672x8192, ``down_proj`` 8192x28672). ``--rows
N`` times the first N rows only (a full 70B matrix takes hours with the slow searches on a
2-core CPU); every backend works group by group (the reference in chunks of groups), so weights/s
on a slice carries over to the full matrix, and the table says how many rows were timed. The
reference backend runs with torch.compile when the full matrix would (its default for tensors of
at least ``COMPILE_MIN_WEIGHTS``), also on a slice.

For each shape x bits x group size x method it times :func:`paper_reference.paper_search` (the
paper's search, same groups and normalised ``h``) and :func:`neuqi.quant.solver.quantize_tensor` with
each backend, and prints a markdown table: seconds, M weights/s, the speed-up over the paper's
search and over the reference backend, the loss ratio to the paper's search and to the reference
(summed loss ``sum_i h_i (w_i - ŵ_i)²``, raw ``h``, over all groups), the largest per-group excess
over the reference (float64 evaluation of each group's returned scale and zero-point: ``0``
means never above), and the projected time to solve the ~69 G weights of a 70B model's linears at
that rate. Each call is warmed up once on a few rows (torch.compile and numba compilation are not
timed); compilations the timed call still triggers are counted in the backend column.
``--repeat N`` times every backend N times and shows its fastest call: on a shared CPU, other
work only ever slows a call down.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import records
import torch
from paper_reference import paper_search
from torch import Tensor
from torch._dynamo.utils import counters

from neuqi.quant.solver import (
    BACKENDS,
    CHUNK_ELEMENTS,
    COMPILE_MIN_WEIGHTS,
    QuantizedTensor,
    quantize_tensor,
)

WARMUP_ROWS = 1
# Llama-3.1-70B: hidden 8192, intermediate 28672, 8 KV heads of 128; 80 layers of
# q, o (8192x8192), k, v (1024x8192), gate, up (28672x8192) and down (8192x28672).
LLAMA70B = {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "gate_proj": (28672, 8192),
            "down_proj": (8192, 28672)}
LLAMA70B_LINEAR_WEIGHTS = 80 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192)


def make_inputs(out_f: int, in_f: int, seed: int, rows: int) -> tuple[Tensor, Tensor]:
    """The first ``rows`` rows of a heavy-tailed weight (Student-t, 3 dof, scaled 0.02) and a
    positive, spread ``h_diag``."""
    gen = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(3, rows, in_f, generator=gen).pow(2).sum(0)
    weight = 0.02 * torch.randn(rows, in_f, generator=gen) / (chi2 / 3).sqrt()
    h_diag = (torch.rand(in_f, generator=gen) + 0.05) ** 2
    return weight, h_diag


def paper_loss(weight: Tensor, h_diag: Tensor, bits: int, group_size: int) -> Tensor:
    """The paper's search over ``quantize_tensor``'s groups; returns the per-group loss (raw h)."""
    out_f, in_f = weight.shape
    g = in_f if group_size == -1 else group_size
    levels = 2**bits
    groups = weight.reshape(-1, g)
    h_groups = h_diag.view(in_f // g, g).repeat(out_f, 1)
    h_norm = h_groups / h_groups.sum(1, keepdim=True)
    chunk = max(1, CHUNK_ELEMENTS // g)  # as many elements in flight as the package's chunk
    scale = torch.empty(len(groups), device=weight.device)
    zero = torch.empty_like(scale)
    for lo in range(0, len(groups), chunk):
        s, z, _ = paper_search(groups[lo:lo + chunk], h_norm[lo:lo + chunk], levels)
        scale[lo:lo + chunk], zero[lo:lo + chunk] = s, z
    s, z = scale.unsqueeze(1), zero.unsqueeze(1)
    deq = s * (torch.round(groups / s + z).clamp(0, levels - 1) - z)
    return (h_groups * (groups - deq) ** 2).sum(1)


def loss64(weight: Tensor, h_diag: Tensor, q: QuantizedTensor, bits: int) -> Tensor:
    """Per-group loss in float64 from ``q``'s scale and zero-point."""
    rows, cols = weight.shape
    g = cols if q.group_size == -1 else q.group_size
    w = weight.double().view(rows, -1, g)
    s, z = q.scale.double().unsqueeze(-1), q.zero_point.double().unsqueeze(-1)
    codes = torch.round(w / s + z).clamp(0, 2**bits - 1)
    return (h_diag.double().view(-1, g) * (w - s * (codes - z)) ** 2).sum(-1).flatten()


def timed(fn: Callable[[Tensor], object], weight: Tensor, device: torch.device,
          repeat: int = 1) -> tuple[float, object, int]:
    """Warm up on a few rows, then time ``fn`` on the whole weight ``repeat`` times: (the
    fastest call's seconds, result, number of torch.compile compilations that the warm-up did not
    cover and so were timed)."""
    fn(weight[:WARMUP_ROWS])
    sync(device)
    frames = counters["frames"]["total"]
    best = float("inf")
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(weight)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result, counters["frames"]["total"] - frames


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hours(weights_per_s: float) -> str:
    seconds = LLAMA70B_LINEAR_WEIGHTS / weights_per_s
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def bench_case(label: str, weight: Tensor, h_diag: Tensor, bits: int, group: int, method: str,
               backends: list[str], paper: bool, device: torch.device, full_numel: int,
               repeat: int = 1, table: list[list[str]] | None = None) -> None:
    """Time the paper's search and every backend on one weight, bits, group size and method;
    print a table row each (and append its cells to ``table``)."""

    def row(*cells: object) -> None:
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)
        if table is not None:
            table.append([str(c) for c in cells])

    n = weight.numel()
    paper_s = paper_l = None
    if paper and method == "neuqi":
        paper_s, loss, _ = timed(lambda w: paper_loss(w, h_diag, bits, group), weight, device)
        paper_l = loss.sum(dtype=torch.float64).item()
        row(label, bits, group, "paper's search", "-", f"{paper_s:.3f}",
            f"{n / paper_s / 1e6:.3f}", "1.00x", "-", "1.000000", "-", "-", hours(n / paper_s))
    ref_s = ref_l = ref_q = None
    # the reference compiles its search (torch.compile) for tensors of at least
    # COMPILE_MIN_WEIGHTS, as every full 70B matrix is: give a slice the full matrix's setting
    compile = full_numel >= COMPILE_MIN_WEIGHTS
    for backend in backends:
        def run(w: Tensor, backend: str = backend) -> QuantizedTensor:
            # the warm-up gets the timed call's compile setting (the same padded chunk shape)
            return quantize_tensor(w, h_diag, bits=bits, group_size=group, method=method,
                                   device=device, backend=backend, compile=compile)

        seconds, q, compiled = timed(run, weight, device, repeat)
        loss = q.loss.sum(dtype=torch.float64).item()
        name = backend + (f" [{compiled} compilations timed]" if compiled else "")
        if backend == "reference":
            ref_s, ref_l, ref_q = seconds, loss, q
        vs_paper = f"{paper_s / seconds:.2f}x" if paper_s else "-"
        loss_paper = f"{loss / paper_l:.6f}" if paper_l else "-"
        vs_ref = f"{ref_s / seconds:.2f}x" if ref_s else "-"
        loss_ref = f"{loss / ref_l:.7f}" if ref_l else "-"
        excess = "-"
        if ref_q is not None and backend != "reference":
            lr, lf = loss64(weight, h_diag, ref_q, bits), loss64(weight, h_diag, q, bits)
            excess = f"{max(0.0, ((lf - lr) / lr.clamp_min(1e-30)).max().item()):.1e}"
        row(label, bits, group, method, name, f"{seconds:.3f}", f"{n / seconds / 1e6:.3f}",
            vs_paper, vs_ref, loss_paper, loss_ref, excess, hours(n / seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--shapes", default=",".join(LLAMA70B))
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group-sizes", default="64,128,-1")
    parser.add_argument("--methods", default="neuqi,neuqi-int")
    parser.add_argument("--backends", default="reference,numba")
    parser.add_argument("--rows", type=int, default=None, help="time the first N rows only")
    parser.add_argument("--paper", choices=("all", "grouped", "none"), default="all",
                        help="where to time the paper's search (grouped: not per-channel, where "
                             "its two sorts of 2m breakpoints per candidate take minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each backend this many times and report its fastest call "
                             "(the paper's search is timed once)")
    parser.add_argument("--save", metavar="NAME", default=None,
                        help="also save the table as benchmarks/results/tables/NAME.json, for "
                             "benchmarks/report.py to write into the documents")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat: give at least 1")
    device = torch.device(args.device)
    # every bits x group size x method is its own compiled graph of the reference: keep them all
    # compiled (past torch._dynamo's default limit of 8 the reference would fall back to eager)
    torch._dynamo.config.recompile_limit = 64
    shapes = [(s, LLAMA70B[s]) if s in LLAMA70B else (s, tuple(int(d) for d in s.split("x")))
              for s in args.shapes.split(",")]
    backends = args.backends.split(",")
    for backend in backends:
        if backend not in BACKENDS:
            parser.error(f"--backends: {backend} is not one of {', '.join(BACKENDS)}")

    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}; device: {device_name(device)} "
          f"({device.type}); torch {torch.__version__}; threads: {torch.get_num_threads()}; "
          f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"warm-up: one untimed call on the first {WARMUP_ROWS} rows per case, so compilation "
          "is excluded; CUDA is synchronised before reading the clock; each backend timed "
          f"{args.repeat} time(s), its fastest call shown. 70B projection: "
          f"{LLAMA70B_LINEAR_WEIGHTS / 1e9:.1f} G linear weights at the row's rate\n")
    columns = ["shape", "bits", "group", "method", "backend", "seconds", "M weights/s",
               "vs paper", "vs reference", "loss / paper", "loss / reference",
               "max group excess", "70B solve"]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    started, where, table = records.now(), records.machine(), []
    for name, (out_f, in_f) in shapes:
        rows = min(args.rows or out_f, out_f)
        weight, h_cpu = make_inputs(out_f, in_f, args.seed + out_f, rows)
        weight, h_diag = weight.to(device), h_cpu.to(device)
        label = f"{name} {out_f}x{in_f}" + (f" ({rows} rows)" if rows < out_f else "")
        for bits in (int(b) for b in args.bits.split(",")):
            for group in (int(g) for g in args.group_sizes.split(",")):
                for method in args.methods.split(","):
                    paper = args.paper == "all" or (args.paper == "grouped" and group != -1)
                    bench_case(label, weight, h_diag, bits, group, method, backends, paper,
                               device, out_f * in_f, args.repeat, table)
    if args.save:
        path = records.save(
            args.save, f"The NeUQI search's speed on {device_name(device)}, by backend",
            columns, table, records.command(), "Each backend's fastest of "
            f"{args.repeat} call(s); the last column is the solve of a 70B model's linears at "
            "that rate.", started=started, where=where)
        print(f"saved {path}")


if __name__ == "__main__":
    main()
