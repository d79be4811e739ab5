"""Model folders are data: no field of their JSON files may name a file outside the folder.

transformers opens some files named in ``tokenizer_config.json`` / ``config.json`` (``vocab_file``,
``tokenizer_file``, ``merges_file``, ...). A downloaded model must not make neuqi read (or copy into
its output) a file elsewhere on the machine, so every such field is checked when the folder is
opened: its value must be a plain file name (no folder part, no ``..``, not absolute).

Weights are read only from safetensors files (no pickle: no ``torch.load``, no ``*.bin``), and
tokenizers and configs are loaded without ``trust_remote_code``, so no code of the model runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neuqi.util.errors import UserError

__all__ = ["JSON_FILES", "check_path_fields"]

#: The JSON files of a model folder that neuqi (through transformers) reads.
JSON_FILES = (
    "config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "preprocessor_config.json",
)
_PATH_KEY_SUFFIXES = ("_file", "_files", "_filename", "_dir", "_directory", "_folder")


def _is_plain_name(value: str) -> bool:
    return (
        bool(value)
        and value not in (".", "..")
        and "/" not in value
        and "\\" not in value
        and "\0" not in value
        and ":" not in value  # drive letters, URLs
    )


def _walk(node: Any, where: str) -> list[tuple[str, Any]]:
    """(dotted key, value) of every field whose key says it names a file or folder."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and key.lower().endswith(_PATH_KEY_SUFFIXES):
                found.append((here, value))
            found += _walk(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _walk(value, f"{where}[{i}]")
    return found


def check_path_fields(folder: Path) -> None:
    """UserError unless every file-naming field of the folder's JSON files is a plain file name."""
    for name in JSON_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # reported by whoever reads the file for its content
        for key, value in _walk(data, ""):
            values = value if isinstance(value, list) else [value]
            for v in values:
                if v is None or (isinstance(v, str) and _is_plain_name(v)):
                    continue
                raise UserError(
                    f"{path}: field {key} = {v!r} names a file outside the model folder; neuqi "
                    "reads only files inside it: remove the field or give a plain file name"
                )
