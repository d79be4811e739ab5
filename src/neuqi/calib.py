"""Calibration data: load text (shipped, a file or a folder) and cut seeded token windows."""

from __future__ import annotations

import gzip
import hashlib
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from neuqi.errors import UserError

SHIPPED_CALIBRATION = "calibration.txt.gz"
"""Name of the shipped calibration text in ``neuqi/data`` (Pride and Prejudice, gzip)."""

# "owner/name" as the hub spells dataset ids: one slash, no path-like prefix.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _shipped_text() -> str:
    """Return the calibration text shipped in ``neuqi/data`` (decompressed, UTF-8)."""
    blob = resources.files("neuqi").joinpath("data", SHIPPED_CALIBRATION).read_bytes()
    return gzip.decompress(blob).decode("utf-8")


def read_text_file(
    path: Path,
    option: str = "--calib",
    hint: str = "pass a plain-text file or a folder of .txt files",
) -> str:
    """Return ``path`` decoded as UTF-8 (a BOM dropped) with ``\\r\\n`` turned into ``\\n``.

    UserError naming ``option`` if it cannot be read or is not text.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{option} {path} cannot be read ({exc.strerror}): check the path") from exc
    msg = f"{option} {path} is not a UTF-8 text file: {hint}"
    if b"\x00" in data:
        raise UserError(msg)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(msg) from exc
    return text.replace("\r\n", "\n")


def load_calibration_text(path: Path | None) -> str:
    """Return the calibration text: shipped text, a file, or a folder's ``*.txt`` files.

    ``None`` gives the shipped text (Pride and Prejudice). A file is read as UTF-8. A folder
    gives all its ``*.txt`` files (not recursive) in sorted name order, joined with ``"\\n\\n"``.
    Raises UserError for a missing path, a non-text file, or a folder without ``*.txt`` files.
    """
    if path is None:
        return _shipped_text()
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.glob("*.txt") if p.is_file()), key=lambda p: p.name)
        if not files:
            raise UserError(
                f"--calib {path} is a folder without *.txt files: add .txt files or pass a text file"
            )
        return "\n\n".join(read_text_file(p) for p in files)
    if path.is_file():
        return read_text_file(path)
    if path.exists():
        raise UserError(f"--calib {path} is not a regular file or folder: pass a text file")
    if _HUB_ID.match(path.as_posix()):
        raise UserError(
            f"--calib {path} does not exist; datasets from the hub are not available offline: "
            "pass a text file or a folder of .txt files"
        )
    raise UserError(f"--calib {path} does not exist: pass a text file or a folder of .txt files")


def _check_sizes(nsamples: int, seqlen: int) -> None:
    """Raise UserError unless ``nsamples >= 1`` and ``seqlen >= 2``."""
    if nsamples < 1:
        raise UserError(f"--nsamples {nsamples} is too small: give 1 or more")
    if seqlen < 2:
        raise UserError(f"--seqlen {seqlen} is too small: give 2 or more")


def sample_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Return ``nsamples`` windows of ``seqlen`` tokens cut at seeded random starts.

    Starts are drawn uniformly from ``[0, T - seqlen]`` with a CPU ``torch.Generator`` seeded
    with ``seed``, so the windows are the same on every run and machine; windows may overlap.
    ``token_ids`` is 1-D; the result is int64 ``[nsamples, seqlen]`` on ``token_ids``' device.
    Raises UserError if ``T < seqlen`` or the sizes are invalid.
    """
    _check_sizes(nsamples, seqlen)
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    total = token_ids.numel()
    if total < seqlen:
        raise UserError(
            f"calibration text has {total} tokens, fewer than --seqlen {seqlen}: "
            "give a longer --calib or a smaller --seqlen"
        )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=gen, dtype=torch.int64)
    index = starts[:, None] + torch.arange(seqlen, dtype=torch.int64)[None, :]
    return token_ids.to(torch.int64)[index.to(token_ids.device)]


def calibration_windows(
    tokenizer: Any, text: str, nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """Tokenize ``text`` once (no special tokens) and return ``sample_windows`` of it.

    ``tokenizer`` is a Hugging Face tokenizer; ``verbose=False`` silences its warning about
    text longer than the model's maximum length. Result: int64 ``[nsamples, seqlen]`` on CPU.
    """
    _check_sizes(nsamples, seqlen)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)
    ids = enc["input_ids"].reshape(-1).to(torch.int64)
    return sample_windows(ids, nsamples, seqlen, seed)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
