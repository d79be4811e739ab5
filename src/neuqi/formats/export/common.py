"""What every export format shares: the native output as input, the weighted loss, atomic targets.

A native neuqi output (:mod:`neuqi.formats.output`) is the reference: per group ``ŵ = s * (q - z)`` with a
float scale and a float zero-point, nothing rounded. An export format stores the same linear
under its own constraints; what it loses is measured with the calibration weighting the solve
used, ``L = sum_j h_j (w_ij - ŵ_ij)²`` over the original weights ``w`` (``h``: the Hessian
diagonal of the layer input, from the output's ``hessian_diag.safetensors``).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuqi.formats.loader import DequantLinear, NeuqiOutput
from neuqi.formats.output import HESSIAN_FILE
from neuqi.model.checkpoint import Checkpoint
from neuqi.util.durable import fsync
from neuqi.util.errors import UserError

__all__ = [
    "AtomicTarget",
    "ExportSource",
    "NativeLinear",
    "weighted_loss",
]


def weighted_loss(weight: torch.Tensor, approx: torch.Tensor, h_diag: torch.Tensor | None) -> float:
    """``sum_ij h_j (w_ij - ŵ_ij)²`` in float64 (``h_diag None``: all ones)."""
    diff = weight.to(torch.float64) - approx.to(torch.float64)
    sq = diff * diff
    if h_diag is not None:
        sq = sq * h_diag.to(torch.float64).unsqueeze(0)
    return float(sq.sum())


@dataclass
class NativeLinear:
    """One quantized linear of the native output, with what an exporter needs to re-solve it.

    ``codes`` uint8 ``[out, in]``, ``scale``/``zero_point`` float32 ``[out, n_groups]`` (the
    stored parameters); ``weight`` the original float32 weight (``None`` when the source
    checkpoint is not available); ``h_diag`` float32 ``[in]`` (``None`` when the output has no
    Hessian sidecar).
    """

    name: str
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    group_size: int
    weight: torch.Tensor | None
    h_diag: torch.Tensor | None
    method: str | None

    @property
    def group_length(self) -> int:
        return self.codes.shape[1] if self.group_size == -1 else self.group_size

    def dequantized(self) -> torch.Tensor:
        from neuqi.quant.solver import dequantize

        return dequantize(self.codes, self.scale, self.zero_point, self.group_size)

    def require_weight(self, why: str) -> torch.Tensor:
        if self.weight is None:
            raise UserError(
                f"{self.name}: {why} needs the original weights, and the source checkpoint is not "
                f"available; pass --model with the model folder the output was quantized from"
            )
        return self.weight


class ExportSource:
    """A native output opened for export: its linears, plain tensors, weights and Hessians.

    ``model`` overrides the source checkpoint recorded in neuqi.json (needed only where the
    original weights are: the loss report and formats that re-solve).
    """

    def __init__(self, output: str | Path, model: str | Path | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.output = NeuqiOutput.open(output)
        self.path = self.output.path
        self.device = torch.device(device)
        meta = self.output.meta
        self.method: str | None = (meta.get("quantization") or {}).get("method")
        self.model_type: str | None = (meta.get("source") or {}).get("model_type")
        source = model if model is not None else (meta.get("source") or {}).get("path")
        self.checkpoint: Checkpoint | None = None
        self.missing_source: str | None = None
        if model is not None:
            self.checkpoint = Checkpoint.open(model)  # UserError if --model is bad
        elif source and Path(source).is_dir():
            try:
                self.checkpoint = Checkpoint.open(source)
            except UserError as e:
                self.missing_source = str(e)
        else:
            self.missing_source = f"source checkpoint {source} not found"
        self._hessian: dict[str, torch.Tensor] | None = None
        hfile = self.path / HESSIAN_FILE
        if hfile.is_file():
            from safetensors.torch import load_file

            try:
                self._hessian = load_file(str(hfile))
            except Exception as e:  # noqa: BLE001 - damaged file
                raise UserError(f"{hfile}: unreadable ({e}); re-run neuqi quantize") from None

    @property
    def has_hessian(self) -> bool:
        return self._hessian is not None

    @property
    def quantized_names(self) -> list[str]:
        return sorted(self.output.quantized)

    @property
    def plain_names(self) -> list[str]:
        return self.output.plain_names

    def config(self) -> dict[str, Any]:
        import json

        return json.loads((self.path / "config.json").read_text(encoding="utf-8"))

    def linear(self, name: str) -> NativeLinear:
        info = self.output.quantized[name]
        lin: DequantLinear = self.output.linear(name)
        weight = None
        if self.checkpoint is not None and self.checkpoint.has(name):
            weight = self.checkpoint.read(name, dtype=torch.float32)
            if tuple(weight.shape) != (lin.out_features, lin.in_features):
                raise UserError(
                    f"--model {self.checkpoint.path}: {name} has shape {tuple(weight.shape)}, the "
                    f"output has {(lin.out_features, lin.in_features)}; pass the model it was "
                    f"quantized from"
                )
        h = None if self._hessian is None else self._hessian.get(name)
        return NativeLinear(
            name=name, codes=lin.codes, scale=lin.scales, zero_point=lin.zeros,
            bits=int(info["bits"]), group_size=int(info["group_size"]),
            weight=weight, h_diag=h, method=self.method,
        )

    def plain(self, name: str) -> torch.Tensor:
        return self.output.read(name)


# ------------------------------------------------------------------------------------ targets
_TEMP = re.compile(r"\.(partial|old)-[0-9a-f]{16}$")


class AtomicTarget:
    """A file or folder written under a temporary sibling name and renamed into place at the end.

    ``is_ours(path)`` decides whether an existing target may be replaced (a previous export);
    anything else there is a UserError naming ``--out``. ``temp`` is the path to write;
    :meth:`publish` renames it to ``path``, :meth:`abort` removes it.
    """

    def __init__(self, path: str | Path, *, folder: bool, is_ours: Any) -> None:
        self.path = Path(path).expanduser().absolute()
        self.folder = folder
        if self.path.exists() or self.path.is_symlink():
            empty_dir = folder and self.path.is_dir() and not any(self.path.iterdir())
            if not (empty_dir or is_ours(self.path)):
                raise UserError(
                    f"--out {self.path} exists and is not an earlier export of this format: "
                    f"choose another path or remove it"
                )
        for stale in self.path.parent.glob(f"{self.path.name}.*"):
            if _TEMP.search(stale.name):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        self.temp = self.path.with_name(f"{self.path.name}.partial-{secrets.token_hex(8)}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if folder:
                self.temp.mkdir()
        except OSError as e:
            raise UserError(f"--out {self.path}: cannot write there ({e.strerror or e})") from None

    def publish(self) -> Path:
        if self.folder:
            for f in self.temp.iterdir():
                fsync(f)
        fsync(self.temp, directory=self.folder)
        if self.path.exists() or self.path.is_symlink():
            old = self.path.with_name(f"{self.path.name}.old-{secrets.token_hex(8)}")
            os.rename(self.path, old)
            try:
                os.rename(self.temp, self.path)
            except BaseException:
                os.rename(old, self.path)
                raise
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.rename(self.temp, self.path)
        fsync(self.path.parent, directory=True)
        return self.path

    def abort(self) -> None:
        if self.temp.is_dir():
            shutil.rmtree(self.temp, ignore_errors=True)
        elif self.temp.exists():
            self.temp.unlink()
