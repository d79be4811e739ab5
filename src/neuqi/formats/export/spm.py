"""A SentencePiece tokenizer as llama.cpp's ``llama`` vocabulary (``tokenizer.ggml.model`` llama).

What ``convert_hf_to_gguf.py`` writes for the LLaMA 2 / Mistral / Mixtral / Gemma 2-3 / Phi-3
checkpoints (``_create_vocab_sentencepiece``): the pieces of ``tokenizer.model`` with their scores
and types (normal, unknown, control, unused, byte), then the added tokens of added_tokens.json,
tokenizer_config.json's ``added_tokens_decoder`` and tokenizer.json's ``added_tokens`` (score
-1000; control when special or when they look special, else user-defined with ``▁`` written as a
space, as llama.cpp matches them in the raw text), ``[PAD{i}]`` up to the model's vocab_size.

llama.cpp's tokenizer for this vocabulary is SentencePiece's BPE: it splits the text (spaces as
``▁``, a ``▁`` prepended if ``add_space_prefix``) into characters, byte tokens for the ones not in
the vocabulary, and merges the adjacent pair whose merged piece has the highest score. That is
the model's own tokenization only when the model is a BPE model with no normalization beyond the
space escape; anything else is refused in one line (:func:`check_model`), as is a tokenizer.json
whose vocabulary is not the one of tokenizer.model.

The ``tokenizer.model`` file is a protobuf (``ModelProto``); the few fields checked are read with
the small reader below (no protobuf package needed). The pieces, scores and types are read with
the ``sentencepiece`` package (``pip install 'neuqi[export]'``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuqi.util.errors import UserError

# gguf.TokenType / SentencePiece piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


# ------------------------------------------------------------------------------ tokenizer.model
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """The (field number, value) pairs of one protobuf message (varints as int, the rest bytes)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield num, value
            continue
        if wire == 2:
            size, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")
        if i + size > len(buf):
            raise ValueError("truncated field")
        yield num, buf[i:i + size]
        i += size


@dataclass(frozen=True)
class SpmSpec:
    """What tokenizer.model's trainer and normalizer specs say (sentencepiece_model.proto)."""

    model_type: str  # TrainerSpec.model_type (3), default UNIGRAM
    normalizer: str  # NormalizerSpec.name (1)
    add_dummy_prefix: bool  # NormalizerSpec.add_dummy_prefix (3), default true
    remove_extra_whitespaces: bool  # NormalizerSpec.remove_extra_whitespaces (4), default true
    precompiled: bool  # NormalizerSpec.precompiled_charsmap (2) not empty


def read_spec(path: Path) -> SpmSpec:
    try:
        top = {num: value for num, value in _fields(path.read_bytes()) if num in (2, 3)}
        trainer = dict(_fields(top.get(2, b"")))  # type: ignore[arg-type]
        norm = dict(_fields(top.get(3, b"")))  # type: ignore[arg-type]
        name = norm.get(1, b"")
        return SpmSpec(
            model_type=_MODEL_TYPES.get(int(trainer.get(3, 1)), str(trainer.get(3))),
            normalizer=bytes(name).decode("utf-8") if isinstance(name, bytes) else "",
            add_dummy_prefix=bool(norm.get(3, 1)),
            remove_extra_whitespaces=bool(norm.get(4, 1)),
            precompiled=bool(norm.get(2, b"")),
        )
    except (ValueError, TypeError, UnicodeDecodeError, OSError):
        raise UserError(f"{path}: not a SentencePiece model (unreadable protobuf)") from None


