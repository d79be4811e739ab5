"""`neuqi export`: compressed-tensors read by transformers, GGUF read by the gguf package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neuqi.export import export
from neuqi.export.common import ExportSource, weighted_loss
from neuqi.loader import NeuqiOutput, load_quantized
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.runner import quantize

TINY = {"nsamples": 4, "seqlen": 32, "batch_size": 3}


def neuqi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from neuqi.cli import main; main()", *args],
        check=False, capture_output=True, text=True, env=dict(os.environ), timeout=600,
    )


def _quantize(model: Path, out: Path, **options) -> Path:
    config = QuantizeConfig(model=str(model), out=str(out), **{**TINY, **options})
    return quantize(config, None, "cpu")


@pytest.fixture(scope="module")
def int_output(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny LLaMA, 4 bits, group 32, integer zero-points (neuqi-int)."""
    out = tmp_path_factory.mktemp("int") / "out"
    return _quantize(tiny_llama, out, bits=4, group_size=32, method="neuqi-int")


@pytest.fixture(scope="module")
def float_output(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny LLaMA, 4 bits, group 32, NeUQI's float zero-points."""
    out = tmp_path_factory.mktemp("float") / "out"
    return _quantize(tiny_llama, out, bits=4, group_size=32, method="neuqi")


def _ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def _transformers_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    with torch.no_grad():
        return model(_ids()).logits


def _native_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_quantized(folder)(_ids()).logits


# ---------------------------------------------------------------------------- the sidecar
def test_pack_writes_the_hessian_diagonal_of_every_quantized_linear(int_output: Path):
    meta = json.loads((int_output / "neuqi.json").read_text())
    h = load_file(int_output / meta["hessian_diag"]["file"])
    assert sorted(h) == sorted(meta["quantized"]) == meta["hessian_diag"]["names"]
    q = h["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (64,) and bool((q > 0).all())
    # q, k and v read the same input, so they share one diagonal
    assert torch.equal(q, h["model.layers.0.self_attn.v_proj.weight"])
    assert not torch.equal(q, h["model.layers.0.mlp.down_proj.weight"][:64])


def test_native_loss_is_the_solver_loss_with_the_sidecar(int_output: Path):
    source = ExportSource(int_output)
    lin = source.linear("model.layers.1.mlp.down_proj.weight")
    assert lin.weight is not None and lin.h_diag is not None
    loss = weighted_loss(lin.weight, lin.dequantized(), lin.h_diag)
    from neuqi.solver import quantize_tensor

    again = quantize_tensor(lin.weight, lin.h_diag, bits=4, group_size=32, method="neuqi-int")
    assert loss == pytest.approx(float(again.loss.sum()), rel=1e-4)


# ---------------------------------------------------------------------------- compressed-tensors
def test_compressed_tensors_loads_in_transformers_with_the_native_logits(
    int_output: Path, tmp_path: Path
):
    out = tmp_path / "ct"
    r = neuqi("export", str(int_output), "--format", "compressed-tensors", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert "added +0," in r.stderr  # integer zero-points: nothing lost
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, False)
    ours, theirs = _native_logits(int_output), _transformers_logits(out)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_compressed_tensors_rounds_float_zero_points_with_a_warning(
    float_output: Path, tmp_path: Path
):
    notes: list[str] = []
    report = export(float_output, "compressed-tensors", tmp_path / "ct", say=notes.append)
    assert any("float zero-points" in n for n in notes)
    assert report.added_loss is not None and report.added_loss > 0
    # what transformers computes is what the report measured
    source = ExportSource(float_output)
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    total = 0.0
    for name in source.quantized_names:
        lin = source.linear(name)
        loaded = model.get_parameter(name).detach()
        total += weighted_loss(lin.weight, loaded, lin.h_diag)
    assert total == pytest.approx(report.export_loss, rel=1e-5)


def test_quantize_with_format_compressed_tensors_solves_with_integer_zero_points(
    tiny_llama: Path, tmp_path: Path
):
    out = tmp_path / "q"
    r = neuqi("quantize", str(tiny_llama), "--out", str(out), "--bits", "4", "--group-size",
              "32", "--nsamples", "4", "--seqlen", "32", "--device", "cpu",
              "--format", "compressed-tensors")
    assert r.returncode == 0, r.stderr
    exported = Path(r.stdout.strip())
    assert exported == tmp_path / "q-compressed-tensors"
    assert NeuqiOutput.open(out).meta["quantization"]["method"] == "neuqi-int"
    assert "added +0," in r.stderr
    torch.testing.assert_close(_transformers_logits(exported), _native_logits(out),
                               rtol=1e-5, atol=1e-5)


def test_export_refuses_a_folder_it_did_not_write(int_output: Path, tiny_llama: Path):
    r = neuqi("export", str(int_output), "--format", "compressed-tensors", "--out",
              str(tiny_llama))
    assert r.returncode == 2
    assert "--out" in r.stderr and "Traceback" not in r.stderr
    assert (tiny_llama / "model.safetensors").is_file()


def test_export_of_a_folder_that_is_not_an_output_is_a_user_error(tmp_path: Path):
    r = neuqi("export", str(tmp_path), "--format", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert r.returncode == 2
    assert "neuqi.json" in r.stderr and "Traceback" not in r.stderr
