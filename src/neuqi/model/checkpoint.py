"""A safetensors checkpoint on disk, read tensor by tensor and validated up front."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import torch

from neuqi.model.architectures import ArchSpec, arch_for
from neuqi.model.remote import Remote, is_url, remote_cache
from neuqi.model.safety import check_path_fields
from neuqi.util.errors import UserError

__all__ = ["FP8_SCALE", "HUB_PATTERNS", "INDEX_FILE", "SINGLE_FILE", "Checkpoint", "Remote",
           "open_model", "resolve_model"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]

# Largest safetensors header we accept (the format's own limit is 100 MB).
_MAX_HEADER = 100_000_000
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _read_header(path: Path | str, remote: Remote | None = None) -> tuple[bytes, dict[str, Any]]:
    """Raw header bytes and parsed header of a safetensors file (``path``: a local file, or the
    file name in ``remote``); UserError if damaged."""
    if remote is not None:
        size = remote.size(str(path))
        head = remote.read(str(path), 0, min(8, size))
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        ok = len(head) == 8 and n <= _MAX_HEADER and 8 + n <= size
        raw = remote.read(str(path), 8, 8 + n) if ok else b""
        path = remote.show(str(path))
        if len(head) < 8:
            raise UserError(f"{path}: truncated safetensors file ({size} bytes); re-download it")
        if not ok:
            raise UserError(
                f"{path}: truncated or not a safetensors file (header of {n} bytes, file of "
                f"{size}); re-download it"
            )
    else:
        path = Path(path)
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(
                    f"{path}: truncated safetensors file ({size} bytes); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise UserError(
                    f"{path}: truncated or not a safetensors file (header of {n} bytes, file of "
                    f"{size}); re-download it"
                )
            raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise UserError(f"{path}: damaged safetensors header ({e}); re-download it") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: damaged safetensors header (not an object); re-download it")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        spans.append((*_tensor_span(path, name, info), name))
    end = max((stop for _, stop, _ in spans), default=0)
    if 8 + n + end > size:
        raise UserError(
            f"{path}: truncated safetensors file (header needs {8 + n + end} bytes, file has "
            f"{size}); re-download it"
        )
    # The tensors must tile the data area exactly, as the format requires: no gaps, no overlaps,
    # nothing after the last one. A header that lies about its offsets is refused here.
    expected = 0
    for begin, stop, name in sorted(spans):
        if begin != expected:
            raise UserError(
                f"{path}: safetensors header lies about the offsets of {name!r} (starts at "
                f"{begin}, expected {expected}); re-download the file"
            )
        expected = stop
    if 8 + n + expected != size:
        raise UserError(
            f"{path}: safetensors file has {size - 8 - n - expected} bytes its header does not "
            "describe; re-download it"
        )
    return raw, header


# Bytes per element of the safetensors dtypes (sub-byte and unknown dtypes are not size-checked).
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}


def _tensor_span(path: Path | str, name: str, info: Any) -> tuple[int, int]:
    """(begin, end) of tensor ``name``'s bytes, checked against its dtype and shape."""
    bad = UserError(f"{path}: damaged safetensors header at {name!r}; re-download it")
    if not isinstance(info, dict):
        raise bad
    offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or not isinstance(shape, list)
        or not all(type(d) is int and d >= 0 for d in shape)
        or not isinstance(dtype, str)
    ):
        raise bad
    begin, stop = offsets
    itemsize = _DTYPE_BYTES.get(dtype)
    want = None if itemsize is None else itemsize * _prod(shape)
    if stop < begin:
        raise bad
    if want is not None and stop - begin != want:
        raise UserError(
            f"{path}: safetensors header lies about {name!r}: {dtype} {shape} needs {want} bytes, "
            f"its offsets give {stop - begin}; re-download the file"
        )
    return begin, stop


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _plain_file_name(value: Any, index: Path) -> str:
    if (
        not isinstance(value, str)
        or not value
        or value in (".", "..")
        or "/" in value
        or "\\" in value
        or "\0" in value
        or Path(value).name != value
    ):
        raise UserError(
            f"{index}: shard name {value!r} is not a plain file name in the model folder; "
            f"fix weight_map in {INDEX_FILE}"
        )
    return value


