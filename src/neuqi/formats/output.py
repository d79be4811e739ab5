"""neuqi's own output format: sharded safetensors plus ``neuqi.json``, written atomically.

Layout of an output folder (format ``neuqi-v1``)::

    config.json                         source config + "quantization_config"
    neuqi.json                          format version, per-tensor metadata, creation info
    model.safetensors.index.json        {"metadata": {"total_size", "format"}, "weight_map"}
    model-00001-of-0000N.safetensors    the tensors
    tokenizer.json, ...                 the source's tokenizer / generation files
    hessian_diag.safetensors            optional: per quantized weight, the Hessian diagonal h
                                        [in] its solve used (``neuqi export`` re-solves with it)

A quantized linear whose weight is ``<prefix>.weight`` is stored as three tensors:

* ``<prefix>.qweight``: uint8 ``[out, ceil(in*bits/8)]``, codes packed by
  :func:`neuqi.quant.packing.pack_codes` (dense little-endian bit stream per row);
* ``<prefix>.scales``: float32 ``[out, n_groups]``;
* ``<prefix>.zeros``: float32 ``[out, n_groups]`` (float zero-points);

and the weight is ``ŵ = scales * (codes - zeros)`` per group of ``group_size`` consecutive input
channels (``group_size = -1``: one group per row). Everything else (embeddings, norms, lm_head,
biases) is stored under its own name in the dtype it was given.

:class:`OutputWriter` writes into a temporary sibling folder ``<out>.partial-<hex>`` and renames it
to ``<out>`` only once every file is written and fsynced, so ``<out>`` is either absent, the
previous complete output, or the new complete output.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch

from neuqi.quant.packing import pack_codes
from neuqi.util import faults
from neuqi.util.durable import fsync
from neuqi.util.errors import UserError

if TYPE_CHECKING:
    from types import TracebackType

    from neuqi.model.checkpoint import Checkpoint

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "HESSIAN_FILE",
    "INDEX_FILE",
    "META_FILE",
    "OutputWriter",
    "is_neuqi_output",
]

FORMAT = "neuqi-v1"
FORMAT_VERSION = 1
META_FILE = "neuqi.json"
INDEX_FILE = "model.safetensors.index.json"
HESSIAN_FILE = "hessian_diag.safetensors"
QWEIGHT, SCALES, ZEROS = "qweight", "scales", "zeros"

# Source files copied next to the weights (top-level regular files only; never weights).
_COPY_NAMES = {
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "merges.txt",
    "preprocessor_config.json",
}
_COPY_PATTERNS = re.compile(
    r"^(tokenizer.*|chat_template\..*|vocab\..*|.*\.model|.*\.tiktoken|LICENSE.*|NOTICE.*)$",
    re.IGNORECASE,
)
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".h5",
    ".msgpack",
    ".onnx",
    ".npz",
)
_TEMP_KINDS = ("partial", "old")


def is_neuqi_output(path: Path) -> bool:
    """Whether ``path`` is a folder written by :class:`OutputWriter` (it holds ``neuqi.json``)."""
    return path.is_dir() and (path / META_FILE).is_file()


def check_output_target(out: Path) -> None:
    """UserError unless ``out`` is free to (re)write: absent, an empty folder or a neuqi output."""
    if out.exists() or out.is_symlink():
        if is_neuqi_output(out):
            return
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            return  # an empty folder: nothing to lose
        raise UserError(
            f"--out {out} exists and is not a neuqi output: choose another folder or remove it"
        )


def _temp_sibling(out_dir: Path, kind: str) -> Path:
    return out_dir.with_name(f"{out_dir.name}.{kind}-{secrets.token_hex(8)}")


def _leftovers(out_dir: Path) -> list[Path]:
    """Temporary siblings of ``out_dir`` left by a killed writer (``<name>.partial-<hex>`` etc.)."""
    pattern = re.compile(rf"^{re.escape(out_dir.name)}\.({'|'.join(_TEMP_KINDS)})-[0-9a-f]{{16}}$")
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if pattern.match(p.name) and p.is_dir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    faults.charge(len(text.encode("utf-8")), path)
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    faults.output_file_written(path)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for pkg in ("neuqi", "torch", "transformers", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _host_tensor(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU tensor owning exactly its data (safetensors refuses shared views)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


class OutputWriter:
    """Write a quantized model to ``out_dir`` shard by shard, atomically.

    Use as a context manager::

        with OutputWriter(out, ckpt, {"bits": 4, "group_size": 128, "method": "neuqi"}) as w:
            w.add_quantized("model.layers.0.self_attn.q_proj.weight", codes, scale, zero, 4, 128)
            w.add_tensor("model.embed_tokens.weight", embed)
            ...
        # leaving the block normally calls finalize(); an exception calls abort()

    ``quant_info`` (JSON-serialisable) goes into config.json's ``quantization_config`` and into
    neuqi.json; its ``bits``/``group_size``/``method`` are the headline settings (derived from the
    tensors when absent). Tensors are buffered until the next one would take the buffer past
    ``max_shard_bytes``; then the buffer is written as one shard, so at most one shard is held in
    RAM (a single tensor larger than the limit gets a shard of its own).

    Raises UserError at construction if ``out_dir`` exists and is not a neuqi output (a folder
    holding neuqi.json); an empty folder is accepted and replaced.
    """

    def __init__(
        self,
        out_dir: str | Path,
        source: Checkpoint,
        quant_info: dict[str, Any],
        max_shard_bytes: int = 2**30,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        try:
            json.dumps(quant_info)
        except (TypeError, ValueError) as e:
            raise TypeError(f"quant_info must be JSON-serialisable ({e})") from None
        self.out_dir = Path(out_dir).expanduser().absolute()
        self.source = source
        self.quant_info = dict(quant_info)
        self.max_shard_bytes = int(max_shard_bytes)

        self._check_target()
        for stale in _leftovers(self.out_dir):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.temp_dir = _temp_sibling(self.out_dir, "partial")
            self.temp_dir.mkdir()
        except OSError as e:
            raise UserError(
                f"--out {self.out_dir}: cannot create the output folder ({e.strerror or e}); "
                f"choose a writable location"
            ) from None

        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[str] = []  # temporary shard file names, in order
        self._shard_of: dict[str, int] = {}  # stored tensor name -> shard index
        self._total_bytes = 0
        self._quantized: dict[str, dict[str, Any]] = {}  # weight name -> metadata
        self._plain: dict[str, dict[str, Any]] = {}  # stored name -> dtype/shape
        self._hessian: dict[str, torch.Tensor] = {}  # weight name -> h diagonal [in]
        self._state = "open"  # open | finalized | aborted

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            try:
                self.finalize()
            except BaseException:
                self.abort()
                raise

    # ------------------------------------------------------------------ adding tensors
    @property
    def stored_names(self) -> list[str]:
        """Names of the tensors stored so far (qweight/scales/zeros and plain tensors)."""
        return list(self._shard_of) + list(self._buffer)

    def add_quantized(
        self,
        name: str,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        bits: int,
        group_size: int,
    ) -> None:
        """Store one quantized linear weight ``name`` (``"<prefix>.weight"``).

        ``codes``: integer ``[out, in]`` in ``[0, 2**bits)``; ``scale``/``zero_point``: float
        ``[out, n_groups]`` with ``n_groups = in / group_size`` (``group_size = -1``: 1 group).
        Stored as ``<prefix>.qweight`` (packed uint8), ``<prefix>.scales`` and ``<prefix>.zeros``
        (float32). Tensors may live on any device.
        """
        self._check_open()
        if not name.endswith(".weight"):
            raise ValueError(f"quantized tensor name must end with '.weight', got {name!r}")
        if name in self._quantized or name in self._plain:
            raise ValueError(f"tensor {name} was already added")
        if codes.dim() != 2:
            raise ValueError(f"{name}: codes must be 2-D [out, in], got {tuple(codes.shape)}")
        out_features, in_features = codes.shape
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"{name}: group_size must be an int, got {group_size!r}")
        if group_size == -1:
            n_groups = 1
        elif group_size > 0 and in_features % group_size == 0:
            n_groups = in_features // group_size
        else:
            raise ValueError(
                f"{name}: group_size {group_size} does not divide in_features {in_features}"
            )
        for label, t in (("scale", scale), ("zero_point", zero_point)):
            if tuple(t.shape) != (out_features, n_groups):
                raise ValueError(
                    f"{name}: {label} must have shape {(out_features, n_groups)}, "
                    f"got {tuple(t.shape)}"
                )
            if not t.is_floating_point():
                raise ValueError(f"{name}: {label} must be floating point, got {t.dtype}")
        packed = pack_codes(codes, bits)  # validates bits, dtype and range
        prefix = name[: -len(".weight")]
        stored = {
            f"{prefix}.{QWEIGHT}": packed,
            f"{prefix}.{SCALES}": scale.detach().to(torch.float32),
            f"{prefix}.{ZEROS}": zero_point.detach().to(torch.float32),
        }
        for key in stored:
            self._check_new(key)
        self._quantized[name] = {
            "bits": int(bits),
            "group_size": int(group_size),
            "shape": [int(out_features), int(in_features)],
            "in_features": int(in_features),
            "out_features": int(out_features),
            "qweight": f"{prefix}.{QWEIGHT}",
            "scales": f"{prefix}.{SCALES}",
            "zeros": f"{prefix}.{ZEROS}",
        }
        for key, t in stored.items():
            self._put(key, t)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Store an unquantized tensor (embedding, norm, lm_head, bias, ...) in its own dtype."""
        self._check_open()
        if name in self._quantized:
            raise ValueError(f"tensor {name} was already added as a quantized weight")
        self._check_new(name)
        self._plain[name] = {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
        self._put(name, tensor)

    def add_hessian_diag(self, name: str, h_diag: torch.Tensor) -> None:
        """Record the Hessian diagonal ``h [in]`` that quantized weight ``name`` was solved with;
        written to ``hessian_diag.safetensors`` (float32, key ``name``) at finalize, so an export
        can measure and re-solve with the same weighting."""
        self._check_open()
        if name in self._hessian:
            raise ValueError(f"Hessian diagonal of {name} was already added")
        self._hessian[name] = _host_tensor(h_diag.to(torch.float32).reshape(-1))

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"OutputWriter for {self.out_dir} is already {self._state}")

    def _check_new(self, key: str) -> None:
        if key in self._shard_of or key in self._buffer:
            raise ValueError(f"tensor {key} was already added")

    def _put(self, key: str, tensor: torch.Tensor) -> None:
        t = _host_tensor(tensor)
        size = t.numel() * t.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[key] = t
        self._buffer_bytes += size
        if self._buffer_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered tensors as the next shard and release them."""
        if not self._buffer:
            return
        from safetensors.torch import save_file

        index = len(self._shards)
        file_name = f"model-{index + 1:05d}.safetensors"
        path = self.temp_dir / file_name
        faults.charge(self._buffer_bytes, path)
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_umask())  # as readable as the other files of the output
        fsync(path)
        faults.output_file_written(path)
        self._shards.append(file_name)
        for key in self._buffer:
            self._shard_of[key] = index
        self._total_bytes += self._buffer_bytes
        self._buffer = {}
        self._buffer_bytes = 0

    # ------------------------------------------------------------------ finishing
    def missing_source_tensors(self) -> list[str]:
        """Source tensors not yet added (neither as a quantized weight nor as a plain tensor)."""
        covered = set(self._quantized) | set(self._plain)
        return [
            n
            for n in self.source.names
            if n not in covered and not n.endswith("rotary_emb.inv_freq")
        ]

    def finalize(self, require_complete: bool = True) -> Path:
        """Write the last shard, index, config, tokenizer files and neuqi.json; publish; return out_dir.

        With ``require_complete`` every tensor of the source checkpoint must have been added
        (RuntimeError otherwise, and nothing is published). Replaces a previous neuqi output at
        ``out_dir``; UserError if something else appeared there meanwhile.
        """
        self._check_open()
        try:
            if require_complete:
                missing = self.missing_source_tensors()
                if missing:
                    raise RuntimeError(
                        f"output incomplete: {len(missing)} source tensor(s) were not written, "
                        f"first {missing[0]}"
                    )
            if not self._quantized and not self._plain:
                raise RuntimeError("output is empty: no tensor was added")
            self._flush()
            self._name_shards()
            self._copy_source_files()
            self._write_hessian()
            self._write_config()
            _write_json(self.temp_dir / META_FILE, self._meta())
            self._write_index()  # last: its presence marks complete weights
            fsync(self.temp_dir, directory=True)
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"
        return self.out_dir

    def abort(self) -> None:
        """Discard everything written so far (the temporary folder); out_dir is left as it was."""
        if self._state == "finalized":
            return
        self._state = "aborted"
        self._buffer = {}
        self._buffer_bytes = 0
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _name_shards(self) -> None:
        """Rename temporary shards to ``model-0000i-of-0000N.safetensors``."""
        n = len(self._shards)
        final = []
        for i, tmp_name in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.temp_dir / tmp_name, self.temp_dir / name)
            final.append(name)
        self._shards = final

    def _write_hessian(self) -> None:
        if not self._hessian:
            return
        from safetensors.torch import save_file

        path = self.temp_dir / HESSIAN_FILE
        save_file(dict(sorted(self._hessian.items())), str(path), metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_umask())
        fsync(path)

    def _write_index(self) -> None:
        weight_map = {key: self._shards[i] for key, i in sorted(self._shard_of.items())}
        index = {
            "metadata": {"total_size": self._total_bytes, "format": FORMAT},
            "weight_map": weight_map,
        }
        _write_json(self.temp_dir / INDEX_FILE, index)

    def _headline(self) -> dict[str, Any]:
        """quantization_config: quant_method, format, bits, group_size, method, then quant_info."""

        def uniform(key: str) -> Any:
            values = {m[key] for m in self._quantized.values()}
            return values.pop() if len(values) == 1 else None

        qc: dict[str, Any] = {
            "quant_method": "neuqi",
            "format": FORMAT,
            "bits": self.quant_info.get("bits", uniform("bits")),
            "group_size": self.quant_info.get("group_size", uniform("group_size")),
            "method": self.quant_info.get("method"),
        }
        qc.update(self.quant_info)
        qc["quant_method"] = "neuqi"
        qc["format"] = FORMAT
        return qc

    def _write_config(self) -> None:
        src = self.source.path / "config.json"
        config = json.loads(src.read_text(encoding="utf-8"))
        config["quantization_config"] = self._headline()
        _write_json(self.temp_dir / "config.json", config)

    def _copy_source_files(self) -> None:
        for path in sorted(self.source.path.iterdir()):
            name = path.name
            if name.startswith(".") or not path.is_file():
                continue
            if name.lower().endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
                continue
            if name in ("config.json", META_FILE):
                continue
            if name in _COPY_NAMES or _COPY_PATTERNS.match(name):
                dest = self.temp_dir / name
                faults.charge(path.stat().st_size, dest)
                shutil.copyfile(path, dest)  # follows symlinks (hub cache blobs)
                fsync(dest)
                faults.output_file_written(dest)

    def _meta(self) -> dict[str, Any]:
        source: dict[str, Any] = {
            "path": str(self.source.remote.url if self.source.remote is not None
                        else self.source.path),
            "model_type": getattr(self.source.config, "model_type", None),
        }
        try:
            source["fingerprint"] = self.source.fingerprint()
        except OSError:
            source["fingerprint"] = None
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "quantization": self._headline(),
            "quant_info": self.quant_info,
            "source": source,
            "created": {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "versions": _versions(),
            },
            "quantized": dict(sorted(self._quantized.items())),
            "unquantized": dict(sorted(self._plain.items())),
        }
        if self._hessian:
            meta["hessian_diag"] = {"file": HESSIAN_FILE, "names": sorted(self._hessian)}
        return meta

    def _check_target(self) -> None:
        check_output_target(self.out_dir)

    def _publish(self) -> None:
        """Move the finished temporary folder to out_dir, replacing a previous neuqi output."""
        self._check_target()
        out = self.out_dir
        parent = out.parent
        if out.exists() or out.is_symlink():
            old = _temp_sibling(out, "old")
            os.rename(out, old)
            try:
                os.rename(self.temp_dir, out)
            except BaseException:
                os.rename(old, out)
                raise
            fsync(parent, directory=True)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.temp_dir, out)
            fsync(parent, directory=True)
