"""What GPTQ costs and gains per decoder layer, on a real model's layer and calibration text.

    python benchmarks/gptq.py [--model smollm2|gemma3-270m|FOLDER] [--device cpu|cuda] [--layer 2]
        [--bits 2,3,4] [--group-size 64] [--nsamples 16] [--seqlen 512]
        [--methods minmax,neuqi-int,neuqi,minmax-lazy,neuqi-lazy,neuqi-lazy+refit]

Calibration windows from the shipped text go through the full-precision model up to decoder layer
``--layer``; the real `hessian` stage then stores that layer's diagonal ``h`` and full Hessians
``H`` in a temporary job store. For each bit width and method, all seven linears of the layer are
solved twice through the real stages: plainly (``stages.solve.run_solve``: the chosen (s, z) and
rounding to nearest) and with GPTQ (``stages.gptq.run_gptq_solve``: the same (s, z), then error
compensation with act-order, block 128, 1% damping; ``minmax-lazy`` is the original GPTQ, which
has no plain row); ``M-lazy`` solves method M's parameters inside GPTQ's loop (``--gptq-params
lazy``) and ``+refit`` adds the refinement of ``--gptq-refit`` (``neuqi.quant.gptq.refine``); these have
no plain row either. The table gives the seconds per layer of each, the extra seconds GPTQ costs,
and the layer's output error ``sum over linears of tr((W - Ŵ) H (W - Ŵ)ᵀ)`` for both (lower is
better). Every method is run once untimed first, so ``torch.compile`` is not timed. Reading ``H``
from the store is not timed (the runner reads it once per input group).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import records
import torch

from neuqi.data.calib import calibration_windows, load_calibration_text
from neuqi.model.checkpoint import Checkpoint, load_tokenizer, resolve_model
from neuqi.model.layers import build_layer, build_rotary
from neuqi.pipeline.store import JobStore
from neuqi.quant.gptq import LAZY_MINMAX
from neuqi.quant.solver import dequantize
from neuqi.stages.common import h_name, q_name
from neuqi.stages.embed import run_embed
from neuqi.stages.forward import run_forward
from neuqi.stages.gptq import hessian_name, read_hessian, run_gptq_solve
from neuqi.stages.hessian import run_hessian
from neuqi.stages.solve import run_solve


def prepare(store: JobStore, ckpt: Checkpoint, layer_index: int, nsamples: int, seqlen: int,
            device: torch.device) -> torch.nn.Module:
    """Layer ``layer_index`` with its h and H in ``store`` (earlier layers in full precision)."""
    text = load_calibration_text(None)
    windows = calibration_windows(load_tokenizer(ckpt.path), text, nsamples, seqlen, 0)
    run_embed(store, ckpt, windows, torch.float32, 8, device)
    rotary = build_rotary(ckpt.config, device)
    for i in range(layer_index):
        run_forward(store, i, build_layer(ckpt, i, device, torch.float32), rotary, torch.float32,
                    8, device)
    layer = build_layer(ckpt, layer_index, device, torch.float32)
    run_hessian(store, layer_index, layer, ckpt.arch, rotary, 8, device, full=True)
    return layer


def output_error(store: JobStore, layer_index: int, linear: str, weight: torch.Tensor,
                 hessian: torch.Tensor, group_size: int) -> float:
    codes, scale, zero = (store.read_array(q_name(layer_index, linear, p), device=weight.device)
                          for p in ("codes", "scale", "zero_point"))
    diff = weight.float() - dequantize(codes, scale, zero, group_size)
    return float(((diff @ hessian) * diff).sum())


def solve_layer(store: JobStore, ckpt: Checkpoint, layer: torch.nn.Module, layer_index: int,
                hessians: dict[str, torch.Tensor], *, bits: int, group_size: int, method: str,
                gptq: bool, device: torch.device, params: str = "static",
                refit: bool = False) -> tuple[float, float]:
    """Seconds to solve the layer's linears, and the layer's summed output error."""
    arch = ckpt.arch
    seconds = error = 0.0
    for group, linears in arch.linear_groups:
        h = store.read_array(h_name(layer_index, group), device=device)
        for linear in linears:
            weight = layer.get_submodule(linear).weight.detach()
            kwargs = {"bits": bits, "group_size": group_size, "method": method,
                      "device": device,
                      "weight_name": f"{arch.layer_prefix(layer_index)}{linear}.weight"}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            if gptq:
                run_gptq_solve(store, layer_index, linear, weight, h, hessians[group],
                               act_order=True, block_size=128, params=params, refit=refit,
                               **kwargs)
            else:
                run_solve(store, layer_index, linear, weight, h, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - started
            error += output_error(store, layer_index, linear, weight, hessians[group],
                                  group_size)
    return seconds, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group-size", type=int, default=64)  # 576 = 9 x 64
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--methods", default=f"minmax,neuqi-int,neuqi,{LAZY_MINMAX}")
    parser.add_argument("--save", metavar="NAME", default=None,
                        help="also save the table as benchmarks/results/tables/NAME.json")
    args = parser.parse_args()
    started_at, where, table = records.now(), records.machine(), []
    device = torch.device(args.device)
    ckpt = Checkpoint.open(resolve_model(args.model))
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        store = JobStore.create_or_open(Path(tmp) / "job", {"benchmark": "gptq"})
        started = time.perf_counter()
        layer = prepare(store, ckpt, args.layer, args.nsamples, args.seqlen, device)
        prep = time.perf_counter() - started
        hessians = {g: read_hessian(store, hessian_name(args.layer, g), device)
                    for g, _ in ckpt.arch.linear_groups}
        shapes = ", ".join(f"{lin.split('.')[-1]} {tuple(layer.get_submodule(lin).weight.shape)}"
                           for lin in ckpt.arch.linears)
        print(f"{args.model} layer {args.layer} ({shapes}); {args.nsamples} x {args.seqlen} "
              f"calibration tokens; group size {args.group_size}; device {device} "
              f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
              f"threads); embed + forward + hessian (with H): {prep:.1f} s\n")
        print("| bits | method | plain s/layer | GPTQ s/layer | GPTQ extra s | "
              "output error plain | output error GPTQ |")
        print("|---|---|---|---|---|---|---|")
        for bits in (int(b) for b in args.bits.split(",")):
            for row in methods:
                refit = row.endswith("+refit")
                method = row.removesuffix("+refit")
                params = "lazy" if method.endswith("-lazy") and method != LAZY_MINMAX else "static"
                method = method.removesuffix("-lazy") if params == "lazy" else method
                lazy = method == LAZY_MINMAX or params == "lazy" or refit
                common = {"bits": bits, "group_size": args.group_size, "method": method,
                          "device": device}
                if not lazy:  # warm-up (compilation), then timed
                    solve_layer(store, ckpt, layer, args.layer, hessians, gptq=False, **common)
                    plain_s, plain_e = solve_layer(store, ckpt, layer, args.layer, hessians,
                                                   gptq=False, **common)
                extra = {"params": params, "refit": refit}
                solve_layer(store, ckpt, layer, args.layer, hessians, gptq=True, **common,
                            **extra)
                gptq_s, gptq_e = solve_layer(store, ckpt, layer, args.layer, hessians,
                                             gptq=True, **common, **extra)
                if lazy:
                    name = f"{row} (original GPTQ)" if row == LAZY_MINMAX else row
                    cells = [bits, name, "", f"{gptq_s:.2f}", "", "", f"{gptq_e:.4g}"]
                else:
                    cells = [bits, method, f"{plain_s:.2f}", f"{gptq_s:.2f}",
                             f"{gptq_s - plain_s:+.2f}", f"{plain_e:.4g}", f"{gptq_e:.4g}"]
                table.append([str(c) for c in cells])
                print("| " + " | ".join(table[-1]) + " |", flush=True)
    if args.save:
        path = records.save(
            args.save, f"One decoder layer of {args.model} (layer {args.layer}, groups of "
            f"{args.group_size}) with each GPTQ variant: time and output error",
            ["bits", "method", "plain s/layer", "GPTQ s/layer", "GPTQ extra s",
             "output error plain", "output error GPTQ"], table, records.command(),
            "Output error: the layer's sum of tr((W - Ŵ) H (W - Ŵ)ᵀ); calibration: "
            f"{args.nsamples} x {args.seqlen} tokens of the shipped text.",
            started=started_at, where=where)
        print(f"saved {path}")


if __name__ == "__main__":
    main()
