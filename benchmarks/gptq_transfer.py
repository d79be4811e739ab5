"""Does GPTQ's error compensation carry over from the calibration text to the evaluation text?

    python benchmarks/gptq_transfer.py [--layer 10] [--linears self_attn.q_proj,mlp.down_proj]
        [--bits 3] [--group-size 64] [--nsamples 16[,64,...]] [--seqlen 512] [--eval-windows 2]
        [--damp 0.01,0.1] [--calib FILE (default: the shipped Pride and Prejudice)]
        [--data data/wikitext2-test.raw]

For some linears of one decoder layer of SmolLM2-135M it captures the layer inputs X of the
full-precision model (transformers' own modelling code) on the calibration windows of the quality
benchmark (the pipeline's `calibration_windows`, same text, count, length and seed) and on the first
evaluation windows (the pipeline's `eval_windows`), then quantizes the weight W with

- RTN at the Min-Max and the NeUQI parameters (h = diagonal of the calibration H plus 1 % of its
  mean, as the pipeline does),
- GPTQ from each of those initialisations against the calibration H = XᵀX / tokens, at each
  `--damp`,

and prints the relative output error ``||X (W - Ŵ)ᵀ||² / ||X Wᵀ||²`` on the calibration inputs (what
GPTQ minimises) and on the evaluation inputs (what perplexity sees). Only the layers up to
``--layer`` are run. This measures one layer of the unquantized model, not the sequential job.

Several ``--nsamples`` (comma-separated) repeat the measurement with that many calibration windows
each, against the same evaluation inputs: how many calibration tokens GPTQ needs before its
compensation carries over.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from neuqi.data.calib import calibration_windows, load_calibration_text
from neuqi.evaluate import eval_windows, read_eval_text
from neuqi.model.checkpoint import load_tokenizer
from neuqi.model.demo import ensure_smollm2
from neuqi.quant.gptq import gptq_quantize
from neuqi.quant.solver import quantize_tensor
from neuqi.stages.hessian import DAMPING

DATA = Path(__file__).resolve().parents[1] / "data"  # the repository's copy (data/README.md)


class _Stop(Exception):
    """Raised by the hook of the last captured layer: nothing after it is needed."""


def capture(model: torch.nn.Module, layer: int, linears: list[str],
            windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs ``[tokens, in]`` of each linear of decoder ``layer`` over ``windows``."""
    block = model.model.layers[layer]
    got: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    hooks = []
    for name in linears:
        def hook(_m: torch.nn.Module, args: tuple, name: str = name) -> None:
            got[name].append(args[0].reshape(-1, args[0].shape[-1]).float())
        hooks.append(block.get_submodule(name).register_forward_pre_hook(hook))

    def stop(_m: torch.nn.Module, _a: tuple, _o: object) -> None:
        raise _Stop

    hooks.append(block.register_forward_hook(stop))
    try:
        for row in windows:
            try:
                model(row[None])
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def relative_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - wq).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--linears", default="self_attn.q_proj,mlp.down_proj")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--nsamples", default="16")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--damp", default="0.01,0.1")
    parser.add_argument("--calib", type=Path, default=None)  # None: the shipped text
    parser.add_argument("--data", type=Path, default=DATA / "wikitext2-test.raw")
    args = parser.parse_args()
    linears = [s.strip() for s in args.linears.split(",") if s.strip()]
    damps = [float(d) for d in args.damp.split(",")]

    torch.set_grad_enabled(False)
    path = ensure_smollm2()
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ev = eval_windows(tokenizer, read_eval_text(args.data), args.eval_seqlen, args.eval_windows)
    x_ev = capture(model, args.layer, linears, ev)
    text = load_calibration_text(args.calib)
    counts = [int(n) for n in args.nsamples.split(",") if n.strip()]

    print(f"SmolLM2-135M layer {args.layer}, w{args.bits} g{args.group_size}; calibration "
          f"{'/'.join(str(n) for n in counts)} windows of {args.seqlen} tokens of "
          f"{args.calib.name if args.calib else 'pride-and-prejudice.txt'}, evaluation "
          f"{ev.numel()} tokens of {args.data.name}\n")
    print("| calibration tokens | linear | method | calibration error | evaluation error |")
    print("|---|---|---|---|---|")
    for count in counts:
        cal = calibration_windows(tokenizer, text, count, args.seqlen, args.seed)
        x_cal = capture(model, args.layer, linears, cal)
        for name in linears:
            w = model.model.layers[args.layer].get_submodule(name).weight.float()
            xc, xe = x_cal[name], x_ev[name]
            hessian = xc.T @ xc / xc.shape[0]
            h = hessian.diag() + DAMPING * hessian.diag().mean()
            for method in ("minmax", "neuqi"):
                q = quantize_tensor(w, h, bits=args.bits, group_size=args.group_size,
                                    method=method)
                rows = [(method, q.dequantize())]
                for damp in damps:
                    r = gptq_quantize(w, hessian, q.scale, q.zero_point, bits=args.bits,
                                      group_size=args.group_size, damp=damp)
                    rows.append((f"{method}+gptq (damp {damp:g})", r.dequantize()))
                for label, wq in rows:
                    print(f"| {cal.numel()} | {name} | {label} | {relative_error(w, wq, xc):.5f} | "
                          f"{relative_error(w, wq, xe):.5f} |", flush=True)
        del x_cal


if __name__ == "__main__":
    main()