class Checkpoint:
    """A local Hugging Face checkpoint (config.json + safetensors), validated when opened.

    Attributes: ``path`` (the folder), ``config`` (transformers config, attention set to SDPA, or
    eager where the family soft-caps attention),
    ``arch`` (:class:`~neuqi.model.architectures.ArchSpec`).
    """

    path: Path
    config: Any
    arch: ArchSpec

    def __init__(
        self,
        path: Path,
        config: Any,
        arch: ArchSpec,
        weight_map: dict[str, str],
        headers: dict[str, dict[str, Any]],
        header_hashes: dict[str, str],
        remote: Remote | None = None,
    ) -> None:
        self.path = path
        self.remote = remote  # the shards are read from there (path: the small files' copy)
        self.config = config
        self.arch = arch
        self._weight_map = weight_map
        self._headers = headers
        self._header_hashes = header_hashes
        self._raw_sizes: dict[str, int] = {}  # each shard's header length (set by open)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, remote: Remote | None = None) -> Checkpoint:
        """Open and validate a model folder; every problem found is a one-line UserError.
        ``remote``: the folder on object storage whose small files ``path`` holds a copy of
        (:func:`open_model`); its shards are read there."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise UserError(f"{path}: model folder does not exist")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError(f"{config_file}: missing; the model folder needs its config.json")
        try:
            raw_config = json.loads(config_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{config_file}: not valid JSON ({e})") from None
        if not isinstance(raw_config, dict):
            raise UserError(f"{config_file}: not a JSON object")
        try:
            arch = arch_for(raw_config)
        except UserError as e:
            raise UserError(f"{path}/{e}") from None
        check_path_fields(path)  # before transformers opens any file the folder names
        config = _load_config(path)
        arch = arch_for(config)  # the parsed config may add keys (e.g. MoE defaults)
        config._attn_implementation = arch.attn_implementation(config)  # eager to soft-cap

        weight_map = _weight_map(path, remote)
        arch = arch.for_names(weight_map)  # the MoE block as the checkpoint names it (Mixtral)
        headers: dict[str, dict[str, Any]] = {}
        hashes: dict[str, str] = {}
        sizes: dict[str, int] = {}  # each shard's header length: its data starts at 8 + this
        for shard in sorted(set(weight_map.values())):
            raw, header = _read_header(shard, remote) if remote else _read_header(path / shard)
            headers[shard] = header
            hashes[shard] = hashlib.sha256(raw).hexdigest()
            sizes[shard] = len(raw)
            if remote is None:
                _check_safe_open(path / shard)
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise UserError(
                    f"{path / INDEX_FILE}: tensor {name} is mapped to {shard}, which does not "
                    f"contain it; fix the index or re-download the checkpoint"
                )
        ckpt = cls(path, config, arch, weight_map, headers, hashes, remote)
        ckpt._raw_sizes = sizes
        ckpt._check_complete()
        return ckpt

    def _check_complete(self) -> None:
        """Embedding, final norm, head and every layer's linear weights are present."""
        needed = [self.arch.embed, self.arch.final_norm, self.lm_head_name]
        for i in range(self.layer_count):
            needed += [f"{self.arch.layer_prefix(i)}{n}.weight" for n in self.arch.linears_of(i)]
        for name in needed:
            if name not in self._weight_map:
                raise UserError(
                    f"{self.path}: tensor {name} is missing from the checkpoint; it does not match "
                    f"config.json (num_hidden_layers={self.layer_count})"
                )

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> list[str]:
        """All tensor names of the causal model, sorted; an FP8 weight's block scales
        (``weight_scale_inv``) are part of its weight (:meth:`read` dequantizes it), not names of
        their own. Tensors of decoder layers past ``num_hidden_layers`` (:attr:`beyond_layers`)
        are not part of it."""
        beyond = set(self.beyond_layers)
        return sorted(n for n in self._weight_map if not self._is_fp8_scale(n) and n not in beyond)

    @functools.cached_property
    def beyond_layers(self) -> list[str]:
        """Tensors of decoder layers numbered ``num_hidden_layers`` and up: DeepSeek-V3's
        multi-token-prediction layer (``model.layers.61.*``, ``num_nextn_predict_layers``), which
        the causal model does not run and transformers ignores on load. Left out of the output."""
        prefix = self.arch.layers_prefix + "."
        out = []
        for name in self._weight_map:
            if name.startswith(prefix):
                index = name[len(prefix):].split(".", 1)[0]
                if index.isdigit() and int(index) >= self.layer_count:
                    out.append(name)
        return sorted(out)

    def _is_fp8_scale(self, name: str) -> bool:
        return name.endswith(FP8_SCALE) and name[: -len(FP8_SCALE)] + "weight" in self._weight_map

    def fp8_scale_of(self, name: str) -> str | None:
        """The block-scale tensor of FP8 weight ``name`` (DeepSeek-V3's checkpoints), else None."""
        if not name.endswith(".weight") or not self.stored_dtype(name).startswith("F8_"):
            return None
        scale = name[: -len("weight")] + FP8_SCALE
        return scale if scale in self._weight_map else None

    def has(self, name: str) -> bool:
        """Whether tensor ``name`` is in the checkpoint."""
        return name in self._weight_map

    @property
    def layer_count(self) -> int:
        """Number of decoder layers (``config.num_hidden_layers``)."""
        return int(self.config.num_hidden_layers)

    @property
    def shards(self) -> list[str]:
        """Safetensors file names, sorted."""
        return sorted(self._headers)

    @property
    def lm_head_name(self) -> str:
        """Tensor holding the output projection: ``lm_head.weight``, or the embedding when tied."""
        if self.has(self.arch.lm_head):
            return self.arch.lm_head
        if getattr(self.config, "tie_word_embeddings", False):
            return self.arch.embed
        return self.arch.lm_head  # reported as missing by _check_complete

    def shard_of(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        return self.path / self._shard(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Stored shape of tensor ``name``, from the header (no data read)."""
        return tuple(self._headers[self._shard(name)][name]["shape"])

    def stored_dtype(self, name: str) -> str:
        """Stored safetensors dtype string of ``name`` (e.g. ``"BF16"``)."""
        return str(self._headers[self._shard(name)][name]["dtype"])

    def _shard(self, name: str) -> str:
        try:
            return self._weight_map[name]
        except KeyError:
            raise UserError(f"{self.path}: tensor {name} is not in the checkpoint") from None

    # ------------------------------------------------------------------ reading
    def read(
        self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One tensor, read alone from its shard; floating tensors cast to ``dtype`` if given."""
        if self.remote is not None:
            t = self._read_remote(name)
        else:
            from safetensors import safe_open

            with safe_open(str(self.shard_of(name)), framework="pt") as f:
                t = f.get_tensor(name)
        scale_name = self.fp8_scale_of(name)
        if scale_name is not None:
            qc = getattr(self.config, "quantization_config", None) or {}
            block = (qc.get("weight_block_size") if isinstance(qc, dict) else None) or (128, 128)
            t = _dequantize_fp8(t, self.read(scale_name), tuple(block), dtype or torch.bfloat16)
        if torch.device(device).type == "cuda":
            # through pinned (page-locked) host memory: a DMA copy at the bus's full rate, which
            # the device queues without holding up the host (torch keeps the pinned block until
            # the copy has run)
            t = t.pin_memory().to(device, non_blocking=True)
        else:
            t = t.to(device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t

    def _read_remote(self, name: str) -> torch.Tensor:
        """Tensor ``name`` by one ranged read of its bytes in its shard (never the whole shard)."""
        assert self.remote is not None
        shard = self._shard(name)
        info = self._headers[shard][name]
        begin, end = info["data_offsets"]
        base = 8 + self._raw_sizes[shard]
        data = self.remote.read(shard, base + begin, base + end) if end > begin else b""
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise UserError(f"{self.remote.show(shard)}: tensor {name} has dtype "
                            f"{info['dtype']}, which neuqi cannot read from object storage")
        flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(
            0, dtype=dtype)
        return flat.reshape(info["shape"])

    def fingerprint(self) -> str:
        """sha256 over config.json, the index (if any), each shard's name, size and header hash,
        and samples of every tensor's bytes (its first and last 4 KiB).

        Headers alone do not tell two models of one architecture apart (same names, shapes and
        offsets), so a job store resumed on other weights would mix two models; the samples
        catch that while reading a few KiB per tensor, not the whole checkpoint.
        """
        h = hashlib.sha256()
        h.update(b"config.json\0" + (self.path / "config.json").read_bytes())
        index = self.path / INDEX_FILE
        if self.remote is not None:
            if self.remote.is_file(INDEX_FILE):
                h.update(b"\0" + INDEX_FILE.encode() + b"\0" + self.remote.read(INDEX_FILE))
        elif index.is_file():
            h.update(b"\0" + INDEX_FILE.encode() + b"\0" + index.read_bytes())
        for shard in self.shards:
            size = (self.remote.size(shard) if self.remote is not None
                    else (self.path / shard).stat().st_size)
            h.update(f"\0{shard}\0{size}\0{self._header_hashes[shard]}".encode())
            h.update(self._data_samples(shard))
        return h.hexdigest()

    def _data_samples(self, shard: str, block: int = 4096) -> bytes:
        """The first and last ``block`` bytes of each tensor of ``shard``, in offset order."""
        header = self._headers[shard]
        spans = sorted(
            tuple(info["data_offsets"]) for name, info in header.items() if name != "__metadata__"
        )
        if self.remote is not None:  # the same bytes, two ranged reads a tensor
            base, parts = 8 + self._raw_sizes[shard], []
            for begin, end in spans:
                parts.append(self.remote.read(shard, base + begin,
                                              base + min(end, begin + block)))
                if end - begin > block:
                    tail = max(begin + block, end - block)
                    parts.append(self.remote.read(shard, base + tail, base + end))
            return hashlib.sha256(b"".join(parts)).digest()
        with (self.path / shard).open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            base = 8 + n
            parts = []
            for begin, end in spans:
                f.seek(base + begin)
                parts.append(f.read(min(block, end - begin)))
                if end - begin > block:
                    f.seek(base + max(begin + block, end - block))
                    parts.append(f.read(end - max(begin + block, end - block)))
        return hashlib.sha256(b"".join(parts)).digest()

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self.path)!r}, model_type={self.config.model_type!r}, "
            f"layers={self.layer_count}, shards={len(self._headers)})"
        )


