"""The `neuqi` command line: parses options and calls the package's API, nothing else."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from neuqi.util.allocator import tune_allocator
from neuqi.util.errors import UserError


def example(command: str) -> str:
    """A command's --help ends with an example of it (typer prints the epilog last)."""
    return f"Example: {command}"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"neuqi {version('neuqi')}")
        raise typer.Exit()


app = typer.Typer(
    name="neuqi",
    help="Quantize LLMs to 2/3/4 bits with NeUQI, one decoder layer at a time, resumably.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Quantize LLMs to 2/3/4 bits with NeUQI, one decoder layer at a time, resumably."""


# soft_wrap: a message is one line however narrow the terminal, and in a log file (where rich
# would otherwise wrap at 80 columns, mid-word)
err = Console(stderr=True, soft_wrap=True, highlight=False)


class Method(str, Enum):
    neuqi = "neuqi"
    neuqi_int = "neuqi-int"
    minmax = "minmax"
    minmax_lazy = "minmax-lazy"  # GPTQ's own Min-Max, only with --gptq


class GptqParams(str, Enum):
    lazy = "lazy"
    static = "static"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class SolverBackend(str, Enum):
    auto = "auto"
    numba = "numba"
    triton = "triton"
    reference = "reference"


class GPU(str, Enum):  # neuqi.pipeline.gpu_time.GPUS
    rtx3090 = "rtx3090"
    rtx4090 = "rtx4090"
    a100 = "a100"
    h100 = "h100"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class ExportFormat(str, Enum):
    compressed_tensors = "compressed-tensors"
    gguf = "gguf"
    gguf_q4_1 = "gguf-q4_1"
    gguf_q5_1 = "gguf-q5_1"
    gguf_q4_k = "gguf-q4_k"
    gguf_q5_k = "gguf-q5_k"
    gguf_q2_k = "gguf-q2_k"


LOG_JSON_HELP = ("Progress and messages on stderr as JSON lines (time, event, message, done, "
                 "total, elapsed_s, eta_s). Default: a live bar on a terminal, else one plain line "
                 "per layer and stage with elapsed time and ETA.")

KEEP_JOB_HELP = ("Keep the job store's intermediate arrays after a complete run (default: deleted "
                 "once the output is written; the options and completion records stay).")


# Options that several commands take, defined once so their help cannot drift apart.
CalibOption = Annotated[str | None, typer.Option(
    help="Calibration text: a .txt file or folder of them, a .jsonl/.json/.parquet file or a "
         "datasets save_to_disk folder (text in --calib-field), or hf:NAME[:CONFIG][:SPLIT] "
         "(streamed; default: the shipped text).")]
CalibFieldOption = Annotated[str, typer.Option(help="The text field of --calib's records.")]
StorageOptions = Annotated[str | None, typer.Option(
    help="A job store URL's fsspec options as JSON, e.g. '{\"endpoint_url\": "
         "\"http://HOST:9000\"}' (s3fs: key, secret, client_kwargs, ...). Credentials may also "
         "come from the environment (AWS_ACCESS_KEY_ID, ...) or ~/.aws; they are never printed "
         "or stored.")]


def _storage_options(text: str | None) -> dict[str, Any]:
    from neuqi.pipeline.location import parse_storage_options

    return parse_storage_options(text)


def _log(as_json: bool) -> Any:
    from neuqi.util.progress import Log

    return Log(err, "json" if as_json else "auto")


@app.command(epilog=example('neuqi quantize smollm2 --out out/smollm2-w4g64 --bits 4 --group-size 64 --nsamples 16 --seqlen 512'))
def quantize(
    model: Annotated[str, typer.Argument(
        help="Model folder (config.json + safetensors), a hub id, or a built-in real "
             "model: 'smollm2' (SmolLM2-135M-Instruct) or 'gemma3-270m' (Gemma 3 270M).")],
    out: Annotated[Path, typer.Option(help="Output folder for the quantized model.")],
    job: Annotated[str | None, typer.Option(
        help="Job store: a folder, or s3://BUCKET/PREFIX (see --storage-options) "
             "(intermediate results; default: <out>.job). Reusing it resumes.")
    ] = None,
    bits: Annotated[int, typer.Option(help="Bits per weight: 2, 3 or 4.")] = 4,
    group_size: Annotated[int, typer.Option(
        help="Input channels per group; -1 = one group per output channel.")] = 128,
    method: Annotated[Method, typer.Option(help="How scales and zero-points are chosen.")] = (
        Method.neuqi),
    calib: CalibOption = None,
    calib_field: CalibFieldOption = "text",
    nsamples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed of the calibration window choice.")] = 0,
    device: Annotated[Device, typer.Option(help="Where to compute.")] = Device.auto,
    sequential: Annotated[bool, typer.Option(
        "--sequential/--no-sequential",
        help="Calibrate each layer on the quantized previous layers' outputs (default) or on "
             "full-precision ones.")] = True,
    dtype: Annotated[DType, typer.Option(help="Compute and activation dtype.")] = DType.float32,
    batch_size: Annotated[int, typer.Option(help="Calibration windows per forward batch.")] = 8,
    gptq: Annotated[bool, typer.Option(
        "--gptq/--no-gptq",
        help="GPTQ (LDLQ) error compensation on top of --method's scales and zero-points "
             "(needs the full input Hessians in the job store). --method minmax-lazy is the "
             "original GPTQ's per-group Min-Max.")] = False,
    act_order: Annotated[bool, typer.Option(
        "--act-order/--no-act-order",
        help="GPTQ: quantize columns by decreasing Hessian diagonal.")] = True,
    gptq_block_size: Annotated[int, typer.Option(
        help="GPTQ: columns per lazy batch update.")] = 128,
    gptq_params: Annotated[GptqParams | None, typer.Option(
        help="GPTQ: solve each group's scale and zero-point when GPTQ reaches the group, from "
             "the weights as compensated so far (lazy, as GPTQ's authors do), or once from the "
             "original weights (static). Default: see the README's Methods.")] = None,
    gptq_refit: Annotated[bool | None, typer.Option(
        "--gptq-refit/--no-gptq-refit",
        help="GPTQ: then keep, row by row, the better (by output error on the calibration "
             "Hessian) of that and GPTQ's lazy Min-Max, and re-solve the row's scales and "
             "zero-points by least squares with its codes fixed. Default: see the README.")] = None,
    scheduler: Annotated[str | None, typer.Option(
        help="Run the tasks on dask: local[:N] starts N worker processes here, tcp://HOST:PORT "
             "joins a running cluster (workers must see the job store and the model under the "
             "same paths). Default: in this process. The result is the same.")] = None,
    distill_steps: Annotated[int, typer.Option(
        help="Block-wise distillation: training steps (one calibration window each) of every "
             "layer's scales and zero-points against the full-precision layer; 0 = off.")] = 0,
    distill_lr: Annotated[float, typer.Option(help="AdamW learning rate of --distill-steps.")] = (
        3e-4),
    distill_norms: Annotated[bool, typer.Option(
        "--distill-norms/--no-distill-norms",
        help="With --distill-steps, also train the RMSNorm weights.")] = False,
    solver_backend: Annotated[SolverBackend, typer.Option(
        help="Implementation of the NeUQI search: numba (compiled, CPU), triton (GPU kernel, "
             "CUDA), reference (pure torch, any device; the definition) or auto (numba on a CPU, "
             "triton on CUDA, when installed). The same scales and zero-points up to ties; the "
             "job records the one used.")] = (
        SolverBackend.auto),
    moe_calibration: Annotated[str, typer.Option(
        help="Mixture-of-experts models: each expert's Hessian from the tokens the router sends "
             "to it (routed) or from all tokens (all). An expert with fewer than 64 routed "
             "tokens uses the layer's all-token statistics.")] = "routed",
    format: Annotated[ExportFormat | None, typer.Option(
        help="Also export the result (see `neuqi export`); compressed-tensors solves with "
             "neuqi-int (integer zero-points).")] = None,
    export_out: Annotated[Path | None, typer.Option(
        help="Where --format writes (default: <out>-compressed-tensors, <out>.gguf or "
             "<out>-<type>.gguf).")
    ] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help=LOG_JSON_HELP)] = False,
    keep_job: Annotated[bool, typer.Option("--keep-job", help=KEEP_JOB_HELP)] = False,
    storage_options: StorageOptions = None,
    max_memory: Annotated[str | None, typer.Option(
        help="Memory budget, e.g. 20GiB: device memory (the host's with --device cpu). The "
             "pipeline holds what fits; a budget below what the job needs is refused. Default: "
             "90% of what is free, at least 1 GiB left. See `neuqi plan`.")] = None,
) -> None:
    """Quantize MODEL into --out. Run the same command again to resume a stopped job."""
    if format is ExportFormat.compressed_tensors and method is Method.neuqi:
        err.print("--format compressed-tensors stores integer zero-points: solving with neuqi-int")
        method = Method.neuqi_int
    if format is not None and format.value.startswith("gguf"):
        _check_gguf_family(model)  # before the job, not after hours of solving
    from neuqi.data.calib import stored_source
    from neuqi.pipeline.config import QuantizeConfig
    from neuqi.pipeline.runner import quantize as run
    from neuqi.quant.gptq import GPTQ_PARAMS_DEFAULT, GPTQ_REFIT_DEFAULT

    # paths are stored absolute in the job's manifest, so `neuqi resume` works from anywhere
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    config = QuantizeConfig(
        model=model, out=str(out.expanduser().resolve()), bits=bits, group_size=group_size, method=method.value,
        calib=stored_source(calib), calib_field=calib_field, nsamples=nsamples,
        seqlen=seqlen, seed=seed,
        sequential=sequential, dtype=dtype.value, batch_size=batch_size,
        gptq=gptq, act_order=act_order, gptq_block_size=gptq_block_size,
        gptq_params=gptq_params.value if gptq_params else GPTQ_PARAMS_DEFAULT,
        gptq_refit=GPTQ_REFIT_DEFAULT if gptq_refit is None else gptq_refit,
        distill_steps=distill_steps, distill_lr=distill_lr, distill_norms=distill_norms,
        solver_backend=solver_backend.value, moe_calibration=moe_calibration,
        max_memory=_size(max_memory),
    )
    result = run(config, job, device.value, _log(log_json), scheduler, keep_job,
                 _storage_options(storage_options))
    if format is not None:
        suffix = {"compressed-tensors": "-compressed-tensors", "gguf": ".gguf"}.get(
            format.value, f"-{format.value.removeprefix('gguf-')}.gguf")
        _export(result, format, export_out or result.with_name(result.name + suffix), None,
                "cpu" if device is Device.auto else device.value)
        return
    typer.echo(str(result))


