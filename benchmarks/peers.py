"""The peers table: SmolLM2-135M quantized by NeUQI and by the tools a user would otherwise pick.

    python benchmarks/peers.py [--settings w2g64,w3g64,w4g64] [--peers autoround,gptq,hqq]
        [--neuqi-methods neuqi,neuqi+gptq] [--autoround-recipe default|light] [--iters N]
        [--peers-python PYTHON]
        [--calib out/wikitext2-heldout.txt] [--nsamples 16] [--seqlen 512] [--seed 0]
        [--data data/wikitext2-test.raw] [--eval-seqlen 2048] [--max-windows 8]
        [--results benchmarks/results] [--workdir out/peers] [--timeout 0]
        [--force] [--keep] [--report-only]

Rows, each at w2g64, w3g64 and w4g64 (asymmetric integer weights, groups of 64 input channels):

- ``neuqi``, ``neuqi+gptq`` (``--neuqi-methods``): the real command line in a fresh process, as
  benchmarks/quality.py runs it: ``neuqi quantize smollm2 --out OUT --bits B --group-size 64
  --method neuqi [--gptq] --calib FILE --nsamples 16 --seqlen 512 --seed 0 --device cpu``.
- ``autoround``: AutoRound (package ``auto-round``, SignRound) with its defaults (iters 200,
  batch 8, its learning rate, bf16 autocast and ``torch.compile`` on the CPU, and so on) but our
  calibration windows and ``sym=False``; ``--autoround-recipe light`` takes AutoRound's own light
  recipe instead (iters 50, lr 5e-3: what its ``auto-round-light`` command runs), and ``--iters``
  changes the tuning steps (both stored with the row). It is by far the slowest row on a CPU:
  about 160 s a decoder block at iters 200 on one busy core (SmolLM2 has 30), so tens of minutes
  for each setting.
- ``gptq``: GPTQ from llm-compressor (``oneshot`` with a ``GPTQModifier``: its defaults of block
  size, dampening and activation order) on every Linear but lm_head.
- ``hqq``: HQQ (package ``hqq``, calibration-free) with its defaults (``BaseQuantizeConfig``:
  optimize on, float zero and scale) on every decoder linear.

Every row sees the same calibration windows: benchmarks/peers.py cuts them once with the project's
own sampler (``neuqi.data.calib.calibration_windows``: ``--calib`` text tokenized once, ``--nsamples``
windows of ``--seqlen`` tokens at starts drawn with ``--seed``, exactly as ``neuqi quantize`` does)
and writes them to ``WORKDIR/calib-windows.safetensors`` (int64 ``[nsamples, seqlen]``). The
peers get those token ids (benchmarks/peers_run.py): AutoRound as its ``dataset``, a list of
``{"input_ids": [1, seqlen], "attention_mask": ones}`` samples; llm-compressor as a tokenized
``datasets.Dataset`` with ``input_ids`` and ``attention_mask`` columns (not tokenized again, not
shuffled); HQQ uses none. The default ``--calib`` is in domain: the part of WikiText-2 test that
is never scored (``python benchmarks/heldout_text.py`` writes out/wikitext2-heldout.txt).

Every row is scored by this project's evaluator on the dequantized weights: each peer writes a
plain float32 safetensors checkpoint (config, tokenizer, every tensor of the float checkpoint, the
quantized linears as the tool's quantize-dequantized weights), which this script checks really is
quantized (every group of 64 of every decoder linear holds at most 2^bits distinct values, or the
row gets that one-line error) before ``neuqi eval DIR --data data/wikitext2-test.raw --seqlen 2048
--max-windows 8 --device cpu --json`` in this (the project's) Python, the command quality.py uses,
so the numbers compare with the quality table's. The full-precision row is ``neuqi eval smollm2``.

The peers load the float checkpoint in float32 (the evaluator's precision) and quantize every
decoder linear (lm_head, tied to the embedding, stays in float, as in NeUQI's rows).

The time of a row is the wall time of the tool's quantize call (``AutoRound(...).quantize()``,
``oneshot(...)``, ``AutoHQQHFModel.quantize_model(...)``; not loading or saving the model) and
for NeUQI that of the whole ``neuqi quantize`` process. A peer that cannot run here (CPU only, a
missing kernel, bits it does not support, ``--timeout`` seconds passed) gets its error, in one line,
in the table's cell; its log is in WORKDIR/logs.

The peers run in their own virtual environment (their pins fight the project's: llm-compressor
0.14 wants transformers <= 5.17 and auto-round <= 0.15.1), given by ``--peers-python`` or the
``NEUQI_PEERS_PYTHON`` environment variable. Create it with (CPU-only torch; versions proven on
2026-12-06, also the ``peers`` extra of pyproject.toml)::

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.13.0   # the CPU build where the index serves it
    DISABLE_CUDA=1 /work/peers-venv/bin/pip install llmcompressor==0.14.0.1 \\
        auto-round==0.15.1 hqq==0.2.8.post1        # hqq builds no CUDA kernel with DISABLE_CUDA=1
    export NEUQI_PEERS_PYTHON=/work/peers-venv/bin/python

Results accumulate in ``<results>/peers.json`` keyed ``SETTING/ROW`` (perplexity, times, the
tool's version and settings, the date and the commit) under the protocol (calibration and
evaluation options) they were made with: a rerun skips rows already measured (``--force`` redoes
them; a row that failed is tried again; an AutoRound row made with other iters or learning rate
is redone).
Each run rewrites ``peers.md`` (the table) from the stored rows; ``--report-only`` only does that.
Threads: every process uses torch's default (all cores); pin a run with ``taskset`` if needed.

Cost, measured on the 2-core development machine with one thread while other jobs ran
(2026-12-06): HQQ 16-30 s a setting; GPTQ 2 min (w4g64, 16 windows); AutoRound 160 s a decoder
block at iters 200 after a first block of 250 s (``torch.compile``), so about 80 min a setting;
its light recipe (iters 50) 32-40 min a setting at load 4-5 (2026-12-06);
NeUQI and each evaluation as in the quality table. A check of the pipe: AutoRound with
``--iters 2`` keeps its round-to-nearest start, and the evaluator scores it 25.385 at w4g64,
the quality table's ``minmax`` figure.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # the repository's copy of the evaluation text (data/README.md)
NEUQI = [sys.executable, "-c", "from neuqi.cli import main; main()"]
RUNNER = Path(__file__).resolve().with_name("peers_run.py")
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=ROOT, check=False).stdout.strip() or "unknown"
SETTING = re.compile(r"^w([2-8])g(\d+)$")

NEUQI_METHODS: dict[str, list[str]] = {
    "neuqi": ["--method", "neuqi"],
    "neuqi+gptq": ["--method", "neuqi", "--gptq", "--gptq-params", "static",
                   "--no-gptq-refit"],  # what the stored rows are: NeUQI's static recipe
    "neuqi-lazy+gptq+refit": ["--method", "neuqi", "--gptq", "--gptq-params", "lazy",
                              "--gptq-refit"],  # neuqi+gptq's default after issue 34
    "neuqi-int": ["--method", "neuqi-int"],
    "minmax": ["--method", "minmax"],
    "minmax+gptq": ["--method", "minmax", "--gptq", "--gptq-params", "static",
                    "--no-gptq-refit"],
}
# peer row -> the package that provides it (as benchmarks/peers_run.py's PACKAGES)
PACKAGES = {"autoround": "auto-round", "gptq": "llmcompressor", "hqq": "hqq"}
# peer row -> its name in the table
PEERS = {
    "autoround": "AutoRound",
    "gptq": "GPTQ, llm-compressor",
    "hqq": "HQQ",
}
# AutoRound's own recipes (auto_round.cli RECIPES; `auto-round` / `auto-round-light`):
# name -> (iters, lr); lr None is AutoRound's default, 1 / iters.
AUTOROUND_RECIPES: dict[str, tuple[int, float | None]] = {"default": (200, None),
                                                          "light": (50, 5e-3)}


def recipe_name(iters: int, lr: float | None) -> str:
    """``"light recipe: "`` when (iters, lr) is one of AutoRound's own recipes but the default."""
    for name, made in AUTOROUND_RECIPES.items():
        if made == (iters, lr) and name != "default":
            return f"{name} recipe: "
    return ""