def processor(path: Path) -> Any:
    """The ``sentencepiece`` processor of ``path``; UserError (one line) if the package is missing."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UserError(f"{path}: the GGUF export reads SentencePiece tokenizers with the "
                        f"sentencepiece package, which is not installed; pip install "
                        f"'neuqi[export]'") from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError):
        raise UserError(f"{path}: not a SentencePiece model (sentencepiece cannot load it)") from None
    return sp


def check_model(path: Path, tokenizer_json: dict[str, Any] | None) -> Any:
    """UserError (one line) unless llama.cpp's ``llama`` vocabulary tokenizes as ``path`` does;
    the sentencepiece processor otherwise."""
    spec = read_spec(path)
    why = None
    if spec.model_type != "BPE":
        why = (f"a {spec.model_type} model (llama.cpp's SentencePiece vocabulary merges pieces by "
               f"score, as a BPE model does, not by a {spec.model_type.lower()} segmentation)")
    elif spec.normalizer not in ("identity", "") or spec.precompiled:
        why = (f"normalizer {spec.normalizer!r} (llama.cpp applies none, only the space escape)")
    elif spec.remove_extra_whitespaces:
        why = "remove_extra_whitespaces (llama.cpp keeps every space)"
    if why:
        raise UserError(f"{path}: {why}; no GGUF export that llama.cpp would tokenize as this "
                        f"model does; use --format compressed-tensors")
    sp = processor(path)
    if tokenizer_json:
        vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
        pieces = (dict(vocab) if isinstance(vocab, dict)
                  else {p[0]: i for i, p in enumerate(vocab)})  # Unigram: [[piece, score], ...]
        differ = [i for i in range(sp.vocab_size()) if pieces.get(sp.IdToPiece(i), i) != i]
        if differ:
            i = differ[0]
            raise UserError(f"{path}: piece {i} {sp.IdToPiece(i)!r} is not token {i} of the "
                            f"tokenizer.json beside it ({len(differ)} pieces differ); the GGUF "
                            f"export needs the tokenizer.model of this tokenizer")
    return sp


# ------------------------------------------------------------------------------ the vocabulary
def looks_special(token: str) -> bool:
    """convert_hf_to_gguf's ``does_token_look_special``: added tokens some models do not mark
    special but that are (Gemma's ``<unused..>``, ``<mask>``, ``<|...|>``)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: unreadable JSON") from None


def _added_tokens(folder: Path) -> list[tuple[int, str, bool | None]]:
    """(id, content, special) of the added tokens, in the converter's order: added_tokens.json
    (special unknown: None), tokenizer_config.json's added_tokens_decoder, tokenizer.json's
    added_tokens (a later entry for an id replaces an earlier one)."""
    out: list[tuple[int, str, bool | None]] = []
    for content, i in (_json(folder / "added_tokens.json") or {}).items():
        out.append((int(i), str(content), None))
    decoder = (_json(folder / "tokenizer_config.json") or {}).get("added_tokens_decoder") or {}
    for i, data in decoder.items():
        out.append((int(i), str(data["content"]), bool(data.get("special"))))
    for data in (_json(folder / "tokenizer.json") or {}).get("added_tokens") or []:
        out.append((int(data["id"]), str(data["content"]), bool(data.get("special"))))
    return out


def vocabulary(folder: Path, sp: Any, vocab_size: int
               ) -> tuple[list[bytes], list[float], list[int], list[str]]:
    """Tokens, scores and types of ``vocab_size`` entries, and notes (added tokens ignored)."""
    n = sp.vocab_size()
    if n > vocab_size:
        raise UserError(f"{folder / 'tokenizer.model'}: {n} pieces, more than the model's "
                        f"vocab_size {vocab_size}; not this model's tokenizer")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(n):
        kind = NORMAL
        if sp.IsUnknown(i):
            kind = UNKNOWN
        elif sp.IsControl(i):
            kind = CONTROL
        elif sp.IsUnused(i):
            kind = UNUSED
        elif sp.IsByte(i):
            kind = BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), kind
    notes: list[str] = []
    for i, content, special in _added_tokens(folder):
        if not 0 <= i < vocab_size:
            notes.append(f"warning: added token {content!r} (id {i}) is past the model's "
                         f"vocab_size {vocab_size}; not written (as convert_hf_to_gguf.py)")
            continue
        if special is None:  # added_tokens.json: user-defined
            kind = USER_DEFINED
        elif special or looks_special(content):
            kind = CONTROL
        else:
            kind = USER_DEFINED
        if kind == USER_DEFINED:
            content = content.replace("\u2581", " ")  # llama.cpp matches them in the raw text
        tokens[i], scores[i], types[i] = content.encode("utf-8"), -1000.0, kind
    return tokens, scores, types, notes