def _check_gguf_family(model: str) -> None:
    """One-line refusal of --format gguf* for a model whose family has no GGUF layout, whose
    config llama.cpp would run differently, or whose tokenizer the writer cannot write: a local
    folder's config.json and tokenizer.json, or a hub id's (fetched alone, or from the local hub
    cache offline); when neither can be read, the quantize run reports that itself."""
    import json

    config = Path(model).expanduser() / "config.json"
    if not config.is_file() and not Path(model).expanduser().exists() and model.count("/") == 1:
        try:
            from huggingface_hub import hf_hub_download

            config = Path(hf_hub_download(model, "config.json"))
        except Exception:  # noqa: BLE001 - offline, unknown repo, gated: quantize says which
            return
    if config.is_file():
        from neuqi.formats.export.gguf import check_tokenizer
        from neuqi.formats.export.gguf_layout import check_family

        try:
            values = json.loads(config.read_text(encoding="utf-8"))
            values.get("model_type")
        except (ValueError, UnicodeDecodeError, AttributeError):
            return  # the quantize run reports a bad config.json itself
        check_family(values, config)
        tokenizer = config.parent / "tokenizer.json"
        if not tokenizer.is_file() and model.count("/") == 1:
            try:
                from huggingface_hub import hf_hub_download

                tokenizer = Path(hf_hub_download(model, "tokenizer.json"))
            except Exception:  # noqa: BLE001 - offline, none: the quantize run says so
                return
            with contextlib.suppress(Exception):  # a SentencePiece tokenizer's scores, if any
                hf_hub_download(model, "tokenizer.model")
        check_tokenizer(tokenizer.parent, missing_ok=True)


