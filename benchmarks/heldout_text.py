"""Write the part of the evaluation text that the quality benchmark does not score, for in-domain
calibration experiments.

    python benchmarks/heldout_text.py [--model smollm2] [--data data/wikitext2-test.raw]
        [--seqlen 2048] [--max-windows 8] [--out out/wikitext2-heldout.txt]

The quality benchmark scores the first ``--max-windows`` windows of ``--seqlen`` tokens of
``--data`` (``neuqi.evaluate.eval_windows``: the text tokenized once, cut from its start). This
writes the text from the first line that begins after the last scored token, so calibrating on it
(``--calib``) never sees a scored token. The ``--model``'s tokenizer (a built-in model's name or a
folder) decides where the windows end, so each model needs its own file: for ``gemma3-270m``,
``--out out/wikitext2-heldout-gemma3-270m.txt``. (A tokenizer that starts every window with
``<bos>`` scores ``seqlen - 1`` text tokens a window; counting ``seqlen`` keeps a margin.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neuqi.evaluate import read_eval_text
from neuqi.model.checkpoint import load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # the repository's copy (data/README.md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", type=Path, default=DATA / "wikitext2-test.raw")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "wikitext2-heldout.txt")
    args = parser.parse_args()

    tokenizer = load_tokenizer(resolve_model(args.model))
    text = read_eval_text(args.data)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    scored = args.seqlen * args.max_windows
    if len(enc["input_ids"]) <= scored:
        raise SystemExit(f"--data {args.data}: only {len(enc['input_ids'])} tokens, all scored")
    end = enc["offset_mapping"][scored - 1][1]  # character just after the last scored token
    start = text.find("\n", end) + 1
    if start == 0:
        raise SystemExit(f"--data {args.data}: no line begins after the scored windows")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text[start:], encoding="utf-8")
    rest = len(tokenizer(text[start:], add_special_tokens=False, verbose=False)["input_ids"])
    print(f"{args.out}: {len(text) - start} characters, {rest} tokens, from character {start} "
          f"(the {scored} scored tokens end at character {end})")


if __name__ == "__main__":
    main()
