"""The quality table: perplexity of SmolLM2-135M quantized by each method at each bit width.

    python benchmarks/quality.py [--settings w2g64,w3g64,w4g64,w3c,w4c]
        [--methods minmax,neuqi-int,neuqi,minmax+gptq,neuqi+gptq,neuqi+distill,...]
        [--max-windows 16] [--nsamples 32] [--seqlen 512]
        [--calib FILE] [--data data/wikitext2-test.raw]
        [--eval-seqlen 2048] [--device cpu] [--results benchmarks/results] [--workdir out/quality]
        [--force] [--keep]

Every row runs the real command line in a fresh process, exactly as a user would::

    neuqi quantize smollm2 --out OUT --bits B --group-size G --method M
        --calib out/quality/pride-and-prejudice.txt --nsamples 32 --seqlen 512 --seed 0
    neuqi eval OUT --data data/wikitext2-test.raw --seqlen 2048 --max-windows 16 --json

so every row uses the same calibration windows (same text, count, length and seed) and the same
evaluation windows (the first ``--max-windows`` non-overlapping windows of the joined text). The
full-precision row is ``neuqi eval smollm2``. The quantize time is the wall time of the
``neuqi quantize`` process (model conversion is done once beforehand, not counted), plus that of
``neuqi distill OUT --teacher smollm2 --steps NSAMPLES`` for the end-to-end distillation row
(which starts from the plain ``neuqi`` row's output when that was kept with ``--keep``: the same
command gives bitwise the same output, so it is copied and its measured time counted).
Distillation rows train for one pass over the calibration windows (``--distill-steps NSAMPLES``).

Results accumulate in ``<results>/quality.json`` keyed by row, with the protocol (calibration and
evaluation options) they were made with: a rerun skips rows already measured under the same
protocol (``--force`` redoes them), so rows can be added later (for example a new method) without
redoing the others. Each run rewrites ``quality.md`` (the table) and ``quality.png`` (perplexity
against bits, log scale) of its ``--settings`` and ``--methods`` from the stored rows of that
protocol (``--report NAME`` writes ``NAME.md`` and ``NAME.png`` instead, so one results file can
give several tables).

Settings: ``wBgG`` is B bits with groups of G input channels, ``wBc`` is B bits per channel
(``--group-size -1``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # the repository's copy of the evaluation text (data/README.md)
NEUQI = [sys.executable, "-c", "from neuqi.cli import main; main()"]

# Method names in the table -> `neuqi quantize` options; the table shows whichever rows have been
# measured. "{steps}" is --distill-steps / --steps: one pass over the calibration windows.
METHODS: dict[str, list[str]] = {
    "minmax": ["--method", "minmax"],
    "neuqi-int": ["--method", "neuqi-int"],
    "neuqi": ["--method", "neuqi"],
    "minmax+gptq": ["--method", "minmax", "--gptq", "--gptq-params", "static",
                    "--no-gptq-refit"],  # Min-Max of the original weights
    "minmax-lazy+gptq": ["--method", "minmax-lazy", "--gptq", "--no-gptq-refit"],  # GPTQ's own
    "neuqi+gptq": ["--method", "neuqi", "--gptq", "--gptq-params", "static",
                   "--no-gptq-refit"],  # the NeUQI paper's recipe
    # each group's NeUQI solved when GPTQ reaches it, from the compensated weights (neuqi.quant.gptq)
    "neuqi-lazy+gptq": ["--method", "neuqi", "--gptq", "--gptq-params", "lazy",
                        "--no-gptq-refit"],
    # then per row the better of it and GPTQ's lazy Min-Max, scales and zero-points refitted
    "neuqi-lazy+gptq+refit": ["--method", "neuqi", "--gptq", "--gptq-params", "lazy",
                              "--gptq-refit"],
    "neuqi+distill": ["--method", "neuqi", "--distill-steps", "{steps}"],  # block-wise
    "neuqi+gptq+distill": ["--method", "neuqi", "--gptq", "--gptq-params", "static",
                           "--no-gptq-refit", "--distill-steps", "{steps}"],
    "neuqi-lazy+gptq+refit+distill": ["--method", "neuqi", "--gptq", "--gptq-params", "lazy",
                                      "--gptq-refit", "--distill-steps", "{steps}"],
    "neuqi+e2e-distill": ["--method", "neuqi"],  # then `neuqi distill` (END_TO_END)
}
# Rows whose quantized output is then trained end to end: `neuqi distill OUT --teacher MODEL`,
# with the row whose `neuqi quantize` command they share (its output is reused when kept).
END_TO_END = {"neuqi+e2e-distill": "neuqi"}
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=ROOT, check=False).stdout.strip() or "unknown"
# The forward pass (hence a perplexity, and NeUQI's near-tie choices) moves with these (README).
VERSIONS = {name: version(name) for name in ("torch", "transformers")}
MODEL_TITLES = {"smollm2": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M"}
SETTING = re.compile(r"^w([2-8])(?:g(\d+)|c)$")


def parse_setting(text: str) -> tuple[int, int]:
    match = SETTING.match(text)
    if not match:
        raise SystemExit(f"--settings {text}: use wBgG (B bits, groups of G) or wBc (per channel)")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else -1


def setting_label(setting: str) -> str:
    bits, group = parse_setting(setting)
    return f"w{bits} g{group}" if group > 0 else f"w{bits} per-channel"


def run(cmd: list[str], log: Path) -> tuple[str, float]:
    """Run ``cmd``; return its stdout and wall time. A failure stops the benchmark with the
    command's stderr (also kept in ``log``)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}), see {log}:\n{proc.stderr[-2000:]}")
    return proc.stdout, seconds