FP8_SCALE = "weight_scale_inv"


def _dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, ...],
                    dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale_inv`` per ``block`` (``scale_inv [ceil(out/bo), ceil(in/bi)]``), one
    block row at a time, so only one block row is ever held in float32 beside the FP8 tensor."""
    out_f, in_f = weight.shape
    bo, bi = int(block[0]), int(block[1])
    if tuple(scale_inv.shape) != (-(-out_f // bo), -(-in_f // bi)):
        raise UserError(f"FP8 block scales of shape {tuple(scale_inv.shape)} do not match a "
                        f"{out_f}x{in_f} weight in {bo}x{bi} blocks; the checkpoint is damaged")
    out = torch.empty(out_f, in_f, dtype=dtype)
    for r, lo in enumerate(range(0, out_f, bo)):
        rows = weight[lo:lo + bo].to(torch.float32)
        scales = scale_inv[r].to(torch.float32).repeat_interleave(bi)[:in_f]
        out[lo:lo + bo] = (rows * scales).to(dtype)
    return out


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path / 'config.json'}: transformers cannot read it ({msg})") from None


def _weight_map(path: Path, remote: Remote | None = None) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or the single file; shards checked to exist."""
    if remote is not None:
        return _remote_weight_map(remote)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{index}: not valid JSON ({e})") from None
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise UserError(f"{index}: has no weight_map; re-download the checkpoint")
        for name, shard in wm.items():
            if not isinstance(name, str):
                raise UserError(f"{index}: tensor name {name!r} is not a string")
            _plain_file_name(shard, index)
        for shard in sorted(set(wm.values())):
            if not (path / shard).is_file():
                raise UserError(
                    f"{path / shard}: shard named in {INDEX_FILE} is missing; re-download it"
                )
        return dict(wm)
    single = path / SINGLE_FILE
    if single.is_file():
        _raw, header = _read_header(single)
        return {name: SINGLE_FILE for name in header if name != "__metadata__"}
    raise UserError(
        f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; neuqi reads safetensors checkpoints only"
    )


