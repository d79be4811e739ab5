"""What a quantization job needs, before it runs: memory per stage, disk, output size, time.

:func:`make_plan` reads only ``config.json`` and the safetensors headers (a local folder, or a hub
id's config and headers when online) and models every stage of the pipeline as the tensors it
holds at its peak, named, in bytes. From a memory budget (``--max-memory``: device memory, the
host's on ``--device cpu``) it chooses the pipeline's :class:`Knobs`, from the most memory to the
least, until every stage fits:

1. windows per forward pass (down from ``--batch-size`` to 1),
2. tokens per chunk of the MLP's intermediate activations (down to ``MIN_MLP_CHUNK``),
3. one linear at a time: the layer's linears stay in the checkpoint (on the host's page cache) and
   each is brought to the device when it runs, then dropped,
4. rows of a weight solved at once, and rows per GPTQ call (the full Hessian and its inverse
   factor are unavoidable: they are the floor of a GPTQ job).

A budget below the floor is refused before any work (:class:`~neuqi.util.errors.UserError`, exit 2),
naming the largest unavoidable piece and the smallest budget that works. The stages read the
chosen knobs from the job's options (``QuantizeConfig.memory_knobs``, set by the runner), so a
task on a dask worker holds what the plan said.

The byte model follows the code (which tensors exist at once); its constants were measured on a
CPU (``benchmarks/scale.py`` prints planned next to measured, ``tests/test_plan.py`` checks one).
The time is an estimate from a probe of this machine: a matmul for the forward passes, the solver
on one chunk of groups through :func:`neuqi.quant.solver.quantize_tensor` (whatever its default backend
is), and a small GPTQ call.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from neuqi.pipeline.gpu_time import detect_gpu, gpu_speed, torch_cuda
from neuqi.pipeline.shapes import ModelShape, read_shape
from neuqi.util.errors import UserError

GiB = 2**30
MIN_MLP_CHUNK = 256  # tokens
HEADROOM = 0.9  # the default budget: this share of the free device (or available host) memory
HEADROOM_BYTES = GiB  # ... and at least this much left free
# Measured on a CPU (benchmarks/scale.py, docs in the README):
PROCESS_BASE = GiB // 2  # host RSS of `neuqi quantize` before any tensor (imports, tokenizer)
# ... and more where triton is installed (every CUDA build of torch brings it; the `test` and `gpu`
# extras install it): torch 2.13 imports it at start, and its compiler library's pages raise the
# peak RSS of a small CPU job by about 80 MiB (measured: 654 against 572 MB).
TRITON_IMPORT = 96 * 2**20


def process_base() -> int:
    """:data:`PROCESS_BASE`, plus :data:`TRITON_IMPORT` when triton is installed here."""
    from importlib.util import find_spec

    return PROCESS_BASE + (TRITON_IMPORT if find_spec("triton") is not None else 0)
# glibc's heap top the process keeps for reuse (neuqi.util.allocator's TOP_PAD): RSS that small
# tensors (row blocks, chunks under 1 MiB) leave behind on the host
ALLOCATOR_PAD = 256 * 2**20
CUDA_CONTEXT = int(0.6 * GiB)  # the CUDA context, outside max_memory_allocated
ACT_HIDDEN = 6  # hidden-sized [tokens, hidden] tensors alive at a decoder layer's peak
ACT_MLP = 3  # intermediate-sized [tokens, chunk] tensors alive in its MLP
SOLVE_WEIGHT = 7  # float32 copies of the weight rows solve_tensor works on at once
SOLVER_WORKSET = int(0.8 * GiB)  # the NeUQI scale search's chunk of groups (not minmax)
GPTQ_HESSIAN = 2.5  # float32 [in, in] copies gptq_quantize holds besides the given Hessian
GPTQ_WEIGHT = 4  # float32 copies of the weight rows gptq_quantize holds
REFIT_ELEMENTS = 2**23  # neuqi.quant.gptq.REFIT_ELEMENTS: float64 of one --gptq-refit block (a test checks)
HOOK_ROWS_BYTES = 64 * 2**20  # the Hessian hook squares its input this many bytes at a time
SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
              "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_size(text: str) -> int:
    """``20GiB``, ``24GB``, ``500MiB``, ``1.5T``, or plain bytes; UserError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in SIZE_UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--max-memory {text}: give a size such as 20GiB, 24GB or 500MiB")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------- knobs and stages


