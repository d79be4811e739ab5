"""Calibration data: load text (shipped, files, records, datasets) and cut seeded token windows."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import re
import socket
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from neuqi.util.errors import UserError

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


#: Files read as records (one text per record, in the field ``--calib-field``).
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
#: Characters of a streamed hub dataset per calibration token needed (``hf:`` sources): twice
#: what English text takes per token, so windows are still drawn from more text than they cover.
HUB_CHARS_PER_TOKEN = 8
_SOURCES = (
    "a .txt file, a folder of .txt files, a .jsonl/.json/.parquet file (with --calib-field), a "
    "datasets save_to_disk folder, or hf:NAME[:CONFIG][:SPLIT]"
)


def load_calibration_text(
    source: str | Path | None, *, field: str = "text", max_chars: int | None = None
) -> str:
    """Return the calibration text from what a user has at hand.

    ``source`` is one of: ``None`` (the shipped text, Pride and Prejudice); a text file (UTF-8);
    a folder of ``*.txt`` files (not recursive, sorted by name); a ``.jsonl``, ``.json`` (a list
    of records) or ``.parquet`` file, or a folder written by ``datasets.Dataset.save_to_disk``,
    whose records' ``field`` holds the text; or ``hf:NAME[:CONFIG][:SPLIT]``, a dataset of the
    hub read through ``datasets`` in streaming mode, stopping after ``max_chars`` characters.
    Texts of several files or records are joined with ``"\n\n"``. Raises UserError for anything
    that cannot be read, in one line naming the source and what to pass instead.
    """
    if source is None:
        return _shipped_text()
    text = str(source)
    if text.startswith("hf:"):
        return _hub_text(text, field, max_chars)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _join(_disk_dataset_texts(path, field), path)
        files = sorted((p for p in path.glob("*.txt") if p.is_file()), key=lambda p: p.name)
        if not files:
            raise UserError(f"--calib {path} is a folder without *.txt files: pass {_SOURCES}")
        return "\n\n".join(read_text_file(p) for p in files)
    if path.is_file():
        if path.suffix.lower() in RECORD_SUFFIXES:
            return _join(_record_texts(path, field), path)
        return read_text_file(path)
    if path.exists():
        raise UserError(f"--calib {path} is not a regular file or folder: pass {_SOURCES}")
    if _HUB_ID.match(path.as_posix()):
        raise UserError(
            f"--calib {path} does not exist; for a dataset of the hub write hf:{path} "
            "(it needs the network or the local datasets cache)"
        )
    raise UserError(f"--calib {path} does not exist: pass {_SOURCES}")


def stored_source(source: str | Path | None) -> str | None:
    """``--calib`` as a job records it: a local path made absolute (so a resume works from any
    folder), an ``hf:`` source as given."""
    if source is None:
        return None
    text = str(source)
    return text if text.startswith("hf:") else str(Path(text).expanduser().resolve())


def hub_max_chars(nsamples: int, seqlen: int) -> int:
    """How much of a streamed ``hf:`` dataset a run reads."""
    return nsamples * seqlen * HUB_CHARS_PER_TOKEN


def _join(texts: list[str], source: Path | str) -> str:
    if not any(t.strip() for t in texts):
        raise UserError(f"--calib {source} holds no text: its records are empty")
    return "\n\n".join(texts)


def _field_texts(rows: Any, field: str, source: Path | str, columns: list[str]) -> list[str]:
    """The ``field`` of every row (dicts); UserError naming ``--calib-field`` if it is missing
    or not text."""
    if field not in columns:
        shown = ", ".join(columns[:12]) or "none"
        raise UserError(
            f"--calib {source} has no field {field!r} (fields: {shown}): "
            "name the text field with --calib-field"
        )
    texts = []
    for row in rows:
        value = row.get(field) if isinstance(row, dict) else None
        if value is None:
            continue
        if not isinstance(value, str):
            raise UserError(
                f"--calib {source}: field {field!r} holds {type(value).__name__}, not text: "
                "name the text field with --calib-field"
            )
        texts.append(value)
    return texts


def _record_texts(path: Path, field: str) -> list[str]:
    """Texts of a ``.jsonl``, ``.json`` or ``.parquet`` file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(
                f"--calib {path}: reading parquet needs pyarrow: pip install 'neuqi[calib]'"
            ) from None
        try:
            schema = pq.read_schema(path)
            if field not in schema.names:
                return _field_texts([], field, path, list(schema.names))
            rows = pq.read_table(path, columns=[field]).to_pylist()
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise UserError(f"--calib {path} is not a readable parquet file ({exc})") from None
        return _field_texts(rows, field, path, [field])
    raw = read_text_file(path, hint="pass UTF-8 JSON")
    lines = enumerate(raw.splitlines(), 1) if suffix == ".jsonl" else [(0, raw)]
    rows = []
    for number, line in lines:
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(
                f"--calib {path} is not valid {suffix[1:].upper()} "
                f"(line {number or exc.lineno}: {exc.msg})"
            ) from None
    if suffix == ".json":
        rows = rows[0] if rows else []
    if suffix == ".json" and isinstance(rows, dict):
        # {"field": [...]} (columns) as well as [{"field": ...}, ...] (records)
        if isinstance(rows.get(field), list):
            rows = [{field: v} for v in rows[field]]
        else:
            lists = [k for k, v in rows.items() if isinstance(v, list)]
            rows = rows[lists[0]] if len(lists) == 1 else [rows]
    if not isinstance(rows, list):
        raise UserError(f"--calib {path}: expected a list of records with a {field!r} field")
    columns = sorted({k for r in rows if isinstance(r, dict) for k in r})
    return _field_texts(rows, field, path, columns)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError(
            "--calib: datasets folders and hf: sources need the datasets package: "
            "pip install 'neuqi[calib]'"
        ) from None
    return datasets