def _size(text: str | None) -> int | None:
    from neuqi.pipeline.plan import parse_size

    return None if text is None else parse_size(text)


@app.command(epilog=example('neuqi plan MODEL --device cuda --gpu rtx4090 --max-memory 20GiB --gptq'))
def plan(
    model: Annotated[str, typer.Argument(
        help="Model folder (config.json + safetensors) or a hub id (its config and headers are "
             "read online); no weights are read.")],
    bits: Annotated[int, typer.Option(help="Bits per weight (2..8).")] = 4,
    group_size: Annotated[int, typer.Option(
        help="Input channels per group; -1 = one group per output channel.")] = 128,
    method: Annotated[Method, typer.Option(help="How scales and zero-points are chosen.")] = (
        Method.neuqi),
    nsamples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 2048,
    device: Annotated[Device, typer.Option(help="Where the job would compute.")] = Device.auto,
    sequential: Annotated[bool, typer.Option("--sequential/--no-sequential")] = True,
    dtype: Annotated[DType, typer.Option(help="Compute and activation dtype.")] = DType.float32,
    batch_size: Annotated[int, typer.Option(help="Calibration windows per forward batch.")] = 8,
    gptq: Annotated[bool, typer.Option("--gptq/--no-gptq")] = False,
    distill_steps: Annotated[int, typer.Option(help="As for quantize.")] = 0,
    max_memory: Annotated[str | None, typer.Option(
        help="Memory budget, e.g. 20GiB (default: as quantize's, from this machine).")] = None,
    probe: Annotated[bool, typer.Option(
        "--probe/--no-probe", help="Estimate the time: on the CPU by timing this machine's "
        "solver and matmul (a few seconds), on CUDA from the GPU time model.")] = True,
    gpu: Annotated[GPU | None, typer.Option(
        help="With --device cuda: the GPU whose time model gives the time (default: the GPU "
             "detected here; its assumptions are printed).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """What quantizing MODEL needs: per stage peak device and host memory, job-store disk,
    output size, whether it fits the budget (exit 1 if not), and the time on this machine."""
    from neuqi.pipeline.config import QuantizeConfig
    from neuqi.pipeline.executor import resolve_device
    from neuqi.pipeline.plan import make_plan

    config = QuantizeConfig(
        model=model, out="-", bits=bits, group_size=group_size, method=method.value,
        nsamples=nsamples, seqlen=seqlen, sequential=sequential, dtype=dtype.value,
        batch_size=batch_size, gptq=gptq, distill_steps=distill_steps,
        max_memory=_size(max_memory),
    )
    import torch

    if device is Device.cuda and not torch.cuda.is_available():
        # planning for a GPU this machine lacks: the budget must be given; the probe runs here
        if max_memory is None:
            raise UserError("--device cuda: no CUDA device here; give --max-memory (e.g. 20GiB) "
                            "to plan for one")
        dev = "cuda"
    else:
        dev = str(resolve_device(device.value))
    result = make_plan(config, dev, with_probe=probe, gpu=gpu.value if gpu else None)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    from neuqi.pipeline.plan import fmt

    table = Table(title=f"plan: {model} on {dev}, budget {fmt(result.budget)}")
    for col in ("stage", "peak device", "peak host", "largest piece", "s / layer"):
        table.add_column(col, justify="left" if col in ("stage", "largest piece") else "right")
    for st in result.stages:
        piece, nbytes = max(st.pieces.items(), key=lambda kv: kv[1])
        table.add_row(st.name, fmt(st.device), fmt(st.host), f"{piece} {fmt(nbytes)}",
                      f"{st.seconds:.1f}" if result.probe else "-")
    console = Console()
    console.print(table)
    k = result.knobs
    console.print(f"held at once: {k.windows} window(s) per pass, MLP chunk "
                  f"{k.mlp_chunk or 'whole'}, {'one linear' if k.linear_at_a_time else 'the layer'}"
                  f" on the device, solver rows {k.solve_rows or 'all'}, GPTQ rows "
                  f"{k.gptq_rows or 'all'}", highlight=False)
    console.print(f"job store peak {fmt(result.disk_peak)} ("
                  + ", ".join(f"{n} {fmt(b)}" for n, b in result.disk_pieces.items()) + ")",
                  highlight=False)
    if result.store is not None:
        from neuqi.pipeline.plan import store_line

        console.print(store_line(result.store), soft_wrap=True, highlight=False, markup=False)
    console.print(f"smallest budget that works: {fmt(result.floor)} (largest unavoidable piece: "
                  f"{result.floor_piece})", highlight=False)
    console.print(result.summary(), soft_wrap=True, highlight=False, markup=False)
    if result.probe and "gpu" in result.probe:
        from neuqi.pipeline.gpu_time import gpu_assumptions

        console.print(gpu_assumptions(result.probe, config.dtype), soft_wrap=True,
                      highlight=False, markup=False)
    if not result.fits:
        raise typer.Exit(1)


@app.command(epilog=example('neuqi resume out/smollm2-w4g64.job'))
def resume(
    job: Annotated[str, typer.Argument(
        help="Job store of a stopped job: a folder or s3://BUCKET/PREFIX.")],
    device: Annotated[Device, typer.Option(help="Where to compute.")] = Device.auto,
    scheduler: Annotated[str | None, typer.Option(
        help="Run the tasks on dask: local[:N] starts N worker processes here, tcp://HOST:PORT "
             "joins a running cluster (workers must see the job store and the model under the "
             "same paths). Default: in this process. The result is the same.")] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help=LOG_JSON_HELP)] = False,
    keep_job: Annotated[bool, typer.Option("--keep-job", help=KEEP_JOB_HELP)] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Continue a stopped job with the options it was started with."""
    from neuqi.pipeline.runner import resume as run

    typer.echo(str(run(job, device.value, _log(log_json), scheduler, keep_job,
                       _storage_options(storage_options))))


@app.command(epilog=example('neuqi status out/smollm2-w4g64.job'))
def status(
    job: Annotated[str, typer.Argument(help="Job store: a folder or s3://BUCKET/PREFIX.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Show how far a job has got."""
    from neuqi.pipeline.jobinfo import job_status  # plain files only: answers at once

    info = job_status(job, _storage_options(storage_options))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    console = Console(soft_wrap=True, highlight=False)
    console.print(f"job {info['job']}", markup=False)
    table = Table()
    table.add_column("stage")
    table.add_column("done", justify="right")
    table.add_column("total", justify="right")
    peaks = info["device_peak_bytes"]  # measured on CUDA: to hold against `neuqi plan`
    if peaks:
        table.add_column("peak device", justify="right")
    for stage, counts in info["stages"].items():
        row = [stage, str(counts["done"]), str(counts["total"])]
        if peaks:
            row.append(f"{peaks[stage] / 2**30:.2f} GiB" if stage in peaks else "-")
        table.add_row(*row)
    table.add_row("all", str(info["done"]), str(info["total"]), *([""] if peaks else []))
    console.print(table)
    state = "complete" if info["complete"] else "incomplete"
    if info["lock"]:
        state += f", running as process {info['lock'].get('pid')}"
    console.print(f"model {info['model']} -> {info['out']}: {state}", markup=False)


@app.command(name="eval", epilog=example('neuqi eval out/smollm2-w4g64 --data data/wikitext2-test.raw --max-windows 8 --reference smollm2'))
def eval_(
    model: Annotated[str, typer.Argument(
        help="A quantized neuqi output folder, or a full-precision model: folder, hub id, or "
             "a built-in model ('smollm2', 'gemma3-270m').")],
    data: Annotated[Path, typer.Option(
        help="Evaluation text file (UTF-8), e.g. the WikiText-2 test split.")],
    seqlen: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 2048,
    max_windows: Annotated[int | None, typer.Option(
        help="Score only the first N windows (default: all).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward batch.")] = 4,
    device: Annotated[Device, typer.Option(help="Where to compute.")] = Device.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    reference: Annotated[str | None, typer.Option(
        help="Also stream this model (the full-precision one the output was quantized from) "
             "over the same windows and report the mean KL divergence of the next-token "
             "distributions and how often the top token agrees.")] = None,
) -> None:
    """Perplexity of a model or a quantized output, one decoder layer at a time."""
    from neuqi.evaluate import perplexity

    result = perplexity(model, data, seqlen, max_windows, batch_size, device.value, err,
                        reference=reference)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        if reference is not None:
            typer.echo(f"KL divergence: {result['kld']:.6f}")
            typer.echo(f"top-token agreement: {100 * result['top1_agreement']:.2f} %")
        typer.echo(f"perplexity: {result['perplexity']:.4f}")


def _export(output: Path, fmt: ExportFormat, out: Path, model: str | None, device: str) -> None:
    from neuqi.formats.export import export as run

    report = run(output, fmt.value, out.expanduser(), model, device,
                 lambda msg: err.print(msg, markup=False, highlight=False, soft_wrap=True))
    err.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
    err.print(report.sizes(), markup=False, highlight=False, soft_wrap=True)
    typer.echo(report.out)


@app.command(epilog=example('neuqi export out/smollm2-w4g64 --format gguf --out out/smollm2-w4g64.gguf'))
def export(
    output: Annotated[Path, typer.Argument(help="A quantized neuqi output folder.")],
    format: Annotated[ExportFormat, typer.Option(
        help="Target: compressed-tensors (folder for transformers/vLLM), gguf-q4_1/q5_1/q4_k/"
             "q5_k/q2_k (llama.cpp file); gguf picks Q4_1 or Q5_1 from the output's bits.")],
    out: Annotated[Path, typer.Option(help="Exported folder (compressed-tensors) or .gguf file.")],
    model: Annotated[str | None, typer.Option(
        help="The model the output was quantized from (default: the source in neuqi.json); "
             "needed for the loss report and for formats that re-solve.")] = None,
    device: Annotated[Device, typer.Option(help="Where to compute re-solves.")] = Device.cpu,
) -> None:
    """Export OUTPUT to an inference engine's format; prints the weighted loss it adds."""
    _export(output, format, out, model, device.value)


@app.command(epilog=example('neuqi distill out/smollm2-w4g64 --teacher smollm2 --steps 16 --nsamples 16 --seqlen 512'))
def distill(
    output: Annotated[Path, typer.Argument(help="A quantized neuqi output folder.")],
    teacher: Annotated[str, typer.Option(
        help="The full-precision model OUTPUT was quantized from (folder, hub id, 'smollm2' or "
             "'gemma3-270m').")],
    out: Annotated[Path | None, typer.Option(
        help="Folder for the distilled output (default: <OUTPUT>-distilled).")] = None,
    job: Annotated[Path | None, typer.Option(
        help="Job store folder (teacher states, training state; default: <out>.job). Reusing "
             "it resumes from the last saved step.")] = None,
    steps: Annotated[int, typer.Option(help="Training steps (one calibration window each).")] = (
        256),
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = 3e-4,
    norms: Annotated[bool, typer.Option(
        "--norms/--no-norms", help="Also train the RMSNorm weights.")] = False,
    calib: CalibOption = None,
    calib_field: CalibFieldOption = "text",
    nsamples: Annotated[int, typer.Option(help="Calibration windows.")] = 256,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed of the windows and of their order.")] = 0,
    save_every: Annotated[int, typer.Option(help="Save the training state every N steps.")] = 50,
    batch_size: Annotated[int, typer.Option(
        help="Windows per forward batch of the teacher pass.")] = 8,
    device: Annotated[Device, typer.Option(help="Where to compute.")] = Device.auto,
) -> None:
    """End-to-end distillation of OUTPUT's scales and zero-points (codes frozen) against the
    teacher's final hidden states. Run the same command again to resume."""
    from neuqi.data.calib import stored_source
    from neuqi.pipeline.distill_e2e import distill_output

    if Path(teacher).expanduser().exists():
        teacher = str(Path(teacher).expanduser().resolve())
    result = distill_output(
        output, teacher, out.expanduser().resolve() if out else None, job, steps=steps, lr=lr,
        norms=norms, calib=stored_source(calib), calib_field=calib_field, nsamples=nsamples,
        seqlen=seqlen, seed=seed, save_every=save_every, batch_size=batch_size,
        device=device.value, console=err,
    )
    typer.echo(str(result))


def main() -> None:
    """Console entry point: one line on stderr and exit 2 for bad input, 1 for a bug."""
    tune_allocator()
    try:
        app()  # handles usage errors (exit 2) and exits with the command's code
    except UserError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as e:
        if os.environ.get("NEUQI_DEBUG"):
            raise
        err.print(
            f"internal error: {type(e).__name__}: {e} (please report it with the command; "
            "NEUQI_DEBUG=1 shows the traceback)", markup=False, highlight=False, soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
