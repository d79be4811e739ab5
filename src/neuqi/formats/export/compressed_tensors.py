"""Export to compressed-tensors ``pack-quantized`` (what transformers and vLLM load).

Per quantized linear ``<prefix>.weight`` the folder holds (compressed-tensors 0.20 names)::

    <prefix>.weight_packed      int32 [out, ceil(in*bits/32)]   codes - 2**(bits-1), dense bits
    <prefix>.weight_scale       model dtype [out, n_groups]
    <prefix>.weight_zero_point  int32 [ceil(out*bits/32), n_groups]  z - 2**(bits-1), packed on dim 0
    <prefix>.weight_shape       int64 [2]

and the loader computes ``ŵ = scale * (q_signed - zp_signed)`` = ``s * (q - z)``: NeUQI's form
with an integer zero-point in ``[0, 2**bits)``. A float zero-point does not survive: the packer
takes int8 values only and the loader unpacks the zero-point as integers (``zp_dtype`` is used
only when initialising the parameters; ``pack_to_int32`` rejects anything but int8). So a job meant
for this format is solved with ``--method neuqi-int`` (exported without change, up to the cast of
the scale to the model's dtype). A float zero-point output (``--method neuqi``) is re-solved here
with integer zero-points, NeUQI-int (:func:`neuqi.quant.solver.quantize_tensor`), from the original
weights and the Hessian diagonal the output stores: what a ``--method neuqi-int`` job would have
written for that linear. Rounding the float zero-point instead costs several times more (the codes
were chosen for the float one); it is done only when the original weights are not available.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from neuqi.formats.export.common import AtomicTarget, ExportSource, NativeLinear
from neuqi.formats.output import HESSIAN_FILE, INDEX_FILE, META_FILE
from neuqi.util.errors import UserError

MARKER = "neuqi-export.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _pack_int32(values: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(values.to(torch.int8), bits, packed_dim=packed_dim)


def has_integer_zero_points(lin: NativeLinear) -> bool:
    z = lin.zero_point
    return bool(torch.equal(z.round().clamp(0, 2**lin.bits - 1), z))


def resolve_integer(lin: NativeLinear, device: torch.device | str = "cpu",
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale and integer zero-point of ``lin`` solved by NeUQI-int from its original
    weights and stored Hessian diagonal (``lin.weight`` must be there)."""
    from neuqi.quant.solver import quantize_tensor

    assert lin.weight is not None
    q = quantize_tensor(lin.weight, lin.h_diag, bits=lin.bits, group_size=lin.group_size,
                        method="neuqi-int", device=device, name=lin.name)
    return q.codes.cpu(), q.scale.cpu(), q.zero_point.cpu()


