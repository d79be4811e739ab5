"""`neuqi export`: a native neuqi output to the formats inference engines load.

Formats (``FORMATS``):

* ``compressed-tensors``: transformers / vLLM ``pack-quantized``, integer zero-points
  (:mod:`neuqi.formats.export.compressed_tensors`);
* ``gguf-q4_1`` / ``gguf-q5_1``: llama.cpp blocks of 32 with a float scale and a float offset,
  NeUQI's own form (lossless up to fp16 block parameters); ``gguf-q4_k`` / ``gguf-q5_k`` /
  ``gguf-q2_k``: K-quants, solved under their quantized sub-block scales and minimums
  (:mod:`neuqi.formats.export.gguf`); ``gguf`` picks Q4_1 or Q5_1 from the output's bits.

The export streams one tensor at a time, writes under a temporary name and renames at the end.
For every format it measures the weighted loss ``sum h (w - ŵ)²`` the format adds over the native
result (needs the source checkpoint; see :class:`~neuqi.formats.export.common.ExportSource`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from neuqi.formats.export.common import ExportSource, weighted_loss
from neuqi.util.errors import UserError

__all__ = ["FORMATS", "ExportReport", "export"]

FORMATS: tuple[str, ...] = (
    "compressed-tensors", "gguf", "gguf-q4_1", "gguf-q5_1", "gguf-q4_k", "gguf-q5_k", "gguf-q2_k",
)


@dataclass
class ExportReport:
    """What an export did. Losses are ``sum h (w - ŵ)²`` over all quantized linears (``None``
    when the original weights were not available)."""

    format: str
    out: str
    native_loss: float | None
    export_loss: float | None
    tensors: int
    hessian: bool
    notes: list[str] = field(default_factory=list)
    linears: int = 0  # quantized linears
    re_solved: int = 0  # of them, solved again for the format (not the output's own codes)
    re_solve_why: str = ""
    bytes: int = 0  # of the exported file or folder
    native_bytes: int = 0  # of the native output folder

    @property
    def added_loss(self) -> float | None:
        if self.native_loss is None or self.export_loss is None:
            return None
        return self.export_loss - self.native_loss

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "added_loss": self.added_loss}

    def summary(self) -> str:
        if self.native_loss is None or self.export_loss is None:
            return f"{self.format}: weighted loss not measured (no source weights)"
        added = self.export_loss - self.native_loss  # self.added_loss, not None here
        rel = added / self.native_loss if self.native_loss > 0 else 0.0
        line = (
            f"{self.format}: weighted loss {self.export_loss:.6g} vs native {self.native_loss:.6g}"
            f" (added {added:+.4g}, {100 * rel:+.3f}%)"
        )
        if self.re_solved:
            line += (
                f"; {self.re_solved} of {self.linears} linears re-solved for the format "
                f"({self.re_solve_why}): both losses are sum h (w - ŵ)² over the same original "
                f"weights with the same Hessian diagonal, of two different quantizations"
            )
        return line

    def sizes(self) -> str:
        return (f"{self.out}: {self.bytes / 1e6:.1f} MB; the native output: "
                f"{self.native_bytes / 1e6:.1f} MB")


def _bytes(path: Path) -> int:
    """Size of a file, or of the files in a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _exporter(fmt: str, source: ExportSource, out: Path) -> Any:
    if fmt == "compressed-tensors":
        from neuqi.formats.export.compressed_tensors import CompressedTensorsExporter

        return CompressedTensorsExporter(source, out)
    from neuqi.formats.export.gguf import GGUFExporter, default_type

    qtype = default_type(source) if fmt == "gguf" else fmt.removeprefix("gguf-").upper()
    return GGUFExporter(source, out, qtype)


def export(
    output: str | Path,
    fmt: str,
    out: str | Path,
    model: str | Path | None = None,
    device: torch.device | str = "cpu",
    say: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export the native output folder ``output`` to format ``fmt`` at ``out`` (a folder for
    compressed-tensors, a ``.gguf`` file for GGUF); return the report. ``say`` receives warnings."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    say = say or (lambda _msg: None)
    source = ExportSource(output, model, device)
    if source.missing_source:
        say(f"warning: {source.missing_source}; the added loss is not measured (pass --model)")
    if not source.has_hessian:
        say("warning: the output has no hessian_diag.safetensors (older neuqi); losses and "
            "re-solves use unit weights")
    exporter = _exporter(fmt, source, Path(out))
    native_total = export_total = 0.0
    measured = source.checkpoint is not None
    try:
        for name in source.quantized_names:
            lin = source.linear(name)
            approx = exporter.add_linear(lin)
            if lin.weight is not None:
                native_total += weighted_loss(lin.weight, lin.dequantized(), lin.h_diag)
                export_total += weighted_loss(lin.weight, approx, lin.h_diag)
            else:
                measured = False
        for name in source.plain_names:
            exporter.add_plain(name, source.plain(name))
        notes = list(exporter.notes)  # before finalize: they go into the exported metadata
        if getattr(exporter, "resolved", None):
            notes.append(
                f"note: {len(exporter.resolved)} linear(s) have float zero-points, which {fmt} "
                f"cannot store: re-solved with integer zero-points (NeUQI-int) from the original "
                f"weights and the stored Hessian diagonal; the added loss is NeUQI-int's over "
                f"NeUQI's"
            )
        if getattr(exporter, "rounded", None):
            notes.append(
                f"warning: {len(exporter.rounded)} linear(s) have float zero-points, which "
                f"{fmt} cannot store, and their original weights are not available: zero-points "
                f"rounded to integers (pass --model to re-solve them with NeUQI-int instead)"
            )
        report = ExportReport(
            format=getattr(exporter, "format_name", fmt), out=str(exporter.target.path),
            native_loss=native_total if measured else None,
            export_loss=export_total if measured else None,
            tensors=len(source.quantized_names) + len(source.plain_names),
            hessian=source.has_hessian, notes=notes, linears=len(source.quantized_names),
            re_solved=sum(len(getattr(exporter, k, [])) for k in ("re_solved", "resolved",
                                                                     "rounded")),
            re_solve_why="; ".join(sorted(getattr(exporter, "re_solve_why", set()))),
        )
        exporter.finalize(report.as_dict())
    except BaseException:
        exporter.abort()
        raise
    report.bytes, report.native_bytes = _bytes(Path(report.out)), _bytes(source.path)
    for note in report.notes:
        say(note)
    return report
