"""Gemma 3 270M, the second real model (a Q4_K_M GGUF converted once): quantize, resume, eval and
export through the real command line, at small settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_bitwise_equal, gguf_in_transformers, neuqi

from neuqi.formats.loader import load_quantized
from neuqi.pipeline.runner import KILL_AFTER_ENV

SMALL = ["--bits", "4", "--group-size", "64", "--method", "minmax", "--nsamples", "2",
         "--seqlen", "32", "--device", "cpu"]
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


@pytest.fixture(scope="module")
def gemma3_output(gemma3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gemma3") / "out"
    r = neuqi("quantize", str(gemma3_dir), "--out", str(out), *SMALL)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("weighted loss") == 18  # one line per decoder layer
    return out


def test_gemma3_source_and_licence_are_recorded(gemma3_dir: Path):
    note = (gemma3_dir / "NEUQI_SOURCE.txt").read_text()
    assert "gemma-3-270m-q4_k_m.gguf" in note and "Gemma terms of use" in note
    config = json.loads((gemma3_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18


def test_gemma3_output_computes_the_min_max_model(gemma3_output: Path, gemma3_dir: Path):
    """Min-Max does not depend on the calibration, so the loaded output computes what
    transformers' Gemma 3 computes with its linears replaced by the solver's Min-Max weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuqi.quant.solver import quantize_tensor

    ref = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32)
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            q = quantize_tensor(module.weight.data, bits=4, group_size=64, method="minmax")
            module.weight.data = q.dequantize()
    ids = AutoTokenizer.from_pretrained(gemma3_dir)(TEXT, return_tensors="pt").input_ids
    assert int(ids[0, 0]) == 2  # Gemma's tokenizer starts with <bos>
    with torch.no_grad():
        logits = load_quantized(gemma3_output)(ids).logits
        expected = ref(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=2e-3)


def test_gemma3_killed_and_resumed_is_bitwise_identical(
    gemma3_output: Path, gemma3_dir: Path, tmp_path: Path
):
    out = tmp_path / "out"
    r = neuqi("quantize", str(gemma3_dir), "--out", str(out), *SMALL,
              env={KILL_AFTER_ENV: "12"})  # inside layer 1
    assert r.returncode == -9, r.stderr
    r = neuqi("resume", str(out.with_name("out.job")), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert_bitwise_equal(out, gemma3_output)


def test_gemma3_eval_scores_the_output_above_the_float_model(gemma3_output: Path,
                                                             gemma3_dir: Path, tmp_path: Path):
    data = tmp_path / "text.txt"
    data.write_text((Path(__file__).parents[1] / "data" / "wikitext2-test.raw")
                    .read_text(encoding="utf-8")[:20000], encoding="utf-8")
    args = ["--data", str(data), "--seqlen", "256", "--max-windows", "2", "--device", "cpu",
            "--json"]
    fp = neuqi("eval", str(gemma3_dir), *args)
    q = neuqi("eval", str(gemma3_output), *args)
    assert fp.returncode == 0 and q.returncode == 0, fp.stderr + q.stderr
    fp_ppl = json.loads(fp.stdout.strip().splitlines()[-1])["perplexity"]
    q_ppl = json.loads(q.stdout.strip().splitlines()[-1])["perplexity"]
    assert 1 < fp_ppl < 100 and fp_ppl < q_ppl < 2 * fp_ppl, (fp_ppl, q_ppl)


def test_gemma3_compressed_tensors_export_loads_in_transformers(gemma3_output: Path,
                                                                 tmp_path: Path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = tmp_path / "ct"
    r = neuqi("export", str(gemma3_output), "--format", "compressed-tensors", "--out", str(out))
    assert r.returncode == 0, r.stderr
    # the format's 16-bit scales cost a little: the export says how much (here about 0.04 %)
    added = float(r.stderr.split("%)")[0].split(", ")[-1].lstrip("+"))
    assert 0 <= added < 0.5, r.stderr
    ids = torch.tensor([[2, 818, 563, 496, 9043]])
    model = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        theirs = model(ids).logits
        ours = load_quantized(gemma3_output)(ids).logits
    assert float((theirs - ours).norm() / ours.norm()) < 1e-2
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_gemma3_gguf_export_reads_back_in_transformers(gemma3_output: Path, gemma3_dir: Path,
                                                      tmp_path: Path):
    """The conversion writes the tokenizer.model that the GGUF export needs (from the source
    GGUF's vocabulary: it tokenizes as tokenizer.json does), and the exported GGUF, read by
    transformers' own GGUF reader, computes the native output's logits."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor()
    sp.LoadFromFile(str(gemma3_dir / "tokenizer.model"))
    text = (Path(__file__).parents[1] / "data" / "wikitext2-test.raw").read_text()[:5000]
    plain = AutoTokenizer.from_pretrained(gemma3_dir)(text, add_special_tokens=False).input_ids
    assert sp.EncodeAsIds(text) == plain
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()) == (2, 1, 3, 0)
    file = tmp_path / "g.gguf"
    r = neuqi("export", str(gemma3_output), "--format", "gguf", "--out", str(file))
    assert r.returncode == 0, r.stderr
    ids = torch.tensor([[2, 818, 563, 496, 9043]])
    with torch.no_grad():
        theirs = gguf_in_transformers(file)(ids).logits
        ours = load_quantized(gemma3_output)(ids).logits
    assert float((theirs - ours).norm() / ours.norm()) < 1e-2
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