def evaluate(model: str, args: argparse.Namespace, log: Path,
             reference: str | None = None) -> dict[str, Any]:
    """``neuqi eval`` of ``model``; with ``reference`` (``--kld``) also the KL divergence to it
    and the top-token agreement, on the same windows."""
    cmd = [*NEUQI, "eval", model, "--data", str(args.data), "--seqlen", str(args.eval_seqlen),
           "--device", args.device, "--json"]
    if args.max_windows:
        cmd += ["--max-windows", str(args.max_windows)]
    if reference is not None:
        cmd += ["--reference", reference]
    stdout, seconds = run(cmd, log)
    result = json.loads(stdout.strip().splitlines()[-1])
    result["eval_seconds"] = round(seconds, 1)
    return result


def shipped_calibration_file(workdir: Path) -> Path:
    """The package's calibration text (Pride and Prejudice, byte for byte the Project Gutenberg
    file; src/neuqi/data/README.md) as a file the commands can name, under its own name so the
    protocol (and the rows stored under it) stays the same."""
    from neuqi.data.calib import load_calibration_text

    path = workdir / "pride-and-prejudice.txt"
    text = load_calibration_text(None).encode("utf-8")
    if not path.is_file() or path.read_bytes() != text:
        path.write_bytes(text)
    return path


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model, "calib": Path(args.calib).name, "nsamples": args.nsamples,
        "seqlen": args.seqlen, "seed": args.seed, "data": Path(args.data).name,
        "eval_seqlen": args.eval_seqlen, "max_windows": args.max_windows,
    }


def load_results(path: Path, proto: dict[str, Any]) -> dict[str, Any]:
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("protocol") == proto:
            return stored
        print(f"{path}: made with another protocol ({stored.get('protocol')}); starting afresh")
    return {"protocol": proto, "rows": {}}