def _remote_weight_map(remote: Remote) -> dict[str, str]:
    files = set(remote.listing())
    index = remote.show(INDEX_FILE)
    if INDEX_FILE in files:
        try:
            data = json.loads(remote.read(INDEX_FILE))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{index}: not valid JSON ({e})") from None
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise UserError(f"{index}: has no weight_map; re-download the checkpoint")
        for shard in sorted(set(wm.values())):
            _plain_file_name(shard, Path(index))
            if shard not in files:
                raise UserError(f"{remote.show(shard)}: shard named in {INDEX_FILE} is missing; "
                                f"upload it")
        return {str(k): v for k, v in wm.items()}
    if SINGLE_FILE in files:
        _raw, header = _read_header(SINGLE_FILE, remote)
        return {name: SINGLE_FILE for name in header if name != "__metadata__"}
    raise UserError(f"{remote.url}: no {SINGLE_FILE} or {INDEX_FILE}; neuqi reads safetensors "
                    f"checkpoints only")


#: safetensors dtype -> torch dtype, for tensors read by byte ranges from object storage
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                 "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
for _st, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        _TORCH_DTYPES[_st] = getattr(torch, _name)


def open_model(model: str, storage_options: dict[str, Any] | None = None,
               arg: str = "MODEL") -> Checkpoint:
    """The checkpoint ``model`` names: a local folder, a built-in name or a hub id as
    :func:`resolve_model` resolves it, or a URL (``s3://bucket/model``): its small files
    (config, tokenizer; everything but ``*.safetensors`` and the index) copied once into a cache
    folder, its shards read by byte ranges from the URL with ``storage_options``."""
    if not is_url(model):
        return Checkpoint.open(resolve_model(model, arg))
    remote = Remote(model, storage_options)
    try:
        names = remote.listing()
        if "config.json" not in names:
            raise UserError(f"{arg} {remote.url}: no config.json there; give the URL of a model "
                            f"folder (config.json + safetensors)")
        cache = remote_cache(remote.url)
        for name in names:
            if name.endswith(".safetensors") or name == INDEX_FILE:
                continue
            data = remote.read(name)
            target = cache / name
            if not target.is_file() or target.read_bytes() != data:
                tmp = target.with_name(f".{name}.tmp")
                tmp.write_bytes(data)
                tmp.replace(target)
        return Checkpoint.open(cache, remote)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - unreachable, denied, no bucket: one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{arg} {remote.url}: cannot read it ({type(e).__name__}: {msg}); "
                        f"check the URL, --storage-options and the credentials") from None


def _check_safe_open(file: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - SafetensorError and OSError alike
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{file}: unreadable safetensors file ({msg}); re-download it") from None


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of the model folder ``path``; UserError (one line) if it has none usable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: no usable tokenizer in the model folder ({msg})") from None


def resolve_model(model: str, arg: str = "MODEL") -> Path:
    """A local folder as is; a built-in model's name (``smollm2``, ``gemma3-270m``) its converted
    checkpoint; anything else a hub id, downloaded.
    ``arg``: how the command's usage names the argument, for the error message."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    from neuqi.model.demo import BUILTIN, ensure_builtin

    if model in BUILTIN:
        return ensure_builtin(model)
    if not _HUB_ID.match(model) or local.exists():
        raise UserError(f"{arg} {model}: folder does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: all the same to the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{arg} {model}: no such folder, and the hub id could not be fetched ({msg}); "
            f"pass a local folder with config.json and *.safetensors"
        ) from None
