"""Throughput and loss of the package's solver against the paper's literal search.

    python benchmarks/solver.py --device cpu|cuda [--shapes 4096x4096,4096x11008] [--bits 2,3,4]
        [--group-sizes 128,-1] [--rows N] [--seed 0]

For each shape x bits x group size it times ``minmax``, ``neuqi-int`` and ``neuqi`` through
:func:`neuqi.solver.quantize_tensor` (``neuqi`` twice: ``compile`` left at its default, and
``compile=False``) and :func:`paper_reference.paper_search` on the same groups and normalised ``h``,
and prints a markdown table. The loss ratio is the summed loss ``sum_i h_i (w_i - ŵ_i)²`` (raw
``h``) over all groups divided by the paper search's. Each method is warmed up once on a few rows
with the same bits, group size and compile setting, so compilation is not timed; compilations
that the timed call still triggers (shapes the warm-up did not meet) are counted in the method column.
The paper's search runs on chunks of ``CHUNK_ELEMENTS`` weights (it holds one candidate at a time).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from paper_reference import paper_search
from torch import Tensor
from torch._dynamo.utils import counters

from neuqi.solver import CHUNK_ELEMENTS, COMPILE_MIN_WEIGHTS, quantize_tensor

WARMUP_ROWS = 4


def make_inputs(out_f: int, in_f: int, seed: int) -> tuple[Tensor, Tensor]:
    """A heavy-tailed weight (Student-t, 3 dof, scaled 0.02) and a positive, spread ``h_diag``."""
    gen = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(3, out_f, in_f, generator=gen).pow(2).sum(0)
    weight = 0.02 * torch.randn(out_f, in_f, generator=gen) / (chi2 / 3).sqrt()
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


def timed(
    fn: Callable[[Tensor], Tensor], weight: Tensor, device: torch.device
) -> tuple[float, float, int]:
    """Warm up on a few rows, then time ``fn`` on the whole weight: (seconds, summed loss, number
    of torch.compile compilations that the warm-up did not cover and so were timed)."""
    fn(weight[:WARMUP_ROWS])
    sync(device)
    frames = counters["frames"]["total"]
    start = time.perf_counter()
    loss = fn(weight)
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, loss.sum(dtype=torch.float64).item(), counters["frames"]["total"] - frames


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


def bench_case(
    label: str, weight: Tensor, h_diag: Tensor, bits: int, group: int, device: torch.device
) -> None:
    """Time every method on one weight, bit width and group size; print a table row each."""
    auto = weight.numel() >= COMPILE_MIN_WEIGHTS  # what compile=None resolves to

    def package(method: str, compile: bool | None) -> Callable[[Tensor], Tensor]:
        # the warm-up call is small: give it the setting the default resolves to
        return lambda w: quantize_tensor(
            w, h_diag, bits=bits, group_size=group, method=method, device=device,
            compile=auto if compile is None and w is not weight else compile,
        ).loss

    methods: list[tuple[str, Callable[[Tensor], Tensor]]] = [
        ("paper", lambda w: paper_loss(w, h_diag, bits, group)),
        ("minmax", package("minmax", None)),
        ("neuqi-int", package("neuqi-int", None)),
        (f"neuqi (compile default: {'on' if auto else 'off'})", package("neuqi", None)),
        ("neuqi (compile=False)", package("neuqi", False)),
    ]
    paper_s = paper_l = 0.0
    for name, fn in methods:
        seconds, loss, compiled = timed(fn, weight, device)
        if compiled:
            name += f" [{compiled} compilations timed]"
        if name == "paper":
            paper_s, paper_l = seconds, loss
        print(f"| {label} | {bits} | {group} | {name} | {seconds:.3f} "
              f"| {weight.numel() / seconds / 1e6:.3f} | {paper_s / seconds:.2f}x "
              f"| {loss / paper_l:.6f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--shapes", default="4096x4096,4096x11008")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group-sizes", default="128,-1")
    parser.add_argument("--rows", type=int, default=None, help="measure the first N rows only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    group_sizes = [int(g) for g in args.group_sizes.split(",")]

    print(f"device: {device_name(device)} ({device.type}); torch {torch.__version__}; "
          f"threads: {torch.get_num_threads()}")
    print(f"warm-up: one untimed call on the first {WARMUP_ROWS} rows per method and setting, so "
          "torch.compile's compilation is excluded (compilations for shapes the warm-up did not "
          "meet are counted in the method column); CUDA is synchronised before reading the clock\n")
    print("| shape | bits | group | method | seconds | Mweights/s | speed-up vs paper "
          "| loss ratio vs paper |")
    print("|---|---|---|---|---|---|---|---|")
    for out_f, in_f in shapes:
        full, h_cpu = make_inputs(out_f, in_f, args.seed)
        rows = min(args.rows or out_f, out_f)
        weight, h_diag = full[:rows].to(device), h_cpu.to(device)
        label = f"{out_f}x{in_f} ({rows} rows)"
        for bits in bits_list:
            for group in group_sizes:
                bench_case(label, weight, h_diag, bits, group, device)


if __name__ == "__main__":
    main()