def integer_params(lin: NativeLinear) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Codes and an integer zero-point in ``[0, 2**bits)`` for ``lin`` by rounding; and whether
    anything had to change (a float or out-of-range zero-point: rounded and clamped, codes
    re-rounded from the original weights, or from the native dequantized weights when those are
    not available)."""
    levels = 2**lin.bits
    z = lin.zero_point
    z_int = z.round().clamp(0, levels - 1)
    if torch.equal(z_int, z):
        return lin.codes, z_int, False
    target = lin.weight if lin.weight is not None else lin.dequantized()
    out_f, in_f = lin.codes.shape
    g = lin.group_length
    x = target.reshape(out_f, in_f // g, g) / lin.scale.unsqueeze(-1) + z_int.unsqueeze(-1)
    codes = x.round().clamp(0, levels - 1).to(torch.uint8).reshape(out_f, in_f)
    return codes, z_int, True


def _is_ours(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


class CompressedTensorsExporter:
    """Writes a compressed-tensors folder one tensor at a time; :meth:`finalize` publishes it."""

    format_name = "compressed-tensors"
    max_shard_bytes = 2**30

    def __init__(self, source: ExportSource, out: str | Path) -> None:
        self.source = source
        self.target = AtomicTarget(out, folder=True, is_ours=_is_ours)
        config = source.config()
        self.config = config
        dtype_name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        self.dtype = _DTYPES.get(dtype_name, torch.float32)
        self.notes: list[str] = []
        self.rounded: list[str] = []  # float zero-points rounded (no original weights)
        self.resolved: list[str] = []  # float zero-points re-solved with NeUQI-int
        self.re_solve_why = {"integer zero-points: NeUQI-int"}
        self._schemes: dict[tuple[int, int], list[str]] = {}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[str] = []
        self._shard_of: dict[str, int] = {}
        self._total = 0

    # --------------------------------------------------------------------------- tensors
    def add_linear(self, lin: NativeLinear) -> torch.Tensor:
        """Store ``lin``; return the weight the loader will compute, float32 ``[out, in]``."""
        bits = lin.bits
        scale = lin.scale
        if has_integer_zero_points(lin):
            codes, z = lin.codes, lin.zero_point
        elif lin.weight is not None:
            codes, scale, z = resolve_integer(lin, self.source.device)
            self.resolved.append(lin.name)
        else:
            codes, z, _ = integer_params(lin)
            self.rounded.append(lin.name)
        scale = scale.to(self.dtype)
        offset = 1 << (bits - 1)
        prefix = lin.name[: -len(".weight")]
        self._put(f"{prefix}.weight_packed", _pack_int32(codes.to(torch.int16) - offset, bits))
        self._put(f"{prefix}.weight_scale", scale)
        self._put(f"{prefix}.weight_zero_point",
                  _pack_int32(z.to(torch.int16) - offset, bits, packed_dim=0))
        self._put(f"{prefix}.weight_shape", torch.tensor(list(lin.codes.shape), dtype=torch.int64))
        self._schemes.setdefault((bits, lin.group_size), []).append(prefix)
        from neuqi.quant.solver import dequantize

        return dequantize(codes, scale.to(torch.float32), z, lin.group_size)

    def add_plain(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        self._put(name, tensor)

    def _put(self, key: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous().clone()
        size = t.numel() * t.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[key] = t
        self._buffer_bytes += size

    def _flush(self) -> None:
        if not self._buffer:
            return
        from safetensors.torch import save_file

        name = f"model-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._buffer, str(self.target.temp / name), metadata={"format": "pt"})
        for key in self._buffer:
            self._shard_of[key] = len(self._shards)
        self._shards.append(name)
        self._total += self._buffer_bytes
        self._buffer, self._buffer_bytes = {}, 0

    # --------------------------------------------------------------------------- finishing
    def quantization_config(self) -> dict[str, Any]:
        groups: dict[str, Any] = {}
        uniform = len(self._schemes) == 1
        for i, ((bits, group_size), prefixes) in enumerate(sorted(self._schemes.items())):
            weights: dict[str, Any] = {
                "num_bits": bits, "type": "int", "symmetric": False, "dynamic": False,
                "strategy": "channel" if group_size == -1 else "group",
                "group_size": None if group_size == -1 else group_size,
            }
            targets = ["Linear"] if uniform else [f"re:^{p.replace('.', '[.]')}$" for p in prefixes]
            groups[f"group_{i}"] = {
                "targets": targets, "weights": weights, "input_activations": None,
                "output_activations": None, "format": "pack-quantized",
            }
        quantized = {p for ps in self._schemes.values() for p in ps}
        # every other Linear (lm_head) stays dense
        ignore = sorted({n[: -len(".weight")] for n in self.source.plain_names
                         if n.endswith(".weight") and n.startswith("lm_head")})
        return {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": groups,
            "ignore": ignore if uniform else [], "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "neuqi": {"quantized_linears": len(quantized)},
        }

    def finalize(self, report: dict[str, Any]) -> Path:
        if not self._schemes:
            raise UserError(f"{self.source.path}: the output has no quantized linear to export")
        self._flush()
        temp = self.target.temp
        n = len(self._shards)
        final = []
        for i, name in enumerate(self._shards):
            new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(temp / name, temp / new)
            final.append(new)
        weight_map = {k: final[i] for k, i in sorted(self._shard_of.items())}
        config = dict(self.config)
        config["quantization_config"] = self.quantization_config()
        skip = {META_FILE, INDEX_FILE, HESSIAN_FILE, "config.json"}
        for f in sorted(self.source.path.iterdir()):
            if f.is_file() and f.name not in skip and not f.name.endswith(".safetensors"):
                shutil.copyfile(f, temp / f.name)
        (temp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (temp / MARKER).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
        (temp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return self.target.publish()

    def abort(self) -> None:
        self.target.abort()