def usage_error(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit 2."""
    print(f"peers.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_setting(text: str) -> tuple[int, int]:
    match = SETTING.match(text)
    if not match:
        usage_error(f"--settings {text}: use wBgG (B bits, groups of G input channels)")
    return int(match.group(1)), int(match.group(2))


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None,
        timeout: float | None = None) -> tuple[int, str, str, float]:
    """Run ``cmd`` from the repository root: its exit status (124 on ``timeout``), stdout,
    stderr and wall time; all of it kept in ``log``."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT,
                              env=env, timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        def text(b: Any) -> str:
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        rc, out, err = 124, text(exc.stdout), text(exc.stderr)
    seconds = time.perf_counter() - start
    log.write_text(f"$ {' '.join(cmd)}\n{out}\n{err}")
    return rc, out, err, seconds


def failure(rc: int, err: str, log: Path, timeout: float | None) -> str:
    """One line for a failed command: a peer's own ``peer error:`` line, a neuqi one-line
    error, or the exit status."""
    if rc == 124 and timeout:
        return f"timed out after {timeout:.0f} s (--timeout)"
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("peer error:"):
            return one_line(line.removeprefix("peer error:"))
    last = lines[-1] if lines else ""
    return one_line(f"exit {rc}: {last}" if last else f"exit {rc}, see {log.name}")


def evaluate(model: str, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    cmd = [*NEUQI, "eval", model, "--data", str(args.data), "--seqlen", str(args.eval_seqlen),
           "--device", "cpu", "--json"]
    if args.max_windows:
        cmd += ["--max-windows", str(args.max_windows)]
    rc, out, err, seconds = run(cmd, log)
    if rc != 0:
        raise SystemExit(f"evaluation failed ({rc}), see {log}:\n{err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["eval_seconds"] = round(seconds, 1)
    return result


def write_windows(model_dir: Path, args: argparse.Namespace) -> tuple[Path, str]:
    """The calibration windows every row uses, cut by the project's sampler, as
    ``WORKDIR/calib-windows.safetensors``; returns the file and the windows' SHA-256."""
    from safetensors.torch import save_file

    from neuqi.data.calib import calibration_windows, load_calibration_text
    from neuqi.model.checkpoint import load_tokenizer

    text = load_calibration_text(args.calib)
    windows = calibration_windows(load_tokenizer(model_dir), text, args.nsamples, args.seqlen,
                                  args.seed).contiguous()
    path = args.workdir / "calib-windows.safetensors"
    save_file({"input_ids": windows}, str(path))
    return path, hashlib.sha256(windows.numpy().tobytes()).hexdigest()


def check_quantized(out: Path, source: Path, bits: int, group: int) -> str | None:
    """None if ``out`` holds the float checkpoint ``source``'s tensors (same names and shapes)
    with every decoder linear quantize-dequantized: at most ``2**bits`` distinct values in every
    group of ``group`` input channels, and not the original weight. Else the one-line reason."""
    import torch
    from safetensors import safe_open

    from neuqi.model.architectures import arch_for

    config = json.loads((source / "config.json").read_text())
    arch = arch_for(config)
    linears = {f"{arch.layer_prefix(i)}{name}.weight"
               for i in range(int(config["num_hidden_layers"])) for name in arch.linears_of(i)}
    path = out / "model.safetensors"
    if not path.is_file():
        return f"{path} was not written"
    with safe_open(str(source / "model.safetensors"), "pt") as src, \
            safe_open(str(path), "pt") as got:
        want = set(src.keys())
        have = set(got.keys())
        if want != have:
            odd = sorted(want ^ have)
            return f"output tensors differ from the checkpoint's ({len(odd)}, e.g. {odd[0]})"
        for name in sorted(linears):
            weight = got.get_tensor(name)
            if tuple(weight.shape) != tuple(src.get_slice(name).get_shape()):
                return f"{name} has shape {tuple(weight.shape)}, not the checkpoint's"
            rows, cols = weight.shape
            if cols % group:
                return f"{name}: {cols} input channels, not a multiple of the group size {group}"
            groups = weight.float().reshape(rows, cols // group, group).sort(dim=-1).values
            distinct = int(((groups[..., 1:] != groups[..., :-1]).sum(-1) + 1).max())
            if distinct > 2**bits:
                return (f"not quantized: {name} has a group of {group} with {distinct} distinct "
                        f"values, more than 2^{bits}")
            if torch.equal(weight.float(), src.get_tensor(name).float()):
                return f"not quantized: {name} is the original weight"
    return None


def peer_python(args: argparse.Namespace) -> str:
    python = args.peers_python or os.environ.get("NEUQI_PEERS_PYTHON")
    if not python:
        usage_error(
            "the peers need their own virtual environment: python3 -m venv /work/peers-venv; "
            "/work/peers-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 "
            "auto-round==0.15.1 hqq==0.2.8.post1 (the docstring says more); then pass "
            "--peers-python /work/peers-venv/bin/python or set NEUQI_PEERS_PYTHON (or --peers '' "
            "for the NeUQI rows alone)")
    if not Path(python).exists():
        usage_error(f"--peers-python {python}: no such file")
    return python


def peer_versions(python: str) -> dict[str, str]:
    """The peer packages' versions in the peers' environment ("not installed" for a missing
    one), asked once so that a failed row still names the version that failed."""
    code = ("import importlib.metadata as m, json\n"
            "def v(n):\n"
            "    try:\n        return m.version(n)\n"
            "    except m.PackageNotFoundError:\n        return 'not installed'\n"
            f"print(json.dumps({{n: v(n) for n in {sorted(set(PACKAGES.values()))!r}}}))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        last = lines[-1] if lines else f"exit {proc.returncode}"
        usage_error(f"--peers-python {python} does not run: {one_line(last)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def protocol(args: argparse.Namespace, windows_sha: str | None) -> dict[str, Any]:
    proto = {
        "model": args.model, "calib": Path(args.calib).name, "nsamples": args.nsamples,
        "seqlen": args.seqlen, "seed": args.seed, "data": Path(args.data).name,
        "eval_seqlen": args.eval_seqlen, "max_windows": args.max_windows,
    }
    if windows_sha:
        proto["windows_sha256"] = windows_sha
    return proto


def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"protocol": None, "rows": {}, "runs": []}


def save_results(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s"


def row_label(row_name: str, rows: list[dict[str, Any]]) -> str:
    if row_name in NEUQI_METHODS:
        return f"NeUQI `{row_name}`"
    label = PEERS.get(row_name, row_name)
    versions = sorted({r["version"] for r in rows if r.get("version")})
    if versions:
        label += f" {', '.join(versions)}"
    notes = {"hqq": ["calibration-free"]}.get(row_name, [])
    if row_name == "autoround":
        made = sorted({(r["settings"]["iters"], r["settings"].get("lr")) for r in rows
                       if r.get("settings")}, key=str)
        notes += [f"{recipe_name(i, lr)}iters {i}" + (f", lr {lr:g}" if lr is not None else "")
                  for i, lr in made]
    return label + (f" ({'; '.join(notes)})" if notes else "")


def table(results: dict[str, Any]) -> str:
    rows = results["rows"]
    proto = results["protocol"] or {}
    settings = sorted({k.split("/")[0] for k in rows if "/" in k},
                      key=lambda s: parse_setting(s))
    names = list(dict.fromkeys(k.split("/", 1)[1] for k in rows if "/" in k))
    order = [*NEUQI_METHODS, *PEERS]
    names.sort(key=lambda n: order.index(n) if n in order else len(order))
    best = {}
    for s in settings:
        scored = [rows[f"{s}/{n}"]["perplexity"] for n in names
                  if "perplexity" in rows.get(f"{s}/{n}", {})]
        best[s] = min(scored) if scored else None
    head = "| tool / method | " + " | ".join(f"w{b} g{g}" for b, g in map(parse_setting, settings))
    lines = [head + " |", "|---" * (len(settings) + 1) + "|"]
    if "fp" in rows:
        fp = f"{rows['fp']['perplexity']:.3f}"
        lines.append("| full precision (float32) | " + " | ".join([fp] * len(settings)) + " |")
    for name in names:
        cells = []
        for s in settings:
            row = rows.get(f"{s}/{name}")
            if row is None:
                cells.append("-")
            elif "error" in row:
                # the whole line is in peers.json and the log
                cells.append("error: " + one_line(row["error"], 120).replace("|", "/"))
            else:
                cell = f"{row['perplexity']:.3f} ({minutes(row['quantize_seconds'])})"
                cells.append(f"**{cell}**" if row["perplexity"] == best[s] else cell)
        label = row_label(name, [r for k, r in rows.items() if k.endswith(f"/{name}")])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    windows = proto.get("max_windows") or "all"
    tokens = rows.get("fp", {}).get("tokens")
    dates = sorted({r["date"] for r in rows.values() if r.get("date")})
    commits = sorted({r["commit"] for r in rows.values() if r.get("commit")})
    notes = [
        "",
        f"Perplexity on {proto.get('data')} ({windows} windows of {proto.get('eval_seqlen')} "
        "tokens" + (f", {tokens} scored tokens" if tokens else "") + ") by this project's "
        "evaluator (`neuqi eval`) on the dequantized weights, lower is better, the best of each "
        "column in bold; in brackets the wall time of the quantization (the peer's quantize "
        "call; for NeUQI the `neuqi quantize` process). Asymmetric integer weights in groups of "
        f"the size shown. Calibration: the same {proto.get('nsamples')} windows of "
        f"{proto.get('seqlen')} tokens of {proto.get('calib')} (seed {proto.get('seed')}, "
        "`neuqi.data.calib.calibration_windows`) for every row; HQQ uses none. Made by "
        "`python benchmarks/peers.py`"
        + (f" on {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "") if dates else "")
        + (f" at commit {', '.join(commits)}" if commits else "") + ".",
    ]
    return "\n".join(lines + notes) + "\n"


def stale(row: dict[str, Any] | None, name: str, args: argparse.Namespace) -> bool:
    """Whether the stored ``row`` must be measured (again)."""
    if row is None or "error" in row or args.force:
        return True
    settings = row.get("settings", {})
    return name == "autoround" and (settings.get("iters"), settings.get("lr")) != (args.iters,
                                                                                   args.lr)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="See the module docstring (benchmarks/peers.py) for the protocol and for how to "
               "create the peers' virtual environment.")
    parser.add_argument("--model", default="smollm2",
                        help="float model: 'smollm2' (the demo model) or a local folder")
    parser.add_argument("--settings", default="w2g64,w3g64,w4g64")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"peer rows, among {', '.join(PEERS)} ('' for none)")
    parser.add_argument("--neuqi-methods", default="neuqi,neuqi+gptq",
                        help=f"NeUQI rows, among {', '.join(NEUQI_METHODS)} ('' for none)")
    parser.add_argument("--autoround-recipe", choices=sorted(AUTOROUND_RECIPES),
                        default="default",
                        help="AutoRound's own recipe: default (iters 200, its learning rate) or "
                             "light (iters 50, lr 5e-3, the `auto-round-light` command)")
    parser.add_argument("--iters", type=int, default=None,
                        help="AutoRound's tuning steps (default: the recipe's)")
    parser.add_argument("--peers-python", default=None,
                        help="python of the peers' virtual environment (default: "
                             "$NEUQI_PEERS_PYTHON)")
    parser.add_argument("--calib", default=str(ROOT / "out" / "wikitext2-heldout.txt"),
                        help="calibration text (default: out/wikitext2-heldout.txt, written by "
                             "benchmarks/heldout_text.py)")
    parser.add_argument("--data", default=str(DATA / "wikitext2-test.raw"))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=8, help="0 = the whole text")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "peers")
    parser.add_argument("--timeout", type=float, default=0,
                        help="seconds one quantization may take (0: no limit)")
    parser.add_argument("--force", action="store_true",
                        help="redo the rows of --settings already measured (the fp row is kept)")
    parser.add_argument("--keep", action="store_true", help="keep the quantized outputs")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite peers.md from peers.json")
    args = parser.parse_args()
    recipe_iters, args.lr = AUTOROUND_RECIPES[args.autoround_recipe]
    if args.iters is None:
        args.iters = recipe_iters

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    methods = [m.strip() for m in args.neuqi_methods.split(",") if m.strip()]
    for s in settings:
        parse_setting(s)
    for p in peers:
        if p not in PEERS:
            usage_error(f"--peers {p}: choose among {', '.join(PEERS)}")
    for m in methods:
        if m not in NEUQI_METHODS:
            usage_error(f"--neuqi-methods {m}: choose among {', '.join(NEUQI_METHODS)}")
    store_path = args.results / "peers.json"
    results = load_results(store_path)
    if args.report_only:
        if not store_path.exists():
            usage_error(f"--report-only: {store_path} does not exist yet")
        (args.results / "peers.md").write_text(table(results))
        print((args.results / "peers.md").read_text())
        return

    python = peer_python(args) if peers else None
    versions = peer_versions(python) if python else {}
    args.calib = str(Path(args.calib).resolve())
    if not Path(args.calib).is_file():
        usage_error(f"--calib {args.calib}: no such file (python benchmarks/heldout_text.py "
                         "writes the default)")
    from neuqi.model.checkpoint import resolve_model

    model_dir = resolve_model(args.model)
    args.results.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    logs = args.workdir / "logs"
    logs.mkdir(exist_ok=True)
    windows, windows_sha = write_windows(model_dir, args)
    proto = protocol(args, windows_sha)
    if results["protocol"] not in (None, proto):
        print(f"{store_path}: made with another protocol ({results['protocol']}); starting afresh")
        results = {"protocol": None, "rows": {}, "runs": []}
    results["protocol"] = proto
    results.setdefault("runs", []).append({
        "date": now(), "commit": COMMIT,
        "command": " ".join(["python", "benchmarks/peers.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "peer_versions": versions,
    })
    rows = results["rows"]

    def finish() -> None:
        save_results(store_path, results)
        (args.results / "peers.md").write_text(table(results))

    if "fp" not in rows:
        rows["fp"] = evaluate(args.model, args, logs / "fp-eval.log")
        rows["fp"].update(date=now(), commit=COMMIT)
        print(f"full precision: perplexity {rows['fp']['perplexity']:.4f}", flush=True)
        finish()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    timeout = args.timeout or None
    for setting in settings:
        bits, group = parse_setting(setting)
        for name in [*methods, *peers]:
            key = f"{setting}/{name}"
            if not stale(rows.get(key), name, args):
                continue
            tag = f"{setting}-{name.replace('+', '-')}"
            out = args.workdir / tag
            for old in (out, out.with_name(out.name + ".job")):
                shutil.rmtree(old, ignore_errors=True)
            log = logs / f"{tag}-quantize.log"
            row: dict[str, Any] = {"date": now(), "commit": COMMIT}
            if name in NEUQI_METHODS:
                from importlib.metadata import version

                cmd = [*NEUQI, "quantize", args.model, "--out", str(out), "--bits", str(bits),
                       "--group-size", str(group), *NEUQI_METHODS[name], "--calib",
                       str(args.calib), "--nsamples", str(args.nsamples), "--seqlen",
                       str(args.seqlen), "--seed", str(args.seed), "--device", "cpu"]
                rc, _, err, seconds = run(cmd, log, timeout=timeout)
                row.update(tool="neuqi", version=version("neuqi"),
                           settings={"command": " ".join(["neuqi", *cmd[3:]])})
                problem = None if rc == 0 else failure(rc, err, log, timeout)
            else:
                row.update(tool=name, version=versions[PACKAGES[name]])
                cmd = [python, str(RUNNER), "--tool", name, "--model", str(model_dir),
                       "--windows", str(windows), "--bits", str(bits), "--group-size",
                       str(group), "--iters", str(args.iters), "--out", str(out)]
                if args.lr is not None:
                    cmd += ["--lr", str(args.lr)]
                rc, _, err, seconds = run(cmd, log, env=env, timeout=timeout)
                problem = None if rc == 0 else failure(rc, err, log, timeout)
                if problem is None:
                    peer = json.loads((out / "peer.json").read_text())
                    row.update(tool=name, version=peer["version"], settings=peer["settings"],
                               threads=peer["threads"], peer_process_seconds=round(seconds, 1))
                    seconds = peer["quantize_seconds"]
                    problem = check_quantized(out, model_dir, bits, group)
            if problem is not None:
                row["error"] = problem
                print(f"{key}: error: {problem} (log: {log})", flush=True)
            else:
                row.update(evaluate(str(out), args, logs / f"{tag}-eval.log"))
                row["quantize_seconds"] = round(seconds, 1)
                print(f"{key}: perplexity {row['perplexity']:.4f}, quantize {minutes(seconds)}",
                      flush=True)
            rows[key] = row
            if not args.keep:
                for path in (out, out.with_name(out.name + ".job")):
                    shutil.rmtree(path, ignore_errors=True)
            finish()
    finish()
    print((args.results / "peers.md").read_text())


if __name__ == "__main__":
    main()