def save_results(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s"


def table(results: dict[str, Any], settings: list[str], methods: list[str]) -> str:
    rows = results["rows"]
    proto = results["protocol"]
    head = "| method | " + " | ".join(setting_label(s) for s in settings) + " |"
    lines = [head, "|---" * (len(settings) + 1) + "|"]
    if "fp" in rows:
        fp = f"{rows['fp']['perplexity']:.3f}"
        lines.append("| full precision (float32) | " + " | ".join([fp] * len(settings)) + " |")
    for method in methods:
        cells = []
        for s in settings:
            row = rows.get(f"{s}/{method}")
            kld = f", KLD {row['kld']:.4f}" if row and "kld" in row else ""
            cells.append(
                f"{row['perplexity']:.3f} ({minutes(row['quantize_seconds'])}{kld})" if row
                else "-"
            )
        if any(c != "-" for c in cells):
            lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    windows = proto["max_windows"] or "all"
    tokens = rows.get("fp", {}).get("tokens")
    notes = [
        "",
        f"Perplexity on {proto['data']} ({windows} windows of {proto['eval_seqlen']} tokens"
        + (f", {tokens} scored tokens" if tokens else "") + "), lower is better; in brackets the "
        f"wall time of `neuqi quantize`. Calibration: {proto['nsamples']} windows of "
        f"{proto['seqlen']} tokens of {proto['calib']} (seed {proto['seed']}), identical for "
        "every row."
        + (" KLD: the mean KL divergence of the next-token distributions to the full-precision "
           "model on the same tokens (`neuqi eval --reference`; rows measured with `--kld`)."
           if any("kld" in r for r in rows.values()) else ""),
    ]
    return "\n".join(lines + notes) + "\n"


def plot(results: dict[str, Any], settings: list[str], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = results["rows"]
    sizes = sorted({parse_setting(s)[1] for s in settings}, key=lambda g: (g == -1, g))
    kinds = [("per channel" if g == -1 else f"groups of {g}", lambda x, g=g: x == g)
             for g in sizes]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    for ax, (title, keep) in zip(axes[0], kinds):
        chosen = sorted((parse_setting(s)[0], s) for s in settings if keep(parse_setting(s)[1]))
        for method in methods:
            points = [(b, rows[f"{s}/{method}"]["perplexity"]) for b, s in chosen
                      if f"{s}/{method}" in rows]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        if "fp" in rows:
            ax.axhline(rows["fp"]["perplexity"], color="black", linestyle="--", linewidth=1,
                       label="full precision")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        low, high = ax.get_ylim()
        if high / low > 10:  # several decades: label the powers of ten only
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xticks([b for b, _ in chosen])
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("WikiText-2 perplexity (log scale)")
        ax.set_title(f"{MODEL_TITLES.get(results['protocol']['model'], results['protocol']['model'])}"
                     f", {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--settings", default="w2g64,w3g64,w4g64,w3c,w4c")
    parser.add_argument("--methods", default="minmax,neuqi-int,neuqi")
    parser.add_argument("--calib", default=None,
                        help="calibration text (default: the shipped Pride and Prejudice, written "
                        "to WORKDIR/pride-and-prejudice.txt)")
    parser.add_argument("--data", default=str(DATA / "wikitext2-test.raw"))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=16, help="0 = the whole text")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "quality")
    parser.add_argument("--force", action="store_true",
                        help="redo the rows of --settings x --methods already measured "
                             "(the fp row is kept)")
    parser.add_argument("--keep", action="store_true", help="keep the quantized outputs")
    parser.add_argument("--report", default="quality",
                        help="name of the table and plot written into --results (NAME.md, "
                             "NAME.png): one results file can hold several tables")
    parser.add_argument("--kld", action="store_true",
                        help="score the rows measured now with `neuqi eval --reference MODEL` "
                             "too: the KL divergence to the full-precision model and the "
                             "top-token agreement (about twice the evaluation time)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite quality.md and quality.png from the stored rows")
    args = parser.parse_args()

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for s in settings:
        parse_setting(s)
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods {m}: choose among {', '.join(METHODS)}")
    args.results.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.calib is None:
        args.calib = str(shipped_calibration_file(args.workdir))
    logs = args.workdir / "logs"
    logs.mkdir(exist_ok=True)
    store_path = args.results / "quality.json"
    results = load_results(store_path, protocol(args))
    results.setdefault("runs", [])
    results["runs"].append({
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "versions": VERSIONS,
    })

    def finish() -> None:
        save_results(store_path, results)
        (args.results / f"{args.report}.md").write_text(table(results, settings, methods))
        plot(results, settings, methods, args.results / f"{args.report}.png")

    rows = results["rows"]
    if args.report_only:
        results["runs"].pop()
        finish()
        print((args.results / f"{args.report}.md").read_text())
        return
    if "fp" not in rows:  # --force redoes the rows of --settings x --methods, not this one
        rows["fp"] = evaluate(args.model, args, logs / "fp-eval.log")
        print(f"full precision: perplexity {rows['fp']['perplexity']:.4f}", flush=True)
        finish()
    for setting in settings:
        bits, group = parse_setting(setting)
        for method in methods:
            key = f"{setting}/{method}"
            if key in rows and not args.force:
                continue
            name = f"{setting}-{method.replace('+', '-')}"
            out = args.workdir / name
            for stale in (out, out.with_name(out.name + ".job")):
                shutil.rmtree(stale, ignore_errors=True)
            flags = [f.format(steps=args.nsamples) for f in METHODS[method]]
            base = END_TO_END.get(method)
            kept = args.workdir / f"{setting}-{base}" if base else None
            if kept is not None and (kept / "neuqi.json").exists() and f"{setting}/{base}" in rows:
                # the same `neuqi quantize` command gives bitwise the same output: reuse the
                # kept one (--keep) and its measured time instead of quantizing again
                shutil.copytree(kept, out)
                seconds = rows[f"{setting}/{base}"]["quantize_seconds"]
            else:
                cmd = [*NEUQI, "quantize", args.model, "--out", str(out), "--bits", str(bits),
                       "--group-size", str(group), *flags, "--calib", str(args.calib),
                       "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed",
                       str(args.seed), "--device", args.device]
                _, seconds = run(cmd, logs / f"{name}-quantize.log")
            if method in END_TO_END:
                trained = out.with_name(out.name + "-e2e")
                shutil.rmtree(trained, ignore_errors=True)
                cmd = [*NEUQI, "distill", str(out), "--teacher", args.model, "--out",
                       str(trained), "--job", str(trained.with_name(trained.name + ".job")),
                       "--steps", str(args.nsamples), "--calib", str(args.calib), "--nsamples",
                       str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device]
                _, more = run(cmd, logs / f"{name}-distill.log")
                seconds += more
                for path in (out, out.with_name(out.name + ".job")):
                    shutil.rmtree(path, ignore_errors=True)
                out = trained
            row = evaluate(str(out), args, logs / f"{name}-eval.log",
                           reference=args.model if args.kld else None)
            row["quantize_seconds"] = round(seconds, 1)
            row["commit"] = COMMIT
            row["versions"] = VERSIONS
            rows[key] = row
            print(f"{key}: perplexity {row['perplexity']:.4f}, quantize {minutes(seconds)}",
                  flush=True)
            if not args.keep:
                for path in (out, out.with_name(out.name + ".job")):
                    shutil.rmtree(path, ignore_errors=True)
            finish()
    finish()
    print((args.results / f"{args.report}.md").read_text())


if __name__ == "__main__":
    main()