@dataclass(frozen=True)
class Knobs:
    """What the pipeline holds at once, chosen to fit the budget (0 = all of it)."""

    windows: int  # calibration windows per forward pass (<= --batch-size)
    mlp_chunk: int  # tokens per chunk of the MLP's intermediate activations
    linear_at_a_time: bool  # the layer's linears brought to the device one at a time
    solve_rows: int  # weight rows per solver call
    gptq_rows: int  # weight rows per GPTQ call

    def encode(self) -> str:
        return (f"{self.windows},{self.mlp_chunk},{int(self.linear_at_a_time)},"
                f"{self.solve_rows},{self.gptq_rows}")

    @classmethod
    def decode(cls, text: str) -> Knobs:
        w, c, lin, s, g = (int(x) for x in text.split(","))
        return cls(w, c, bool(lin), s, g)


@dataclass
class Stage:
    name: str
    device: int  # peak bytes on the device (the host's on cpu), above the process baseline
    host: int  # peak host RSS (process included)
    pieces: dict[str, int]  # the named tensors of the device peak
    seconds: float = 0.0  # per layer (embed, pack: once)


@dataclass
class Plan:
    model: str
    options: dict[str, Any]
    device: str
    budget: int
    knobs: Knobs
    stages: list[Stage]
    disk_peak: int
    disk_pieces: dict[str, int]
    output_bytes: int
    layers: int
    fits: bool
    floor: int  # the smallest budget that works
    floor_piece: str  # the largest unavoidable piece
    probe: dict[str, float] | None
    seconds: float | None  # the whole job, estimated
    store: StoreCost | None = None  # the job store as objects (on an object store, its cost)

    @property
    def device_peak(self) -> int:
        return max(s.device for s in self.stages)

    @property
    def host_peak(self) -> int:
        return max(s.host for s in self.stages)

    def summary(self) -> str:
        k = self.knobs
        held = (f"{k.windows} window(s)/pass" + (f", MLP in {k.mlp_chunk}-token chunks"
                                                  if k.mlp_chunk else "")
                + (", one linear at a time" if k.linear_at_a_time else ""))
        eta = f", about {_hours(self.seconds)}" if self.seconds else ""
        verdict = "fits" if self.fits else "does NOT fit"
        return (f"plan: peak {fmt(self.device_peak)} on {self.device} of a {fmt(self.budget)} "
                f"budget ({verdict}; {held}), host {fmt(self.host_peak)}, job store "
                f"{fmt(self.disk_peak)}, output {fmt(self.output_bytes)}{eta}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(device_peak=self.device_peak, host_peak=self.host_peak, summary=self.summary())
        return out


def store_line(cost: StoreCost) -> str:
    """One line of the job store's objects and requests (``neuqi plan``'s output)."""
    r = cost.requests_per_layer
    return (f"job store objects: {cost.objects_written} written ({fmt(cost.bytes_written)}), "
            f"at most {cost.objects_peak} held ({fmt(cost.bytes_peak)}), {cost.objects_kept} "
            f"kept with --keep-job ({fmt(cost.bytes_kept)}); per layer about "
            + ", ".join(f"{n} {k}" for k, n in r.items()) + " requests")


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _stages(shape: ModelShape, opt: dict[str, Any], k: Knobs, cuda: bool) -> list[Stage]:
    """Every stage's peak under knobs ``k`` (bytes)."""
    f = DTYPE_BYTES[opt["dtype"]]
    sb = shape.weight_bytes
    s, h = opt["seqlen"], shape.hidden
    tokens = k.windows * s
    m_width = max(i for name, _, i in shape.linears)  # the widest input: the MLP's
    chunk = min(k.mlp_chunk or tokens, tokens)
    big_name, big_out, big_in = shape.largest
    big = big_out * big_in
    pages = 1 if cuda else 2  # a tensor read on the host: its copy and its mapped file pages
    if k.linear_at_a_time:
        weights = {"layer norms and biases": shape.layer_other_bytes * f // max(sb, 1),
                   f"one linear ({big_name}, {opt['dtype']})": big * f,
                   "its stored copy (and file pages) while read": pages * big * sb}
    else:
        weights = {f"decoder layer ({opt['dtype']})": shape.layer_params * f
                   + shape.layer_other_bytes * f // max(sb, 1),
                   "largest stored tensor (and its file pages) while read": pages * big * sb}
    acts = {"hidden-sized activations": ACT_HIDDEN * tokens * h * f,
            "MLP intermediate activations": ACT_MLP * chunk * m_width * f}
    hook = 2 * min(HOOK_ROWS_BYTES, tokens * m_width * 8)
    # host: the process, plus on cuda what passes through it (a tensor read, a batch)
    base = process_base() + ALLOCATOR_PAD

    def host(device: int, extra: int = 0) -> int:
        return base + (extra if cuda else device)

    stages = []
    embed = {"embedding": shape.vocab * h * f, "its stored copy": shape.vocab * h * 2,
             "a batch of embeddings": 2 * tokens * h * f}
    stages.append(Stage("embed", sum(embed.values()), host(sum(embed.values()),
                                                        shape.vocab * h * 2), embed))
    hes = {**weights, **acts, "Hessian hook's squares": hook}
    if opt["gptq"]:
        for g, d in shape.groups:
            hes[f"full Hessian of {g} ({d}x{d} float32)"] = d * d * 4
        hes["transposed input for XᵀX"] = max(tokens * h, chunk * m_width) * 4
    stages.append(Stage("hessian", sum(hes.values()), host(sum(hes.values()),
                                                         2 * big * sb + tokens * h * f), hes))
    rows = k.solve_rows or big_out
    solve = {f"{big_name} as stored (and its file pages while read)": pages * big * sb,
             f"solver on {rows} rows (float32)": SOLVE_WEIGHT * rows * big_in * 4,
             "codes, scales, zero-points": big + 3 * big // max(opt["group"], 1) * 4}
    if opt["method"] not in ("minmax", "minmax-lazy"):
        solve["NeUQI search chunk"] = SOLVER_WORKSET
    if opt["gptq"]:
        name, out_f, in_f = max(shape.linears, key=lambda t: t[2] * t[2] * 4 * (
            1 + GPTQ_HESSIAN) + t[1] * t[2] * (sb + 4 * GPTQ_WEIGHT))
        rows = k.gptq_rows or out_f
        solve = {f"{name} as stored (and its file pages while read)": pages * out_f * in_f * sb,
                 f"full Hessian of {name} (float32)": in_f * in_f * 4,
                 "codes, scales, zero-points": out_f * in_f + 3 * out_f * in_f // max(
                     opt["group"], 1) * 4}
        # first the (s, z) of --method on the rows, then GPTQ on them: the larger of the two
        init = SOLVE_WEIGHT * rows * in_f * 4 + (
            SOLVER_WORKSET if opt["method"] not in ("minmax", "minmax-lazy") else 0)
        work = int(GPTQ_HESSIAN * in_f * in_f * 4) + GPTQ_WEIGHT * rows * in_f * 4
        if init > work:
            solve[f"solver on {rows} rows (float32, with its search chunk)"] = init
        else:
            solve["GPTQ's inverse-Hessian factor and work copies"] = int(
                GPTQ_HESSIAN * in_f * in_f * 4)
            solve[f"GPTQ on {rows} rows (float32)"] = GPTQ_WEIGHT * rows * in_f * 4
        if opt.get("gptq_refit"):
            # the second (lazy Min-Max) GPTQ result and the row errors beside the first, and
            # the refit's float64 block (neuqi.quant.gptq.refit_params) with its einsum temporary
            solve["refit: second GPTQ result, its block"] = (
                2 * rows * in_f * 4 + 2 * REFIT_ELEMENTS * 8)
    stages.append(Stage("solve", sum(solve.values()), host(sum(solve.values()), 2 * big * sb), solve))
    fwd = {**weights, **acts}
    if opt["sequential"]:
        fwd["dequantized linear while loaded"] = big * (f + 1)
    stages.append(Stage("forward", sum(fwd.values()), host(sum(fwd.values()),
                                                        2 * big * sb + tokens * h * f), fwd))
    shard = min(4 * (shape.layer_params + shape.layer_other_bytes), 2 * GiB)
    pack = {"output shard being written": shard, "one linear's codes": big * 2}
    stages.append(Stage("pack", 0 if cuda else sum(pack.values()), base + sum(pack.values()),
                        pack))
    return stages


STORE_CHUNK_BYTES = 64 * 2**20  # the job store's default chunk (rows of about this many bytes)


def _stored(rows: int, cols: int, itemsize: int) -> int:
    """Bytes of an uncompressed ``[rows, cols]`` array in the job store: its last chunk of rows is
    written whole."""
    row = cols * itemsize
    per = max(1, min(rows, STORE_CHUNK_BYTES // max(row, 1)))
    return -(-rows // per) * per * row


def _disk(shape: ModelShape, opt: dict[str, Any]) -> tuple[int, dict[str, int], int]:
    f = DTYPE_BYTES[opt["dtype"]]
    n, s = opt["nsamples"], opt["seqlen"]
    g = opt["group"]
    acts = n * s * shape.hidden * f
    q = sum(_stored(o, i, 1) + 3 * _stored(o, i // g if g > 0 else 1, 4)
            for _, o, i in shape.linears)
    q += 4 * sum(d for _, d in shape.groups)
    layers = shape.layers
    # layer i < n-1 holds its inputs and the next layer's, and i+1 layers' parameters; the last
    # layer its inputs and all n layers' parameters
    if layers > 1 and 2 * acts + (layers - 1) * q >= acts + layers * q:
        pieces = {"two layers' inputs (this one, the next)": 2 * acts,
                  f"solved parameters of {layers - 1} layers": (layers - 1) * q}
    else:
        pieces = {"the last layer's inputs": acts,
                  f"solved parameters of all {layers} layers": layers * q}
    pieces["calibration tokens"] = n * s * 8
    if opt["gptq"]:
        pieces["one layer's full Hessians"] = sum(d * d * 4 for _, d in shape.groups)
    if opt.get("distill_steps"):
        pieces["full-precision stream (distillation)"] = 2 * acts
    bits = opt["bits"]
    linear_out = sum(o * ((i * bits + 7) // 8) + 2 * 4 * o * (i // g if g > 0 else 1) + 4 * i
                     for _, o, i in shape.linears)
    output = shape.layers * (linear_out + shape.layer_other_bytes) + shape.other_bytes
    return sum(pieces.values()), pieces, output


# ---------------------------------------------------------------------------- the job store's objects

ZARR_META_BYTES = 560  # an array's zarr.json (measured on the tiny job: 490 to 557 bytes)
RECORD_BYTES = 300  # a completion record (measured: 105 to 300 bytes)
ROOT_BYTES = 900  # the root zarr.json with the manifest
HESSIAN_BLOCK_BYTES = 16 * 2**20  # neuqi.stages.gptq.HESSIAN_BLOCK_BYTES (a test checks)


@dataclass
class StoreCost:
    """The job store as objects (an object store's unit of cost; a local store's files are the
    same, one file an object): every array is its ``zarr.json`` plus one object a chunk, every
    completion record one object. ``written``: over the whole job; ``peak``: held at once;
    ``kept``: at the end with ``--keep-job`` (without it only the records and the root stay).
    ``requests_per_layer``: an estimate of one layer's requests by kind, from the arrays it
    writes and reads (a chunk is one PUT or GET; creating or deleting an array lists its prefix;
    the lease's renewals and the small metadata reads are left out). A chunk that holds only
    zeros is not written by zarr: the counts are an upper bound by that much."""

    objects_written: int
    bytes_written: int
    objects_peak: int
    bytes_peak: int
    objects_kept: int
    bytes_kept: int
    requests_per_layer: dict[str, int]


def _chunked(rows: int, row_bytes: int, per: int | None = None) -> tuple[int, int]:
    """(objects, bytes) of an uncompressed array of ``rows`` rows of ``row_bytes`` bytes, chunked
    ``per`` rows at a time (None: about :data:`STORE_CHUNK_BYTES`), its ``zarr.json`` included;
    the last chunk is written whole."""
    if per is None:
        per = max(1, min(rows, STORE_CHUNK_BYTES // max(row_bytes, 1)))
    chunks = -(-rows // per)
    return chunks + 1, chunks * per * row_bytes + ZARR_META_BYTES


def store_cost(shape: ModelShape, opt: dict[str, Any]) -> StoreCost:
    """The objects and bytes of the job's store, and requests per layer (see :class:`StoreCost`),
    from the arrays the stages write (``neuqi.stages``: tokens and activations one window a chunk,
    the solved parameters in about 64 MiB chunks, GPTQ's Hessians in 16 MiB row blocks)."""
    f = DTYPE_BYTES[opt["dtype"]]
    n, s, g = opt["nsamples"], opt["seqlen"], opt["group"]
    acts = _chunked(n, s * shape.hidden * f, 1)
    tokens = _chunked(n, s * 8, 1)
    record = (1, RECORD_BYTES)

    def add(*parts: tuple[int, int]) -> tuple[int, int]:
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def times(k: int, part: tuple[int, int]) -> tuple[int, int]:
        return k * part[0], k * part[1]

    q_arrays = []
    for _, o, i in shape.linears:
        cols = i // g if g > 0 else 1
        q_arrays += [_chunked(o, i), *(_chunked(o, 4 * cols) for _ in range(3))]
    diag = [_chunked(d, 4) for _, d in shape.groups]
    h = add(*diag)
    q = add(*q_arrays)
    solve_records = times(len(shape.linears), record)
    full = add(*(_chunked(d, 4 * d, max(1, HESSIAN_BLOCK_BYTES // (4 * d)))
                 for _, d in shape.groups)) if opt["gptq"] else (0, 0)
    distill = (0, 0)
    if opt.get("distill_steps"):  # the distilled scales and zero-points, two norms, records
        distill = add(*(_chunked(o, 4 * (i // g if g > 0 else 1)) for _, o, i in shape.linears
                        for _ in range(2)), times(2, _chunked(shape.hidden, 4)),
                      times(2, record))
    layers = shape.layers
    held = add((1, ROOT_BYTES), tokens, record, acts)
    written = held
    peak = held
    for i in range(layers):
        last = i == layers - 1
        step = add(full, h, record, q, solve_records, distill)
        if opt.get("distill_steps"):
            step = add(step, acts)  # the full-precision stream's next inputs
        if not last:
            step = add(step, acts, record)
        written = add(written, step)
        held = add(held, step)
        peak = (max(peak[0], held[0]), max(peak[1], held[1]))
        gone = add(acts, full, acts if opt.get("distill_steps") else (0, 0))
        held = (held[0] - gone[0], held[1] - gone[1])
    written = add(written, record, record)  # pack, and without --keep-job the pruned record
    kept = add(held, record)
    peak = (max(peak[0], kept[0]), max(peak[1], kept[1]))
    # one layer's requests: its arrays' chunks and zarr.json (PUT), the activations read by the
    # Hessian and forward passes and the diagonals, full Hessians and parameters read by the
    # solves and the packing (GET), a listing per array created or deleted
    created = len(shape.groups) * (2 if opt["gptq"] else 1) + 4 * len(shape.linears) + 1
    puts = add(full, h, record, q, solve_records, distill, acts, record)[0]
    gets = 2 * n + len(shape.linears) * (1 + (full[0] // max(len(shape.groups), 1))) + q[0]
    return StoreCost(
        objects_written=written[0], bytes_written=written[1], objects_peak=peak[0],
        bytes_peak=peak[1], objects_kept=kept[0], bytes_kept=kept[1],
        requests_per_layer={"PUT": puts, "GET": gets, "LIST": created + 1,
                            "DELETE": acts[0] + full[0]},
    )


def _candidates(shape: ModelShape, opt: dict[str, Any]) -> list[Knobs]:
    """Knobs of the layer passes (embed, hessian, forward), from the most memory to the least."""
    out = []
    for lin in (False, True):
        w = opt["batch_size"]
        while w >= 1:
            out.append(Knobs(w, 0, lin, 0, 0))
            w //= 2
        c = opt["seqlen"] // 2
        while c >= MIN_MLP_CHUNK:
            out.append(Knobs(1, c, lin, 0, 0))
            c //= 2
    return out


def _row_candidates(shape: ModelShape) -> list[int]:
    """Rows per solver / GPTQ call, from all (0) down."""
    out, rows = [0], shape.largest[1] // 2
    while rows >= 64:
        out.append(rows)
        rows //= 2
    return out


def default_budget(device: str) -> int:
    """Device memory free now (host memory available, on cpu), less the headroom."""
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return max(0, min(int(free * HEADROOM), free - HEADROOM_BYTES))
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if not avail:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return max(0, min(int(avail * HEADROOM), avail - HEADROOM_BYTES))


def options_of(config: Any) -> dict[str, Any]:
    """The plan's view of a QuantizeConfig."""
    return {
        "bits": config.bits, "group": config.group_size, "method": config.method,
        "nsamples": config.nsamples, "seqlen": config.seqlen, "dtype": config.dtype,
        "batch_size": config.batch_size, "gptq": config.gptq, "sequential": config.sequential,
        "distill_steps": config.distill_steps, "gptq_refit": config.gptq_refit,
    }


def choose(shape: ModelShape, opt: dict[str, Any], budget: int, cuda: bool
           ) -> tuple[Knobs, list[Stage], bool, int, str]:
    """The knobs under which every stage fits ``budget`` holding the most (the layer passes and
    the solves are chosen apart: they never run at once), whether they fit, the smallest budget
    that works and its largest unavoidable piece."""
    fixed = CUDA_CONTEXT if cuda else process_base() + ALLOCATOR_PAD
    passes = ("embed", "hessian", "forward", "pack")

    def need(k: Knobs, names: tuple[str, ...]) -> int:
        return max(st.device for st in _stages(shape, opt, k, cuda) if st.name in names) + fixed

    layer_knobs = _candidates(shape, opt)
    k = next((c for c in layer_knobs if need(c, passes) <= budget), None)
    fits = k is not None
    k = k or layer_knobs[-1]
    rows = [replace(k, solve_rows=r, gptq_rows=r) for r in _row_candidates(shape)]
    k2 = next((c for c in rows if need(c, ("solve",)) <= budget), None)
    fits = fits and k2 is not None
    k = k2 or rows[-1]
    smallest = replace(layer_knobs[-1], solve_rows=rows[-1].solve_rows,
                       gptq_rows=rows[-1].gptq_rows)
    st_min = _stages(shape, opt, smallest, cuda)
    worst = max(st_min, key=lambda st: st.device)
    piece, nbytes = max(worst.pieces.items(), key=lambda kv: kv[1])
    what = f"{piece} ({fmt(nbytes)}) in stage {worst.name}"
    return k, _stages(shape, opt, k, cuda), fits, worst.device + fixed, what


def check_group_sizes(shape: ModelShape, group_size: int) -> None:
    from neuqi.quant.solver import check_group_size

    for name, _, in_f in shape.linears:
        check_group_size(in_f, group_size, f"model.layers.*.{name}.weight")


# ---------------------------------------------------------------------------- time probe


def probe(device: str, method: str, dtype: str, group_size: int, gptq: bool) -> dict[str, float]:
    """This machine's speed: matmul flop/s in the compute dtype, solver weights/s (one chunk of
    groups through the public solver), GPTQ column-rows/s. A few seconds."""
    import torch

    from neuqi.quant.solver import CHUNK_ELEMENTS, COARSE_STEPS, quantize_tensor

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        dev = torch.device("cpu")  # planning for a GPU this machine lacks: its speed is unknown
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    n = 2048 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, generator=g).to(dev, dt)
    (a @ a).sum().item()
    reps, t = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t < 0.3:
        a @ a
        reps += 1
    sync()
    flops = 2 * n**3 * reps / (time.perf_counter() - t)
    gs = group_size if group_size > 0 else 128
    cols = max(gs, 1024 // gs * gs)
    groups = CHUNK_ELEMENTS // (COARSE_STEPS * gs)
    rows = max(1, groups * gs // cols)
    w = torch.randn(rows, cols, generator=g)
    hd = torch.rand(cols, generator=g) + 0.1
    solve_method = method if method != "minmax-lazy" else "minmax"
    quantize_tensor(w[:1], hd, bits=4, group_size=group_size, method=solve_method, device=dev)
    sync()
    t = time.perf_counter()
    quantize_tensor(w, hd, bits=4, group_size=group_size, method=solve_method, device=dev)
    sync()
    solver = w.numel() / (time.perf_counter() - t)
    out = {"matmul_flops": flops, "solver_weights_per_s": solver,
           "probed_on_cuda": float(dev.type == "cuda")}
    if gptq:
        from neuqi.quant.gptq import gptq_quantize

        o, i = 256, 512
        w = torch.randn(o, i, generator=g)
        x = torch.randn(2 * i, i, generator=g)
        hess = x.T @ x / (2 * i)
        q = quantize_tensor(w, None, bits=4, group_size=group_size if group_size > 0 else -1,
                            method="minmax", device=dev)
        t = time.perf_counter()
        gptq_quantize(w, hess, q.scale, q.zero_point, bits=4,
                      group_size=group_size if group_size > 0 else -1, device=dev)
        sync()
        out["gptq_weights_per_s"] = o * i / (time.perf_counter() - t)
    return out


def _seconds(shape: ModelShape, opt: dict[str, Any], k: Knobs, speed: dict[str, float],
             stages: list[Stage]) -> float:
    n, s = opt["nsamples"], opt["seqlen"]
    tokens = n * s
    flops = speed["matmul_flops"]
    # the query width (Phi-3's fused qkv_proj is not one: the hidden size is its query width)
    heads_dim = max((o for name, o, _ in shape.linears if name.endswith(".q_proj")),
                    default=shape.hidden)
    fwd = (2 * shape.layer_params * tokens + 2 * n * s * s * heads_dim) / flops
    hes = fwd + (2 * tokens * sum(d * d for _, d in shape.groups) / flops if opt["gptq"] else 0)
    weights = shape.layer_params
    solve = 0.0
    if opt["method"] != "minmax-lazy":
        solve = weights / speed["solver_weights_per_s"]
    if opt["gptq"]:
        calls = {name: max(1, math.ceil(o / (k.gptq_rows or o))) for name, o, _ in shape.linears}
        if "gptq_flops" in speed:  # the GPU model: the column-block updates, a launch per column
            solve += sum(o * i * i / speed["gptq_flops"]
                         + i * calls[nm] * speed["gptq_column_seconds"]
                         for nm, o, i in shape.linears)
        else:
            solve += weights / speed["gptq_weights_per_s"]
        # the Cholesky factorisations, one per call (fp32 on the GPU model's rate)
        solve += sum(calls[nm] * (i**3) for nm, _, i in shape.linears) / speed.get(
            "gptq_flops", flops)
    # reading the layer's weights (the GPU model states a disk rate; the CPU probe has none)
    read = shape.layer_params * shape.weight_bytes / speed.get("disk_bytes_per_s", math.inf)
    hes += read
    per_layer = {"hessian": hes, "solve": solve, "forward": fwd}
    for st in stages:
        st.seconds = per_layer.get(st.name, 0.0)
    return shape.layers * (hes + solve) + (shape.layers - 1) * fwd


# ---------------------------------------------------------------------------- entry point


def make_plan(config: Any, device: str = "cpu", budget: int | None = None,
              with_probe: bool = True, model: str | None = None,
              gpu: str | None = None) -> Plan:
    """The plan of ``config`` (a QuantizeConfig) on ``device`` under ``budget`` bytes (None:
    ``config.max_memory``, else the default headroom of that device); ``model``: the resolved
    model folder (default ``config.model``). On a CUDA device the time comes from the GPU time
    model of ``gpu`` (a :data:`neuqi.pipeline.gpu_time.GPUS` name; default: the GPU detected here, else none and no
    time), not from a probe."""
    config.validate()
    shape = read_shape(model or config.model)
    check_group_sizes(shape, config.group_size)
    opt = options_of(config)
    cuda = device.startswith("cuda")
    budget = budget or getattr(config, "max_memory", None) or default_budget(device)
    k, stages, fits, floor, piece = choose(shape, opt, budget, cuda)
    disk, disk_pieces, output = _disk(shape, opt)
    speed: dict[str, Any] | None = None
    if cuda and (gpu or with_probe):  # a named GPU's model is no probe: --no-probe keeps it
        gpu = gpu or detect_gpu(device)
        if gpu:
            speed = gpu_speed(gpu, config.dtype)
        elif torch_cuda():  # a GPU the model does not list: probe it
            speed = probe(device, config.method, config.dtype, config.group_size, config.gptq)
    elif gpu:
        raise UserError(f"--gpu {gpu} is for --device cuda: the time on {device} is probed here")
    else:
        speed = probe(device, config.method, config.dtype, config.group_size, config.gptq) \
            if with_probe else None
    seconds = _seconds(shape, opt, k, speed, stages) if speed else None
    return Plan(model=config.model, options=opt, device=device, budget=budget, knobs=k,
                stages=stages, disk_peak=disk, disk_pieces=disk_pieces, output_bytes=output,
                layers=shape.layers, fits=fits, floor=floor, floor_piece=piece, probe=speed,
                seconds=seconds, store=store_cost(shape, opt))


def refuse_unless_fits(plan: Plan) -> None:
    """UserError (exit 2) when the budget is below what the job cannot do without."""
    if not plan.fits:
        raise UserError(
            f"--max-memory {fmt(plan.budget)} is too small on {plan.device}: the largest "
            f"unavoidable piece is {plan.floor_piece}; the smallest budget that works is "
            f"{fmt(plan.floor)} (--max-memory {math.ceil(plan.floor / GiB * 10) / 10}GiB)"
        )
