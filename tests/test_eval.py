"""Streaming perplexity (`neuqi eval`): equal to transformers' own full-model forward pass."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import neuqi

from neuqi.evaluate import eval_windows, perplexity, read_eval_text
from neuqi.formats.loader import load_quantized
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.runner import quantize
from neuqi.util.errors import UserError

# the repository carries the evaluation text (data/README.md: source, licence, SHA-256)
WIKITEXT = Path(__file__).resolve().parents[1] / "data" / "wikitext2-test.raw"
WIKITEXT_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
SEQLEN = 64


def test_the_repository_carries_the_wikitext2_test_split_byte_for_byte():
    assert hashlib.sha256(WIKITEXT.read_bytes()).hexdigest() == WIKITEXT_SHA256
    readme = (WIKITEXT.parent / "README.md").read_text(encoding="utf-8")
    assert WIKITEXT_SHA256 in readme and "CC BY-SA 3.0" in readme


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 20k characters of the WikiText-2 test split, as they are on disk."""
    data = WIKITEXT.read_bytes().decode("utf-8")[:20_000]
    path = tmp_path_factory.mktemp("eval") / "wiki.txt"
    path.write_bytes(data.encode("utf-8"))
    return path


def quantized(
    model: Path, tmp_path_factory: pytest.TempPathFactory, method: str = "neuqi"
) -> Path:
    out = tmp_path_factory.mktemp("q") / "out"
    config = QuantizeConfig(
        model=str(model), out=str(out), bits=3, group_size=16, nsamples=4, seqlen=32,
        method=method,
    )
    return quantize(config, device="cpu")


@pytest.fixture(scope="module")
def quantized_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantized(tiny_llama, tmp_path_factory)


@pytest.fixture(scope="module")
def quantized_qwen2(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """q/k/v biases and a tied head: stored tensors beside the DequantLinears."""
    return quantized(tiny_qwen2, tmp_path_factory, "minmax")  # the fastest method


def reference_perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) from the model's own full forward pass, window by window."""
    with torch.no_grad():
        logits = model(windows).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(float(nll))


def windows_of(folder: Path, text_file: Path, max_windows: int | None) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return eval_windows(tokenizer, read_eval_text(text_file), SEQLEN, max_windows)


@pytest.mark.parametrize(
    ("family", "max_windows"),
    [("tiny_llama", 6), ("tiny_qwen2", None), ("tiny_qwen3", 5), ("tiny_mistral", 5)],
)
def test_streamed_equals_full_model(family: str, max_windows: int | None, text_file: Path,
                                    request: pytest.FixtureRequest):
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(family)
    result = perplexity(str(folder), text_file, SEQLEN, max_windows, 4, "cpu")
    windows = windows_of(folder, text_file, max_windows)
    n = windows.shape[0]
    if max_windows is not None:
        assert n == max_windows
    else:
        assert n > 20  # every complete window of the text
    assert result["windows"] == n
    assert result["seqlen"] == SEQLEN
    assert result["tokens"] == n * (SEQLEN - 1)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]), rel=1e-12)
    full = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert result["perplexity"] == pytest.approx(reference_perplexity(full, windows), rel=1e-5)


def test_quantized_streamed_equals_loaded_model(quantized_llama: Path, tiny_llama: Path,
                                                text_file: Path):
    result = perplexity(str(quantized_llama), text_file, SEQLEN, 5, 2, "cpu")
    windows = windows_of(quantized_llama, text_file, 5)
    model = load_quantized(quantized_llama)
    assert result["windows"] == 5
    assert result["perplexity"] == pytest.approx(reference_perplexity(model, windows), rel=1e-5)
    # the quantized model is a different model from the full-precision one
    full = perplexity(str(tiny_llama), text_file, SEQLEN, 5, 2, "cpu")
    assert full["perplexity"] != pytest.approx(result["perplexity"], rel=1e-3)


def test_quantized_with_biases_and_tied_head(quantized_qwen2: Path, text_file: Path):
    result = perplexity(str(quantized_qwen2), text_file, SEQLEN, 3, 2, "cpu")
    windows = windows_of(quantized_qwen2, text_file, 3)
    model = load_quantized(quantized_qwen2)
    assert result["perplexity"] == pytest.approx(reference_perplexity(model, windows), rel=1e-5)


