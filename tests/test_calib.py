"""Tests for neuqi.data.calib: loading calibration text and cutting seeded token windows."""

import hashlib
import re
from pathlib import Path

import pytest
import torch

from neuqi.data.calib import calibration_windows, load_calibration_text, sample_windows
from neuqi.util.errors import UserError

# src/neuqi/data/README.md: Project Gutenberg's plain text, byte for byte
SHIPPED_SHA256 = "859c908774105fe56669e355156f2c9db0fe4ad2b6b67c068e3f8731aae55a99"


def test_shipped_text_loads_and_is_long() -> None:
    text = load_calibration_text(None)
    assert len(text) > 500_000
    assert "It is a truth universally acknowledged" in text
    assert "Project Gutenberg" in text  # licence text kept
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == SHIPPED_SHA256


def test_single_file(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes("héllo\r\nwörld\n".encode())
    assert load_calibration_text(f) == "héllo\nwörld\n"


def test_folder_joins_txt_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "0.txt").write_text("not recursive", encoding="utf-8")
    assert load_calibration_text(tmp_path) == "first\n\nsecond"


def test_folder_without_txt(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match=r"--calib .* without \*\.txt files"):
        load_calibration_text(tmp_path)


@pytest.mark.parametrize("blob", [b"text\x00with nul", b"\xff\xfe\xfa bad utf-8"])
def test_non_text_file_names_the_file(tmp_path: Path, blob: bytes) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(blob)
    with pytest.raises(UserError) as info:
        load_calibration_text(f)
    assert str(info.value).startswith(f"--calib {f} is not a UTF-8 text file")


def test_non_text_file_in_folder_names_that_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("ok", encoding="utf-8")
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"\x00\x01")
    with pytest.raises(UserError, match=re.escape(f"--calib {bad} is not a UTF-8 text file")):
        load_calibration_text(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match=re.escape(f"--calib {missing} does not exist")):
        load_calibration_text(missing)


def test_hub_name_says_how_to_name_a_hub_dataset(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="does not exist; for a dataset of the hub write "
                                        "hf:wikitext/wikitext-2-raw-v1"):
        load_calibration_text(Path("wikitext/wikitext-2-raw-v1"))


def test_windows_shape_bounds_and_content() -> None:
    ids = torch.arange(1000, dtype=torch.int64)
    w = sample_windows(ids, nsamples=64, seqlen=100, seed=0)
    assert w.shape == (64, 100)
    assert w.dtype == torch.int64
    assert int(w.min()) >= 0 and int(w.max()) <= 999
    # Each window is a contiguous slice of the tokens.
    assert torch.equal(w - w[:, :1], torch.arange(100).expand(64, 100))
    # Starts spread over the allowed range [0, 900].
    assert int(w[:, 0].max()) <= 900 and len(set(w[:, 0].tolist())) > 1


def test_windows_deterministic_per_seed() -> None:
    ids = torch.arange(5000, dtype=torch.int64)
    a = sample_windows(ids, 16, 64, seed=7)
    b = sample_windows(ids.clone(), 16, 64, seed=7)
    c = sample_windows(ids, 16, 64, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Pinned starts: the same on every machine for a given torch generator.
    gen = torch.Generator(device="cpu").manual_seed(7)
    expected = torch.randint(0, 5000 - 64 + 1, (16,), generator=gen, dtype=torch.int64)
    assert torch.equal(a[:, 0], expected)


def test_windows_may_overlap_and_cover_exact_length() -> None:
    ids = torch.arange(10, dtype=torch.int64)
    w = sample_windows(ids, nsamples=5, seqlen=10, seed=3)
    assert torch.equal(w, ids.expand(5, 10))


def test_too_short_text() -> None:
    with pytest.raises(UserError, match="calibration text has 10 tokens, fewer than --seqlen 11"):
        sample_windows(torch.arange(10), nsamples=1, seqlen=11, seed=0)


@pytest.mark.parametrize(
    ("nsamples", "seqlen", "option"), [(0, 8, "--nsamples"), (1, 1, "--seqlen")]
)
def test_bad_sizes(nsamples: int, seqlen: int, option: str) -> None:
    with pytest.raises(UserError, match=option):
        sample_windows(torch.arange(100), nsamples=nsamples, seqlen=seqlen, seed=0)


def _tiny_tokenizer():
    """A real Hugging Face fast tokenizer, built in memory: whitespace words, max length 4."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["[UNK]", "the", "cat", "sat", "on", "mat"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", model_max_length=4
    )


def test_calibration_windows_with_tokenizer(capfd: pytest.CaptureFixture[str]) -> None:
    tokenizer = _tiny_tokenizer()
    text = "the cat sat on the mat " * 50  # 300 tokens, far over model_max_length
    w = calibration_windows(tokenizer, text, nsamples=8, seqlen=12, seed=1)
    ids = torch.tensor([1, 2, 3, 4, 1, 5] * 50)
    assert w.shape == (8, 12) and w.dtype == torch.int64
    assert torch.equal(w, sample_windows(ids, 8, 12, seed=1))
    assert torch.equal(w, calibration_windows(tokenizer, text, 8, 12, seed=1))
    assert "Token indices sequence length" not in capfd.readouterr().err
    with pytest.raises(UserError, match="fewer than --seqlen 400"):
        calibration_windows(tokenizer, text, nsamples=1, seqlen=400, seed=0)
    with pytest.raises(UserError, match="--nsamples"):
        calibration_windows(tokenizer, text, nsamples=0, seqlen=4, seed=0)


def _word_tokenizer(bos: bool):
    """A real fast tokenizer over a word vocabulary; with ``bos`` it puts ``<bos>`` before every
    text, as Gemma's and Llama 3's do (a TemplateProcessing post-processor)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<bos>", "the", "quick", "brown", "fox", ".", "a", "b", "c", "d", "e", "f", "g", "h"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                           special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")


def test_windows_follow_the_tokenizers_own_prefix() -> None:
    """A tokenizer that adds <bos> gets it at the start of every calibration and evaluation
    window (seqlen tokens in all); one that adds nothing gets plain text windows, as before."""
    from neuqi.data.calib import window_prefix
    from neuqi.evaluate import eval_windows

    text = " ".join(["a", "b", "c", "d", "e", "f", "g", "h"] * 40)
    plain, bos = _word_tokenizer(False), _word_tokenizer(True)
    assert window_prefix(plain) == [] and window_prefix(bos) == [1]
    ids = torch.tensor(plain(text, add_special_tokens=False)["input_ids"])

    cal = calibration_windows(bos, text, 5, 16, seed=3)
    assert cal.shape == (5, 16) and (cal[:, 0] == 1).all() and (cal[:, 1:] != 1).all()
    assert torch.equal(cal[:, 1:], sample_windows(ids, 5, 15, 3))
    assert torch.equal(calibration_windows(plain, text, 5, 16, seed=3),
                       sample_windows(ids, 5, 16, 3))

    ev = eval_windows(bos, text, 16, max_windows=3)
    assert ev.shape == (3, 16) and (ev[:, 0] == 1).all()
    assert torch.equal(ev[:, 1:].reshape(-1), ids[:45])  # consecutive text, 15 tokens a window
    assert torch.equal(eval_windows(plain, text, 16, max_windows=3).reshape(-1), ids[:48])
    with pytest.raises(UserError, match="--seqlen 2 is too small"):
        calibration_windows(bos, text, 1, 2, seed=0)