def _disk_dataset_texts(path: Path, field: str) -> list[str]:
    """Texts of a ``save_to_disk`` folder (a Dataset, or the first split of a DatasetDict)."""
    datasets = _datasets()
    try:
        data = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise UserError(f"--calib {path} is not a readable datasets folder ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        split = "train" if "train" in data else next(iter(data))
        data = data[split]
    return _field_texts(data, field, path, list(data.column_names))


def _hub_reachable() -> bool:
    """Whether the hub's host resolves (and offline mode is off): a quick answer instead of the
    retries of an unreachable download."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """huggingface_hub and datasets in offline mode (the local cache only) for the block."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _hub_text(source: str, field: str, max_chars: int | None) -> str:
    """``hf:NAME[:CONFIG][:SPLIT]``: streamed until ``max_chars`` characters are read, or read
    from the local datasets cache when the hub cannot be reached."""
    parts = source.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 3:
        raise UserError(f"--calib {source}: write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    datasets = _datasets()
    datasets.logging.set_verbosity_error()
    online = _hub_reachable()
    try:
        with contextlib.nullcontext() if online else _offline(datasets):
            rows = datasets.load_dataset(name, config, split=split, streaming=online)
            texts: list[str] = []
            total = 0
            for row in rows:
                if field not in row:
                    _field_texts([], field, source, sorted(row))
                value = row[field]
                if isinstance(value, str) and value:
                    texts.append(value)
                    total += len(value) + 2
                    if max_chars is not None and total >= max_chars:
                        break
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - unknown name, gated, not cached: one line for all
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "" if online else " (the hub cannot be reached, and it is not in the local cache)"
        raise UserError(
            f"--calib {source} could not be read{where}: {msg[:160]}; pass a local "
            ".txt/.jsonl/.parquet file or a save_to_disk folder instead"
        ) from None
    return _join(texts, source)


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


def window_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer's own rule puts before a text (Gemma's and Llama 3's
    ``<bos>``; none for SmolLM2 or Qwen), found by tokenizing a probe with and without them.

    Every window, of calibration or evaluation, starts with these, as the model saw its text in
    training (Gemma 3 270M scores 27.7 on WikiText-2 without its ``<bos>``, 19.6 with it)."""
    probe = "The quick brown fox."
    plain = list(tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"])
    k = len(full) - len(plain)
    return full[:k] if k > 0 and full[k:] == plain else []


def with_prefix(prefix: list[int], windows: torch.Tensor) -> torch.Tensor:
    """``windows [n, L]`` with the ``prefix`` tokens in front: ``[n, len(prefix) + L]``."""
    if not prefix:
        return windows
    head = torch.tensor(prefix, dtype=windows.dtype).expand(windows.shape[0], -1)
    return torch.cat([head, windows], dim=1)


def calibration_windows(
    tokenizer: Any, text: str, nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """Tokenize ``text`` once (no special tokens) and return ``sample_windows`` of it, each
    starting with the tokenizer's :func:`window_prefix` (``seqlen`` tokens in all).

    ``tokenizer`` is a Hugging Face tokenizer; ``verbose=False`` silences its warning about
    text longer than the model's maximum length. Result: int64 ``[nsamples, seqlen]`` on CPU.
    """
    _check_sizes(nsamples, seqlen)
    prefix = window_prefix(tokenizer)
    if seqlen <= len(prefix) + 1:
        raise UserError(f"--seqlen {seqlen} is too small: give {len(prefix) + 2} or more")
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)
    ids = enc["input_ids"].reshape(-1).to(torch.int64)
    return with_prefix(prefix, sample_windows(ids, nsamples, seqlen - len(prefix), seed))


def text_sha256(text: str) -> str:
    """The calibration text's identity in a job's manifest."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