def test_reference_gives_kl_divergence_and_top_token_agreement(
    tiny_llama: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory
):
    """--reference: zero KL and full agreement against the model itself; against a 2-bit
    output, the KL divergence that the two loaded models' logits give on the same windows."""
    from transformers import AutoModelForCausalLM

    same = perplexity(str(tiny_llama), text_file, SEQLEN, 3, 2, "cpu", reference=str(tiny_llama))
    assert same["kld"] == pytest.approx(0.0, abs=1e-7) and same["top1_agreement"] == 1.0
    out = tmp_path_factory.mktemp("q2") / "out"
    two_bits = quantize(QuantizeConfig(model=str(tiny_llama), out=str(out), bits=2,
                                       group_size=16, nsamples=4, seqlen=32), device="cpu")
    r = neuqi("eval", str(two_bits), "--data", str(text_file), "--seqlen", str(SEQLEN),
              "--max-windows", "3", "--device", "cpu", "--reference", str(tiny_llama), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    windows = windows_of(two_bits, text_file, 3)
    with torch.no_grad():
        logp = F.log_softmax(load_quantized(two_bits)(windows).logits[:, :-1].float(), -1)
        full = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        ref = F.log_softmax(full(windows).logits[:, :-1].float(), -1)
    kld = float((ref.exp() * (ref - logp)).sum(-1).mean())
    agree = float((logp.argmax(-1) == ref.argmax(-1)).float().mean())
    assert result["kld"] > 0.01 and result["kld"] == pytest.approx(kld, rel=1e-4)
    assert result["top1_agreement"] == pytest.approx(agree, abs=1e-9) and agree < 1
    # the plain output: KL and agreement, then the perplexity last
    r = neuqi("eval", str(two_bits), "--data", str(text_file), "--seqlen", str(SEQLEN),
              "--max-windows", "3", "--device", "cpu", "--reference", str(tiny_llama))
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("KL divergence: ") and lines[-1].startswith("perplexity: ")


def test_cli_prints_perplexity_last_and_json(tiny_llama: Path, text_file: Path):
    args = ["eval", str(tiny_llama), "--data", str(text_file), "--seqlen", str(SEQLEN),
            "--max-windows", "3", "--batch-size", "2", "--device", "cpu"]
    r = neuqi(*args)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("perplexity: ")
    value = float(last.split(": ")[1])
    api = perplexity(str(tiny_llama), text_file, SEQLEN, 3, 2, "cpu")
    assert value == pytest.approx(api["perplexity"], abs=1e-4)
    assert "layer 3/3" in r.stderr

    r = neuqi(*args, "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert set(record) == {"perplexity", "nll", "windows", "tokens", "seqlen"}
    assert record["windows"] == 3 and record["seqlen"] == SEQLEN
    assert record["tokens"] == 3 * (SEQLEN - 1)
    assert record["perplexity"] == pytest.approx(api["perplexity"], rel=1e-9)


@pytest.mark.parametrize("case", ["missing", "short", "seqlen", "folder"])
def test_bad_input_is_one_line_exit_2(case: str, tiny_llama: Path, tmp_path: Path):
    data = tmp_path / "text.txt"
    seqlen = str(SEQLEN)
    if case == "short":
        data.write_text("A few words only.\n", encoding="utf-8")
    elif case == "seqlen":
        data.write_text("A few words only.\n", encoding="utf-8")
        seqlen = "1"
    elif case == "folder":
        data = tmp_path
    r = neuqi("eval", str(tiny_llama), "--data", str(data), "--seqlen", seqlen, "--device", "cpu")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    assert {"missing": "does not exist", "short": "fewer than one window",
            "seqlen": "--seqlen 1", "folder": "not a regular file"}[case] in lines[0]
    assert r.stdout == ""


def test_read_eval_text_as_calibration_reads_a_file(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\n")
    assert read_eval_text(path) == "one\ntwo\n"
    path.write_bytes(b"\xff\xfe\x00a")
    with pytest.raises(UserError, match="not a UTF-8 text file"):
        read_eval_text(path)
