"""GGUF export of SentencePiece tokenizers (``tokenizer.ggml.model`` llama), without the network.

A tiny SentencePiece BPE model with byte fallback is trained once per module on the package's
calibration text (as LLaMA 2 / Mistral / Phi-3's: identity normalizer, a dummy prefix, digits
split; as Gemma's: no dummy prefix, Gemma's special ids and control tokens), and saved as a
transformers tokenizer folder (tokenizer.model + tokenizer.json, as the published checkpoints
ship them) beside tiny random models. Each is quantized through the real pipeline and exported;
transformers' own GGUF reader must give sentencepiece's token ids (non-ASCII text through the
byte fallback included) and the native output's logits.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import _tiny_config
from helpers import TINY, gguf_in_transformers, neuqi, one_line_error

from neuqi.formats.export import export
from neuqi.formats.loader import load_quantized
from neuqi.model.synthetic import build_from_config
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.runner import quantize

spm = pytest.importorskip("sentencepiece")

DATA = Path(__file__).resolve().parents[1] / "src" / "neuqi" / "data" / "calibration.txt.gz"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps 12345 weights, in  two  spaces\nand a new line.",
    "Größe, naïve café — 日本語のテキスト ∂x/∂t ≈ 3.14 🦙",
]
LLAMA_EXTRA = "<tool_call>"  # an added, non-special token (llama.cpp: user-defined)
GEMMA_EXTRA = "<mask>"  # added past the SentencePiece vocabulary, special (control)
SPACES = ["\u2581\u2581", "\u2581\u2581\u2581"]  # Gemma's user-defined runs of spaces
# Runs of 3+ spaces: checked with llama.cpp's algorithm only. transformers' Gemma GGUF reader
# forms them by merges of the file's order (▁▁ + ▁▁ for four), not as the longest user-defined
# token first as llama.cpp and sentencepiece do (▁▁▁ + ▁).
RUNS = "three   four    five"


def _train(folder: Path, prefix: str, **options) -> Path:
    """A SentencePiece BPE model (vocab 400, byte fallback, no normalization, digits split)
    trained on the calibration text's first 400 lines; ``options`` change the trainer's."""
    lines = gzip.decompress(DATA.read_bytes()).decode("utf-8").splitlines()
    text = folder / f"{prefix}.txt"
    text.write_text("\n".join([line for line in lines if line.strip()][:400]), encoding="utf-8")
    spm.SentencePieceTrainer.train(**{
        "input": str(text), "model_prefix": str(folder / prefix), "vocab_size": 400,
        "model_type": "bpe", "byte_fallback": True, "character_coverage": 0.99,
        "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
        "split_digits": True, "allow_whitespace_only_pieces": True, "minloglevel": 2,
        **options})
    return folder / f"{prefix}.model"


def _tokenizer_folder(model: Path, folder: Path, cls, **kwargs) -> Path:
    """``cls`` (LlamaTokenizer / GemmaTokenizer) over the model's pieces, merges in score order
    (what transformers' converter builds from tokenizer.model), saved with tokenizer.model."""
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(model))
    vocab = {sp.IdToPiece(i): i for i in range(sp.vocab_size())}
    scores = {sp.IdToPiece(i): sp.GetScore(i) for i in range(sp.vocab_size())}
    tok = cls(vocab=vocab, merges=generate_merges(vocab, scores), **kwargs)
    tok.save_pretrained(str(folder))
    shutil.copyfile(model, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer

    root = tmp_path_factory.mktemp("spm")
    llama = _train(root, "llama", add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    gemma = _train(root, "gemma", add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                   pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                   control_symbols=["<start_of_turn>", "<end_of_turn>"],
                   user_defined_symbols=SPACES)
    out = {"llama": _tokenizer_folder(llama, root / "llama-tok", LlamaTokenizer, legacy=False,
                                    add_bos_token=True, add_eos_token=False),
           "gemma": _tokenizer_folder(gemma, root / "gemma-tok", GemmaTokenizer,
                                    add_bos_token=True, add_eos_token=False)}
    tok = AutoTokenizer.from_pretrained(out["llama"])
    tok.add_tokens([LLAMA_EXTRA])
    tok.save_pretrained(str(out["llama"]))
    tok = AutoTokenizer.from_pretrained(out["gemma"])
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.add_tokens([GEMMA_EXTRA], special_tokens=True)
    tok.add_tokens([AddedToken(t, normalized=True, special=False) for t in SPACES])
    tok.save_pretrained(str(out["gemma"]))
    # the fixture's own check: transformers' tokenizer is the SentencePiece model's
    for name, model in (("llama", llama), ("gemma", gemma)):
        sp = spm.SentencePieceProcessor(model_file=str(model))
        tok = AutoTokenizer.from_pretrained(out[name])
        for text in SENTENCES:
            assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), name
    return out


def _llama_cpp_spm(text: str, tokens: list[str], scores: list[float], types: list[int],
                   prefix: bool) -> list[int]:
    """llama.cpp's tokenizer of a ``llama`` vocabulary (llama_vocab::tokenize, SPM): the text is
    cut at its user-defined tokens (longest first, matched in the raw text); each other fragment
    is space-prefixed if ``prefix`` and it is the first or follows such a token, its spaces
    written ``▁``, and merged (:func:`_spm_merge`)."""
    user = sorted((t for t, k in zip(tokens, types, strict=True) if k == 4), key=len, reverse=True)
    fragments: list[str | int] = [text]
    for token in user:
        cut: list[str | int] = []
        for f in fragments:
            if isinstance(f, int):
                cut.append(f)
                continue
            for j, part in enumerate(f.split(token)):
                if j:
                    cut.append(tokens.index(token))
                if part:
                    cut.append(part)
        fragments = cut
    out: list[int] = []
    after_token = True
    for f in fragments:
        if isinstance(f, int):
            out.append(f)
        else:
            out += _spm_merge(((" " if prefix and after_token else "") + f).replace(" ", "\u2581"),
                              tokens, scores)
        after_token = isinstance(f, int)
    return out


def _spm_merge(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llm_tokenizer_spm_session: ``text`` cut into characters; the adjacent pair whose joined
    text is a token of the highest score (the leftmost on a tie) is merged until none is; a
    symbol that is no token is cut back along its merges, down to byte tokens."""
    import heapq

    ids = {t: i for i, t in enumerate(tokens)}
    symbols: list[str | None] = list(text)
    prev, nxt = list(range(-1, len(symbols) - 1)), list(range(1, len(symbols) + 1))
    queue: list[tuple[float, int, int, int, str]] = []
    split: dict[str, tuple[str, str]] = {}

    def pair(left: int, right: int) -> None:
        if left < 0 or right >= len(symbols):
            return
        joined = symbols[left] + symbols[right]
        if joined in ids:
            heapq.heappush(queue, (-scores[ids[joined]], left, right, len(joined), joined))
            split[joined] = (symbols[left], symbols[right])

    for i in range(1, len(symbols)):
        pair(i - 1, i)
    while queue:
        _, left, right, size, joined = heapq.heappop(queue)
        if symbols[left] is None or symbols[right] is None or (
                len(symbols[left]) + len(symbols[right]) != size):
            continue  # stale
        symbols[left], symbols[right] = joined, None
        nxt[left] = nxt[right]
        if nxt[right] < len(symbols):
            prev[nxt[right]] = left
        pair(prev[left], left)
        pair(left, nxt[left])
    out: list[int] = []

    def emit(piece: str) -> None:
        if piece in ids:
            out.append(ids[piece])
        elif piece in split:
            emit(split[piece][0])
            emit(split[piece][1])
        else:
            out.extend(ids[f"<0x{b:02X}>"] for b in piece.encode("utf-8"))

    i = 0
    while i < len(symbols):
        emit(symbols[i])
        i = nxt[i]
    return out


FAMILIES = {
    # sliding_window None as Mistral-7B v0.2 / v0.3 ship it (llama.cpp's llama has no window)
    "mistral": ("llama", {"sliding_window": None}),
    "gemma2": ("gemma", {"head_dim": 16, "tie_word_embeddings": True, "sliding_window": 8,
                         "query_pre_attn_scalar": 16, "num_hidden_layers": 2,
                         "layer_types": ["sliding_attention", "full_attention"],
                         "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}),
    "phi3": ("llama", {"partial_rotary_factor": 0.5, "num_hidden_layers": 2,
                       "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_writes_the_sentencepiece_vocabulary_that_transformers_reads_back(
    family: str, tokenizers: dict[str, Path], tmp_path: Path
):
    """tokenizer.model is carried into the output; the GGUF holds llama.cpp's ``llama``
    vocabulary (tokenizer.model's pieces, scores and types, the added tokens, the special ids);
    transformers' GGUF reader tokenizes as sentencepiece does and gives the native logits."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    kind, overrides = FAMILIES[family]
    model = build_from_config(tmp_path / "model", _tiny_config(family, **overrides),
                              tokenizer_dir=tokenizers[kind])
    out = quantize(QuantizeConfig(model=str(model), out=str(tmp_path / "out"), nsamples=4,
                                  seqlen=32, batch_size=3, bits=4, group_size=32,
                                  method="neuqi"), None, "cpu")
    assert (out / "tokenizer.model").read_bytes() == (model / "tokenizer.model").read_bytes()
    file = tmp_path / "gguf" / "m.gguf"
    file.parent.mkdir()
    export(out, "gguf", file)

    fields = {k: f.contents() for k, f in GGUFReader(file).fields.items()}
    sp = spm.SentencePieceProcessor(model_file=str(model / "tokenizer.model"))
    assert fields["tokenizer.ggml.model"] == "llama"
    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    types = fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == 512  # the model's vocab_size
    # the pieces; Gemma's user-defined runs of spaces written as spaces (llama.cpp matches
    # user-defined tokens in the raw text)
    pieces = [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    assert tokens[:sp.vocab_size()] == [p.replace("\u2581", " ") if p in SPACES else p
                                        for p in pieces]
    regular = [i for i in range(sp.vocab_size())
               if not sp.IsControl(i) and not sp.IsUnknown(i) and pieces[i] not in SPACES]
    assert [scores[i] for i in regular] == pytest.approx([sp.GetScore(i) for i in regular])
    assert types[sp.PieceToId("<0x41>")] == 6  # byte
    # <unk>, <s>, </s>: control (tokenizer_config.json's added_tokens_decoder marks them special)
    assert {types[sp.unk_id()], types[sp.bos_id()], types[sp.eos_id()]} == {3}
    assert fields["tokenizer.ggml.bos_token_id"] == sp.bos_id()
    assert fields["tokenizer.ggml.eos_token_id"] == sp.eos_id()
    assert fields["tokenizer.ggml.add_space_prefix"] is (kind == "llama")
    if kind == "llama":
        assert types[tokens.index(LLAMA_EXTRA)] == 4  # user-defined
    else:
        assert types[tokens.index(GEMMA_EXTRA)] == 3 and tokens.index(GEMMA_EXTRA) >= 400
        assert types[sp.PieceToId("<start_of_turn>")] == 3
        assert [types[pieces.index(p)] for p in SPACES] == [4, 4]  # user-defined
    assert tokens[-1] == "[PAD511]" and types[-1] == 5
    prefix = fields["tokenizer.ggml.add_space_prefix"]
    for text in [*SENTENCES, RUNS]:  # llama.cpp's own algorithm over the file's tokens, scores
        assert _llama_cpp_spm(text, tokens, scores, types, prefix) == sp.encode(text), text

    theirs = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    mine = AutoTokenizer.from_pretrained(out)
    for text in SENTENCES:
        ids = sp.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text
        assert mine(text, add_special_tokens=False)["input_ids"] == ids, text
        assert theirs(text)["input_ids"] == mine(text)["input_ids"], text  # bos as the model's
    # an added token is matched whole (the text after it may be prefixed differently: llama.cpp,
    # and transformers' Phi-3 reader, restart the space prefix after it)
    extra = LLAMA_EXTRA if kind == "llama" else GEMMA_EXTRA
    text = f"call {extra} now"
    assert mine.convert_tokens_to_ids(extra) in theirs(text)["input_ids"]
    assert theirs(text)["input_ids"][:4] == mine(text)["input_ids"][:4]

    ids = torch.tensor([sp.encode(SENTENCES[2])[:24]])
    with torch.no_grad():
        got, ours = gguf_in_transformers(file)(ids).logits, load_quantized(out)(ids).logits
    assert (got - ours).abs().max() < 0.05 * ours.abs().max()


def _without(folder: Path, to: Path, name: str) -> Path:
    shutil.copytree(folder, to)
    (to / name).unlink()
    return to


def test_gguf_refuses_a_sentencepiece_tokenizer_without_tokenizer_model(
    tokenizers: dict[str, Path], tmp_path: Path
):
    """tokenizer.json alone (byte-fallback BPE) has no scores: llama.cpp's converter writes -1000
    for every token (LlamaHfVocab) and llama.cpp would merge in another order; refused in one
    line naming tokenizer.model, by quantize --format gguf before any work."""
    model = build_from_config(tmp_path / "m", _tiny_config("mistral"),
                              tokenizer_dir=tokenizers["llama"])
    bare = _without(model, tmp_path / "bare", "tokenizer.model")
    line = one_line_error(neuqi("quantize", str(bare), "--out", str(tmp_path / "q"), "--bits",
                                "4", "--group-size", "32", *TINY, "--format", "gguf"))
    assert str(bare / "tokenizer.json") in line and "tokenizer.model" in line
    assert "byte_fallback" in line and not (tmp_path / "q").exists()
    # why: llama.cpp's algorithm over those placeholder scores is not the tokenizer (over the
    # scores of tokenizer.model it is, test above)
    vocab = json.loads((bare / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    sp = spm.SentencePieceProcessor(model_file=str(model / "tokenizer.model"))
    assert any(_spm_merge(f" {t}".replace(" ", "\u2581"), tokens, [-1000.0] * len(tokens))
               != sp.encode(t)
               for t in SENTENCES)


def test_gguf_refuses_sentencepiece_models_llama_cpp_would_tokenize_otherwise(
    tokenizers: dict[str, Path], tmp_path: Path
):
    """A Unigram model, a normalizing one (nmt_nfkc) and a tokenizer.model that is not the
    tokenizer.json's are refused in one line naming the file."""
    from neuqi.formats.export.gguf import check_tokenizer
    from neuqi.util.errors import UserError

    why = {"unigram": "UNIGRAM", "nfkc": "nmt_nfkc", "spaces": "remove_extra_whitespaces"}
    for name, options in (("unigram", {"model_type": "unigram"}),
                          ("nfkc", {"normalization_rule_name": "nmt_nfkc"}),
                          ("spaces", {"remove_extra_whitespaces": True})):
        folder = tmp_path / name
        shutil.copytree(tokenizers["llama"], folder)
        shutil.copyfile(_train(tmp_path, name, **options), folder / "tokenizer.model")
        with pytest.raises(UserError) as e:
            check_tokenizer(folder)
        line = str(e.value)
        assert "\n" not in line and str(folder / "tokenizer.model") in line
        assert why[name] in line
    folder = tmp_path / "mixed"
    shutil.copytree(tokenizers["llama"], folder)
    shutil.copyfile(tokenizers["gemma"] / "tokenizer.model", folder / "tokenizer.model")
    with pytest.raises(UserError, match="is not token .* of the tokenizer.json"):
        check_tokenizer(folder)
    tj = json.loads((tokenizers["llama"] / "tokenizer.json").read_text())
    assert tj["model"]["byte_fallback"] is True


def test_gguf_without_the_sentencepiece_package_is_one_line_naming_the_extra(
    tokenizers: dict[str, Path], tmp_path: Path
):
    """Without sentencepiece installed (an import that fails, as where it is not), quantize
    --format gguf of a SentencePiece model says how to install it, before any work."""
    model = build_from_config(tmp_path / "m", _tiny_config("mistral"),
                              tokenizer_dir=tokenizers["llama"])
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sentencepiece.py").write_text("raise ImportError('blocked by the test')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    line = one_line_error(neuqi("quantize", str(model), "--out", str(tmp_path / "q"), "--bits",
                                "4", "--group-size", "32", *TINY, "--format", "gguf", env=env))
    assert str(model / "tokenizer.model") in line and "pip install 'neuqi[export]'" in line
    assert not (tmp_path / "q").exists()
