"""What compressed-tensors' integer zero-points cost a NeUQI (float zero-point) solve.

    python benchmarks/export_int_floor.py out/smollm2-w4g64.job [--layers 0,1]

For every linear the job store has solved (a job in progress, or one kept with --keep-job), with
the job's own weights and Hessian diagonal, the weighted loss ``sum h (w - ŵ)²`` of:

- ``neuqi``: the parameters the job stored (NeUQI, float zero-points), what the native output has;
- ``neuqi-int``: re-solved with integer zero-points and the scale cast to the model's dtype, what
  ``neuqi export --format compressed-tensors`` now writes
  (:func:`neuqi.formats.export.compressed_tensors.resolve_integer`);
- ``rounded``: the zero-points rounded and the codes re-rounded
  (:func:`neuqi.formats.export.compressed_tensors.integer_params`), what it wrote before.

Prints one row per linear and the totals with the loss each adds over ``neuqi``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from neuqi.formats.export.common import NativeLinear, weighted_loss
from neuqi.formats.export.compressed_tensors import integer_params, resolve_integer
from neuqi.model.checkpoint import Checkpoint, resolve_model
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.store import JobStore
from neuqi.quant.solver import dequantize
from neuqi.stages.common import h_name, quant_params

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("job", type=Path)
    parser.add_argument("--layers", default=None, help="comma-separated (default: all solved)")
    args = parser.parse_args()
    store = JobStore.open_existing(args.job)
    config = QuantizeConfig.from_manifest(store.manifest)
    ckpt = Checkpoint.open(resolve_model(config.model))
    cfg = json.loads((ckpt.path / "config.json").read_text())
    dtype = DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype")), torch.float32)
    wanted = None if args.layers is None else {int(x) for x in args.layers.split(",")}
    print(f"job {args.job}: {config.model}, {config.bits} bits, group {config.group_size}, "
          f"method {config.method}; scales stored as {dtype}")
    print(f"{'linear':32} {'neuqi':>10} {'neuqi-int':>10} {'rounded':>10}")
    totals = [0.0, 0.0, 0.0]
    for key in store.records("solve"):
        _, layer, linear = key.split("/", 2)
        i = int(layer)
        if wanted is not None and i not in wanted:
            continue
        name = f"{ckpt.arch.layer_prefix(i)}{linear}.weight"
        codes, scale, zero = quant_params(store, i, linear)
        h = store.read_array(h_name(i, ckpt.arch.group_in(i, linear)))
        lin = NativeLinear(name=name, codes=codes, scale=scale, zero_point=zero,
                           bits=config.bits, group_size=config.group_size,
                           weight=ckpt.read(name, dtype=torch.float32), h_diag=h,
                           method=config.method)
        q, s, z = resolve_integer(lin)
        rq, rz, _ = integer_params(lin)
        losses = [
            weighted_loss(lin.weight, lin.dequantized(), h),
            weighted_loss(lin.weight, dequantize(q, s.to(dtype).float(), z, lin.group_size), h),
            weighted_loss(lin.weight, dequantize(rq, scale.to(dtype).float(), rz,
                                                 lin.group_size), h),
        ]
        totals = [t + x for t, x in zip(totals, losses, strict=True)]
        print(f"{layer + '/' + linear:32} " + " ".join(f"{x:10.5g}" for x in losses))
    base = totals[0]
    print(f"{'total':32} " + " ".join(f"{x:10.5g}" for x in totals))
    for label, value in (("neuqi-int", totals[1]), ("rounded", totals[2])):
        print(f"{label}: adds {value - base:+.5g} ({100 * (value - base) / base:+.2f}%) over neuqi")


if __name__ == "__main__":
    main()
