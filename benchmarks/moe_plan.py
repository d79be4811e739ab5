"""`neuqi plan` of three published mixture-of-experts models on a 24 GB GPU, from config.json only.

    python benchmarks/moe_plan.py [--budget 20GiB] [--nsamples 128] [--seqlen 2048]

The configs are the published ones, kept in ``tests/data/configs`` (no weights: the plan builds
one layer of each kind on the meta device, :mod:`neuqi.pipeline.shapes`). For each model it
prints the largest decoder layer (what the plan sizes every stage by), the plan's summary line
(peak device memory under the budget, and whether the layers run whole or one linear, that is
one expert projection, at a time), each stage's peak with its largest piece, and the smallest
budget that works. The device is ``cuda`` (planned, not probed: no GPU is needed to plan).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import records

from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.plan import fmt, make_plan, parse_size, read_shape

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data" / "configs"
MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="20GiB", help="device memory budget (a 24 GB GPU: 20GiB)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    args = p.parse_args()
    budget = parse_size(args.budget)
    rows = []
    for name in MODELS:
        folder = CONFIGS / name
        shape = read_shape(str(folder))
        experts = sum(".experts." in n for n, _, _ in shape.linears) // 3
        layer_bytes = 2 * shape.layer_params  # bf16, as published (DeepSeek-V3 stores FP8)
        config = QuantizeConfig(model=str(folder), out="/nonexistent", nsamples=args.nsamples,
                                seqlen=args.seqlen)
        plan = make_plan(config, "cuda", budget=budget, with_probe=False)
        print(f"== {name}: {shape.layers} layers, largest layer {len(shape.linears)} linears "
              f"({experts} experts), {layer_bytes / 1e9:.1f} GB in bf16")
        print(plan.summary())
        for stage in plan.stages:
            piece, size = max(stage.pieces.items(), key=lambda kv: kv[1])
            print(f"  {stage.name:8s} device {fmt(stage.device):>10s}  largest: {piece} "
                  f"{fmt(size)}")
        print(f"  smallest budget that works: {fmt(plan.floor)} "
              f"(--max-memory {math.ceil(plan.floor / 2**30 * 10) / 10}GiB)")
        k = plan.knobs
        held = ("one linear (expert projection) at a time" if k.linear_at_a_time
                else f"the layer whole, {k.windows} windows per pass")
        rows.append([name, f"{experts} experts, {layer_bytes / 1e9:.1f} GB bf16", held,
                     f"{plan.device_peak / 2**30:.2f} GiB", f"{plan.floor / 2**30:.2f} GiB"])
    path = records.save(
        "moe-plan", f"`neuqi plan` of three published mixture-of-experts models, --device cuda "
        f"--max-memory {args.budget}, {args.nsamples} x {args.seqlen} calibration tokens, from "
        "config.json alone", ["model", "largest layer", "plan", "peak device", "smallest budget"],
        rows, "python benchmarks/moe_plan.py", "Planned, not measured: no GPU is used.")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
