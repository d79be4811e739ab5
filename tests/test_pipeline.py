"""The streaming, resumable pipeline end to end, through the real command line."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, assert_bitwise_equal, neuqi, one_line_error, output_tensors

from neuqi.formats.loader import load_quantized
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.runner import KILL_AFTER_ENV, quantize


@pytest.fixture(scope="module")
def reference(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run, through the command line."""
    out = tmp_path_factory.mktemp("ref") / "out"
    r = neuqi("quantize", str(tiny_llama), "--out", str(out), "--bits", "3", "--group-size",
              "16", *TINY)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    return out


def test_quantized_output_loads_and_runs(reference: Path, tiny_llama: Path):
    from transformers import AutoModelForCausalLM

    model = load_quantized(reference)
    full = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        ref = full(ids).logits
    assert torch.isfinite(logits).all()
    # 3-bit weights: close to the full model, but not equal to it
    rel = (logits - ref).norm() / ref.norm()
    assert 0 < rel < 0.5
    meta = json.loads((reference / "neuqi.json").read_text())
    assert len(meta["quantized"]) == 3 * 7


def test_job_store_records_every_step(reference: Path):
    r = neuqi("status", str(reference.with_name("out.job")), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["complete"] and info["done"] == info["total"]
    assert info["stages"]["solve"] == {"done": 21, "total": 21}
    # intermediate activations are deleted once used
    assert not any((reference.with_name("out.job") / "arrays" / "acts").glob("*/zarr.json"))


def test_killed_at_random_steps_then_resumed_is_bitwise_identical(
    reference: Path, tiny_llama: Path, tmp_path: Path
):
    out = tmp_path / "out"
    cmd = ["quantize", str(tiny_llama), "--out", str(out), "--bits", "3", "--group-size", "16",
           *TINY]
    total = 1 + 3 * 8 + 2 + 1
    rng = random.Random(1234)
    kills = sorted(rng.sample(range(1, total), 3))
    records = 0
    for k in kills:
        r = neuqi(*cmd, env={KILL_AFTER_ENV: str(k - records)})
        assert r.returncode == -9, r.stderr  # SIGKILL
        assert not out.exists()  # a killed run never leaves an output that looks complete
        records = k
    r = neuqi("resume", str(out.with_name("out.job")), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "resuming job" in r.stderr
    assert_bitwise_equal(out, reference)


def test_rerun_of_a_finished_job_keeps_the_result(reference: Path, tiny_llama: Path):
    before = output_tensors(reference)
    r = neuqi("quantize", str(tiny_llama), "--out", str(reference), "--bits", "3",
              "--group-size", "16", *TINY)
    assert r.returncode == 0, r.stderr
    after = output_tensors(reference)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mismatched_resume_is_refused(reference: Path, tiny_llama: Path):
    r = neuqi("quantize", str(tiny_llama), "--out", str(reference), "--bits", "4",
              "--group-size", "16", *TINY)
    assert r.returncode == 2
    assert "different options" in r.stderr and "bits 3 -> 4" in r.stderr
    assert "Traceback" not in r.stderr


def test_unsupported_architecture(tiny_llama: Path, tmp_path: Path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (model / "config.json").write_text(json.dumps(config))
    line = one_line_error(neuqi("quantize", str(model), "--out", str(tmp_path / "o"), *TINY))
    assert "gpt2" in line and "llama" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.job").exists()


def test_missing_shard(tiny_llama_sharded: Path, tmp_path: Path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_sharded, model)
    shard = sorted(model.glob("model-*.safetensors"))[1]
    shard.unlink()
    line = one_line_error(neuqi("quantize", str(model), "--out", str(tmp_path / "o"), *TINY))
    assert shard.name in line


def test_group_size_that_does_not_divide(tiny_llama: Path, tmp_path: Path):
    line = one_line_error(neuqi("quantize", str(tiny_llama), "--out", str(tmp_path / "o"),
                                "--group-size", "48", *TINY))
    assert "--group-size 48" in line and "64" in line
    assert not (tmp_path / "o.job").exists()


def test_out_folder_that_is_not_ours(tiny_llama: Path, tmp_path: Path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    line = one_line_error(neuqi("quantize", str(tiny_llama), "--out", str(out), "--group-size",
                                "16", *TINY))
    assert "--out" in line
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("family", ["tiny_qwen2", "tiny_qwen3", "tiny_mistral"])
def test_other_families_quantize_in_process(family: str, request, tmp_path: Path):
    model = request.getfixturevalue(family)
    config = QuantizeConfig(model=str(model), out=str(tmp_path / "o"), bits=4, group_size=32,
                            nsamples=3, seqlen=24, batch_size=2, sequential=False)
    out = quantize(config, device="cpu")
    logits = load_quantized(out)(torch.arange(10).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()


def test_real_smollm2_end_to_end(smollm2_dir: Path, tmp_path: Path):
    """The real demo model through the whole pipeline and back. Min-Max does not depend on the
    calibration, so the loaded output must compute what the model computes with its linears
    replaced in memory by the solver's Min-Max dequantized weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuqi.quant.solver import quantize_tensor

    out = tmp_path / "smol"
    r = neuqi("quantize", str(smollm2_dir), "--out", str(out), "--bits", "4", "--group-size",
              "64", "--method", "minmax", "--nsamples", "2", "--seqlen", "64", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("weighted loss") == 30
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            q = quantize_tensor(module.weight.data, bits=4, group_size=64, method="minmax")
            module.weight.data = q.dequantize()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("It is a truth universally acknowledged, that a single man in possession",
              return_tensors="pt").input_ids
    with torch.no_grad():
        logits = load_quantized(out)(ids).logits
        expected = ref(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)
