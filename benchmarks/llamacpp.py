"""WikiText-2 perplexity of a GGUF export in llama.cpp next to neuqi's own evaluation.

    python benchmarks/llamacpp.py [--model smollm2] [--data data/wikitext2-test.raw]
        [--type q4_1] [--bits 4] [--group-size 32] [--method neuqi] [--nsamples 16]
        [--calib-seqlen 512] [--seqlen 2048] [--max-windows N] [--threads 2]
        [--workdir DIR] [--output DIR]

Steps, each through the package's public API: quantize MODEL (or reuse ``--output``, a native
output folder), export it with ``neuqi export --format gguf-<type>``, evaluate the native output
with ``neuqi eval`` (:func:`neuqi.evaluate.perplexity`), and evaluate the GGUF file in llama.cpp
(the ``llama-cpp-python`` package, which builds llama.cpp from source) on exactly the same token
windows: the evaluation text tokenized once with the model's Hugging Face tokenizer, cut into
non-overlapping windows of ``--seqlen`` tokens, each window fed to llama.cpp as token ids from a
fresh context, and ``exp`` of the mean next-token NLL over ``seqlen - 1`` predictions per window.
So the two numbers differ only by the weights' storage (fp16 block parameters for Q4_1/Q5_1, the
constrained solve for K-quants) and by the two engines' arithmetic.

Not part of CI: it needs llama-cpp-python (``pip install llama-cpp-python``) and minutes of CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "wikitext2-test.raw"  # data/README.md


def llama_cpp_perplexity(gguf_file: Path, windows, threads: int) -> float:
    """Perplexity of ``windows`` (int64 ``[n, seqlen]``) in llama.cpp, all logits of each window."""
    import numpy as np
    from llama_cpp import Llama

    n, seqlen = windows.shape
    llm = Llama(model_path=str(gguf_file), n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen,
                logits_all=True, n_threads=threads, verbose=False)
    nll, count = 0.0, 0
    for i in range(n):
        tokens = windows[i].tolist()
        llm.reset()
        llm.eval(tokens)
        logits = np.asarray(llm.scores[:seqlen], dtype=np.float64)  # [seqlen, vocab]
        logits = logits[:-1]
        top = logits.max(-1, keepdims=True)
        logz = (top[:, 0] + np.log(np.exp(logits - top).sum(-1)))
        target = np.asarray(tokens[1:])
        nll += float((logz - logits[np.arange(seqlen - 1), target]).sum())
        count += seqlen - 1
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--type", default="q4_1", choices=["q4_1", "q5_1", "q4_k", "q5_k", "q2_k"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--method", default="neuqi")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--output", type=Path, default=None,
                   help="an existing native output to export (skips quantization)")
    args = p.parse_args()

    import torch

    from neuqi.evaluate import eval_windows, perplexity, read_eval_text
    from neuqi.formats.export import export
    from neuqi.model.checkpoint import load_tokenizer
    from neuqi.pipeline.config import QuantizeConfig
    from neuqi.pipeline.runner import quantize

    work = args.workdir or Path(tempfile.mkdtemp(prefix="neuqi-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    output = args.output
    started = time.perf_counter()
    if output is None:
        output = work / "native"
        config = QuantizeConfig(
            model=args.model, out=str(output), bits=args.bits, group_size=args.group_size,
            method=args.method, nsamples=args.nsamples, seqlen=args.calib_seqlen,
        )
        quantize(config, None, "cpu")
    print(f"native output: {output} ({time.perf_counter() - started:.0f} s)", flush=True)

    gguf_file = work / f"model-{args.type}.gguf"
    report = export(output, f"gguf-{args.type}", gguf_file, say=print)
    print(report.summary(), flush=True)

    t = time.perf_counter()
    ours = perplexity(str(output), args.data, args.seqlen, args.max_windows, 4, "cpu")
    print(f"neuqi eval: perplexity {ours['perplexity']:.4f} "
          f"({time.perf_counter() - t:.0f} s)", flush=True)

    torch.set_num_threads(args.threads)
    windows = eval_windows(load_tokenizer(Path(output)), read_eval_text(args.data), args.seqlen,
                           args.max_windows)
    t = time.perf_counter()
    theirs = llama_cpp_perplexity(gguf_file, windows, args.threads)
    print(f"llama.cpp: perplexity {theirs:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    diff = theirs / ours["perplexity"] - 1
    print(json.dumps({
        "model": args.model, "output": str(output), "gguf": str(gguf_file), "type": args.type,
        "windows": int(windows.shape[0]), "seqlen": args.seqlen,
        "neuqi_perplexity": ours["perplexity"], "llama_cpp_perplexity": theirs,
        "relative_difference": diff, "within_1_percent": abs(diff) <= 0.01,
        "added_weighted_loss": report.added_loss, "native_weighted_loss": report.native_loss,
    }, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
