"""A random-init Mixtral-like model quantized end to end: perplexity before and after, with the
experts' Hessians from their routed tokens and from all tokens, side by side.

    python benchmarks/moe_tiny.py [--bits 3] [--nsamples 16] [--seqlen 256] [--windows 16]
        [--workdir DIR]

No small MoE checkpoint is available offline, so the model is built here from transformers'
MixtralConfig (:func:`neuqi.model.synthetic.build_from_config`: 4 layers, hidden 256, 8 experts of width
512, 2 per token, vocabulary 1024, seeded random weights) with a byte-level BPE trained on the
shipped calibration text. It is quantized twice with the real pipeline
(:func:`neuqi.pipeline.runner.quantize`, ``--moe-calibration routed`` and ``all``) and every
model is scored with the project's evaluator (:func:`neuqi.evaluate.perplexity`) on the first
``--windows`` windows of ``data/wikitext2-test.raw``. A random model's perplexity is near its
vocabulary size; what the figures show is how far each quantization moves it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import records
from rich.console import Console

from neuqi.evaluate import perplexity
from neuqi.model.synthetic import build_from_config, tiny_moe_config
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.runner import quantize
from neuqi.util.progress import Log

DATA = Path(__file__).resolve().parent.parent / "data" / "wikitext2-test.raw"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=16, help="evaluation windows")
    p.add_argument("--workdir", default=None)
    p.add_argument("--save", metavar="NAME", default=None,
                   help="also save the table as benchmarks/results/tables/NAME.json")
    args = p.parse_args()
    started_at, where = records.now(), records.machine()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="neuqi-moe-tiny-"))
    model = work / "mixtral-tiny"
    if not (model / "config.json").is_file():
        config = tiny_moe_config("mixtral", layers=4, experts=8, vocab=1024, seqlen=2048,
                                 hidden_size=256, intermediate_size=512,
                                 num_attention_heads=8, num_key_value_heads=4)
        build_from_config(model, config, seed=0)
    quiet = Console(stderr=True, quiet=True)

    def ppl(folder: Path) -> float:
        r = perplexity(str(folder), DATA, seqlen=args.seqlen, max_windows=args.windows,
                       batch_size=4, device="cpu", console=quiet)
        return float(r["perplexity"])

    rows = [("full precision", ppl(model), "", "")]
    for mode in ("routed", "all"):
        out = work / f"q-{mode}"
        started = time.perf_counter()
        quantize(QuantizeConfig(model=str(model), out=str(out), bits=args.bits,
                                group_size=args.group_size, nsamples=args.nsamples,
                                seqlen=args.seqlen, moe_calibration=mode),
                 device="cpu", console=Log.of(quiet))
        seconds = time.perf_counter() - started
        moe = json.loads((out / "neuqi.json").read_text())["quant_info"]["moe"]
        fell = sum(len(v["experts_fallback"]) for v in moe["layers"].values())
        rows.append((f"{args.bits}-bit NeUQI, --moe-calibration {mode}", ppl(out),
                     f"{fell}/{8 * len(moe['layers'])}", f"{seconds:.0f} s"))
    print(f"model {model} (Mixtral-like, random init), calibration {args.nsamples} x "
          f"{args.seqlen} tokens (shipped text), eval {args.windows} x {args.seqlen} tokens of "
          f"{DATA.name}")
    print("| model | perplexity | experts fallen back | quantize time |")
    print("|---|---|---|---|")
    table = [[name, f"{value:.2f}", fell, seconds] for name, value, fell, seconds in rows]
    for cells in table:
        print("| " + " | ".join(cells) + " |")
    if args.save:
        path = records.save(
            args.save, "A random-init Mixtral-like model end to end, "
            f"{args.bits}-bit NeUQI, group {args.group_size}",
            ["model", "perplexity", "experts fallen back", "quantize time"], table,
            records.command(), f"Calibration {args.nsamples} x {args.seqlen} tokens of the "
            f"shipped text, evaluation {args.windows} x {args.seqlen} tokens of {DATA.name}. "
            "A random model's perplexity says that the pipeline runs, not which calibration is "
            "better.", started=started_at, where=where)
        print(f"saved {path}")


if __name__ == "__main__":
    main()
