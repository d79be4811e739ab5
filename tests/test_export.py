"""`neuqi export`: compressed-tensors read by transformers, GGUF read by the gguf package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY as TINY_CLI
from helpers import neuqi, one_line_error
from safetensors.torch import load_file

from neuqi.formats.export import export
from neuqi.formats.export.common import ExportSource, weighted_loss
from neuqi.formats.loader import NeuqiOutput, load_quantized
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.runner import quantize

TINY = {"nsamples": 4, "seqlen": 32, "batch_size": 3}


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
    from neuqi.quant.solver import quantize_tensor

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


def test_compressed_tensors_re_solves_float_zero_points_with_neuqi_int(
    float_output: Path, int_output: Path, tmp_path: Path
):
    notes: list[str] = []
    report = export(float_output, "compressed-tensors", tmp_path / "ct", say=notes.append)
    assert any("re-solved with integer zero-points (NeUQI-int)" in n for n in notes), notes
    assert report.added_loss is not None and report.added_loss > 0
    source = ExportSource(float_output)
    # the floor: NeUQI-int's own loss for every linear, from the weights and the stored diagonal
    from neuqi.formats.export.compressed_tensors import integer_params
    from neuqi.quant.solver import dequantize, quantize_tensor

    floor = rounded = 0.0
    for name in source.quantized_names:
        lin = source.linear(name)
        q = quantize_tensor(lin.weight, lin.h_diag, bits=4, group_size=32, method="neuqi-int")
        floor += float(q.loss.double().sum())
        codes, z, changed = integer_params(lin)
        assert changed
        rounded += weighted_loss(lin.weight, dequantize(codes, lin.scale, z, 32), lin.h_diag)
    assert report.export_loss == pytest.approx(floor, rel=1e-4)  # float32 model: scales as is
    assert report.native_loss < report.export_loss < rounded  # tiny LLaMA: 6.60 < 8.58 < 9.78
    # layer 0 sees the same calibration inputs in both jobs: the --method neuqi-int job's codes
    ct = {}
    for f in (tmp_path / "ct").glob("*.safetensors"):
        ct.update(load_file(f))
    native_int = NeuqiOutput.open(int_output)
    for lin in ("self_attn.q_proj", "mlp.down_proj"):
        prefix = f"model.layers.0.{lin}"
        int_scale = native_int.linear(f"{prefix}.weight").scales
        assert torch.equal(ct[f"{prefix}.weight_scale"], int_scale)
    # what transformers computes is what the report measured
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


# ---------------------------------------------------------------------------- GGUF
def _read_gguf(path: Path) -> dict[str, object]:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(path).tensors}


def _gguf_weight(tensor) -> torch.Tensor:
    from gguf.quants import dequantize

    return torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())


def _hf_rows(name: str, weight: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """A GGUF llama q/k weight back in transformers' row order."""
    from neuqi.formats.export.gguf import qk_permutation

    n = heads if name.endswith("q_proj.weight") else kv_heads if name.endswith(
        "k_proj.weight") else None
    if n is None:
        return weight
    out = torch.empty_like(weight)
    out[qk_permutation(weight.shape[0], n)] = weight
    return out


GGUF_LINEAR = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(name: str) -> str:
    _, _, layer, *rest = name.split(".")
    return f"blk.{layer}.{GGUF_LINEAR['.'.join(rest[:-1])]}.weight"


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_1", "Q4_K", "Q5_K", "Q2_K"])
def test_block_layouts_read_back_with_the_gguf_package(qtype: str):
    """Our packing of codes and block parameters is what gguf's dequantizer reads."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from neuqi.formats.export.gguf import pack_kquant, pack_q4_1, pack_q5_1
    from neuqi.formats.export.kquants import KSPECS, KQuantized

    g = torch.Generator().manual_seed(1)
    rows = 3
    if qtype in ("Q4_1", "Q5_1"):
        bits = 4 if qtype == "Q4_1" else 5
        codes = torch.randint(0, 2**bits, (rows * 8, 32), generator=g, dtype=torch.uint8)
        d = (torch.rand(rows * 8, generator=g) * 0.1).half().float()
        m = (torch.randn(rows * 8, generator=g) * 0.1).half().float()
        blocks = (pack_q4_1 if bits == 4 else pack_q5_1)(codes, d, m).reshape(rows, -1)
        expected = (d.unsqueeze(-1) * codes.float() + m.unsqueeze(-1)).reshape(rows, -1)
    else:
        spec = KSPECS[qtype]
        nsub = 256 // spec.sub
        top = 2**spec.scale_bits
        k = KQuantized(
            codes=torch.randint(0, 2**spec.bits, (rows, 512), generator=g, dtype=torch.uint8),
            d=(torch.rand(rows, 2, generator=g) * 0.01).half().float(),
            dmin=(torch.rand(rows, 2, generator=g) * 0.01).half().float(),
            sc=torch.randint(0, top, (rows, 2, nsub), generator=g, dtype=torch.uint8),
            mn=torch.randint(0, top, (rows, 2, nsub), generator=g, dtype=torch.uint8),
            spec=spec,
        )
        blocks = pack_kquant(k).reshape(rows, -1)
        expected = k.dequantize()
    got = torch.from_numpy(dequantize(blocks, GGMLQuantizationType[qtype]).copy())
    assert torch.equal(got, expected)


def test_gguf_q4_1_keeps_neuqi_codes_and_float_offsets(float_output: Path, tmp_path: Path):
    out = tmp_path / "m.gguf"
    r = neuqi("export", str(float_output), "--format", "gguf", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert "gguf-q4_1: weighted loss" in r.stderr
    tensors = _read_gguf(out)
    source = ExportSource(float_output)
    for name in source.quantized_names:
        t = tensors[_gguf_name(name)]
        assert t.tensor_type.name == "Q4_1"
        lin = source.linear(name)
        # d = s and m = -s*z, each rounded to fp16; the codes are the output's own
        d = lin.scale.half().float().repeat_interleave(32, 1)
        m = (-lin.scale * lin.zero_point).half().float().repeat_interleave(32, 1)
        expected = d * lin.codes.float() + m
        got = _hf_rows(name, _gguf_weight(t), 4, 2)
        assert torch.equal(got, expected), name
        torch.testing.assert_close(got, lin.dequantized(), rtol=0, atol=2e-3)
    # as llama.cpp's convert_hf_to_gguf.py --outtype q8_0: 2-D tensors Q8_0, norms F32
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    for name, gname in (("model.embed_tokens.weight", "token_embd.weight"),
                        ("lm_head.weight", "output.weight")):
        assert tensors[gname].tensor_type.name == "Q8_0"
        original = source.plain(name).float()
        expected = quantize(original.numpy(), GGMLQuantizationType.Q8_0)
        assert (tensors[gname].data.reshape(expected.shape) == expected).all()
        torch.testing.assert_close(_gguf_weight(tensors[gname]).reshape(original.shape), original,
                                   rtol=0, atol=float(original.abs().max()) / 127)
    norm = tensors["output_norm.weight"]
    assert norm.tensor_type.name == "F32"
    assert torch.equal(torch.from_numpy(norm.data.copy()), source.plain("model.norm.weight"))


@pytest.mark.parametrize("fmt", ["gguf-q4_1", "gguf-q5_1"])
def test_gguf_loss_report_is_a_direct_recomputation(fmt: str, float_output: Path, tmp_path: Path):
    """Both sides of the report are sum h (w - ŵ)² over the original weights with the stored
    Hessian diagonal: ŵ the native output's weights, and ŵ what llama.cpp reads from the file
    (dequantized by the gguf package). Q4_1 keeps the output's codes; Q5_1 re-solves them."""
    out = tmp_path / "m.gguf"
    report = export(float_output, fmt, out)
    tensors = _read_gguf(out)
    source = ExportSource(float_output)
    native = exported = 0.0
    for name in source.quantized_names:
        lin = source.linear(name)
        w = lin.weight
        native += weighted_loss(w, lin.dequantized(), lin.h_diag)
        got = _hf_rows(name, _gguf_weight(tensors[_gguf_name(name)]).reshape(w.shape), 4, 2)
        h = lin.h_diag.double()
        exported += float((h * (w.double() - got.double()) ** 2).sum())
    assert report.native_loss == pytest.approx(native, rel=1e-9)
    assert report.export_loss == pytest.approx(exported, rel=1e-6)
    assert report.added_loss == pytest.approx(exported - native, rel=1e-6, abs=1e-9)
    summary = report.summary()
    assert f"vs native {native:.6g}" in summary
    if fmt == "gguf-q5_1":  # 5-bit blocks: every linear solved again, and the line says so
        assert report.re_solved == report.linears == 21 and "re-solved" in summary
        assert report.added_loss < 0  # a finer grid than the 4-bit output's
    else:
        assert report.re_solved == 0 and "re-solved" not in summary


def test_gguf_runs_in_transformers_with_the_native_logits(float_output: Path, tmp_path: Path):
    """transformers' own GGUF reader (tokenizer, metadata, q/k permutation undone) gives the
    logits of the native output, up to the fp16 block parameters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "m.gguf"
    export(float_output, "gguf-q4_1", out)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name,
                                                 dtype=torch.float32)
    with torch.no_grad():
        got = model(_ids()).logits
    ours = _native_logits(float_output)
    assert (got - ours).abs().max() < 0.05 * ours.abs().max()
    text = "The quick brown fox jumps over the lazy dog."
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    mine = AutoTokenizer.from_pretrained(float_output)
    assert theirs(text)["input_ids"][-8:] == mine(text)["input_ids"][-8:]


@pytest.fixture(scope="module")
def wide_output(tiny_model_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA with rows of 256 and 512 weights (K-quant super-blocks), 4 bits, group 32."""
    model = tiny_model_factory("llama", hidden_size=256, intermediate_size=512,
                               num_hidden_layers=1)
    out = tmp_path_factory.mktemp("wide") / "out"
    return _quantize(model, out, bits=4, group_size=32, method="neuqi")


@pytest.mark.parametrize("qtype", ["Q4_K", "Q2_K"])
def test_gguf_k_quants_are_solved_under_their_constraint(
    wide_output: Path, tmp_path: Path, qtype: str
):
    from neuqi.formats.export.kquants import KSPECS, round_after, solve_kquant
    from neuqi.quant.solver import quantize_tensor

    out = tmp_path / "k.gguf"
    report = export(wide_output, f"gguf-{qtype.lower()}", out)
    assert report.export_loss is not None
    tensors = _read_gguf(out)
    source = ExportSource(wide_output)
    spec = KSPECS[qtype]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        t = tensors[_gguf_name(name)]
        assert t.tensor_type.name == qtype
        lin = source.linear(name)
        got = _hf_rows(name, _gguf_weight(t), 4, 2)
        solved = solve_kquant(lin.weight, lin.h_diag, spec)
        assert torch.equal(got, solved.dequantize())
        loss = weighted_loss(lin.weight, got, lin.h_diag)
        # between NeUQI without the constraint and NeUQI rounded onto it afterwards
        free = quantize_tensor(lin.weight, lin.h_diag, bits=spec.bits, group_size=spec.sub)
        after = weighted_loss(lin.weight, round_after(lin.weight, lin.h_diag, spec).dequantize(),
                              lin.h_diag)
        assert float(free.loss.sum()) <= loss < after


def test_gguf_k_quant_rows_off_the_super_block_fall_back_to_q4_1(
    float_output: Path, tmp_path: Path
):
    notes: list[str] = []
    export(float_output, "gguf-q4_k", tmp_path / "k.gguf", say=notes.append)
    assert any("Q4_1" in n for n in notes)
    tensors = _read_gguf(tmp_path / "k.gguf")
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q4_1"


def test_gguf_replaces_only_a_gguf_file(float_output: Path, tmp_path: Path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    r = neuqi("export", str(float_output), "--format", "gguf-q4_1", "--out", str(target))
    assert r.returncode == 2 and "--out" in r.stderr
    assert target.read_text() == "keep me"
    out = tmp_path / "m.gguf"
    export(float_output, "gguf-q4_1", out)
    first = out.read_bytes()
    export(float_output, "gguf-q4_1", out)  # an earlier export is replaced
    assert out.read_bytes()[:4] == b"GGUF" and len(out.read_bytes()) == len(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.txt"]


def test_quantize_with_format_gguf_exports_a_qwen2_that_transformers_runs(
    tiny_qwen2: Path, tmp_path: Path
):
    """Qwen2: q/k/v biases, tied embeddings, no q/k permutation (NeoX rotary in llama.cpp)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    r = neuqi("quantize", str(tiny_qwen2), "--out", str(out), "--bits", "4", "--group-size",
              "32", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--format", "gguf")
    assert r.returncode == 0, r.stderr
    exported = Path(r.stdout.strip())
    assert exported == tmp_path / "q.gguf"
    tensors = _read_gguf(exported)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["blk.0.attn_q.bias"].tensor_type.name == "F32"
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=exported.name,
                                                 dtype=torch.float32)
    with torch.no_grad():
        got = model(_ids()).logits
    ours = _native_logits(out)
    assert (got - ours).abs().max() < 0.01 * ours.abs().max()


@pytest.mark.parametrize("group_size", [64, 128, -1])
def test_q4_1_writes_groups_of_a_multiple_of_32_with_their_own_codes(group_size: int):
    """A group of k·32 weights is k Q4_1 blocks with the group's (s, z): nothing re-solved."""
    from neuqi.formats.export.common import NativeLinear
    from neuqi.formats.export.gguf import BLOCK, own_block_params

    g = torch.Generator().manual_seed(3)
    n_groups = 1 if group_size == -1 else 128 // group_size
    lin = NativeLinear(
        name="model.layers.0.mlp.up_proj.weight",
        codes=torch.randint(0, 16, (8, 128), generator=g, dtype=torch.uint8),
        scale=torch.rand(8, n_groups, generator=g) + 0.1,
        zero_point=torch.rand(8, n_groups, generator=g) * 15,  # NeUQI's float zero-points
        bits=4, group_size=group_size, weight=None, h_diag=None, method="neuqi",
    )
    codes, scale, zero = own_block_params(lin, 4)
    assert torch.equal(codes, lin.codes) and scale.shape == (8, 128 // BLOCK)
    blocks = codes.float().view(8, -1, BLOCK)
    as_blocks = (scale.unsqueeze(-1) * blocks - (scale * zero).unsqueeze(-1)).reshape(8, 128)
    torch.testing.assert_close(as_blocks, lin.dequantized(), rtol=1e-6, atol=1e-6)
    assert own_block_params(lin, 5) is None  # other bits: re-solved


def _sentencepiece_style(folder: Path, to: Path) -> Path:
    """A copy of ``folder`` whose tokenizer.json is a BPE with byte_fallback, the form of the
    SentencePiece tokenizers of Gemma, Phi-3 and LLaMA 2 (still loadable by transformers)."""
    import shutil

    shutil.copytree(folder, to)
    tj = json.loads((to / "tokenizer.json").read_text())
    tj["model"]["byte_fallback"] = True
    (to / "tokenizer.json").write_text(json.dumps(tj))
    return to


def test_gguf_refuses_a_sentencepiece_tokenizer_in_one_line(
    float_output: Path, tiny_llama: Path, tmp_path: Path
):
    """A SentencePiece-style tokenizer.json without its tokenizer.model has no token scores
    (written as gpt2 it would be mis-tokenized, with the converter's placeholder scores merged in
    another order; tests/test_gguf_sentencepiece.py): refused, naming the file and
    tokenizer.model, by export and by quantize --format gguf before any work."""
    out = _sentencepiece_style(float_output, tmp_path / "out")
    line = one_line_error(neuqi("export", str(out), "--format", "gguf",
                                "--out", str(tmp_path / "m.gguf")))
    assert str(out / "tokenizer.json") in line and "SentencePiece" in line
    assert "byte_fallback" in line and "tokenizer.model" in line
    assert not (tmp_path / "m.gguf").exists()
    model = _sentencepiece_style(tiny_llama, tmp_path / "model")
    line = one_line_error(neuqi("quantize", str(model), "--out", str(tmp_path / "q"), "--bits",
                                "4", "--group-size", "32", *TINY_CLI, "--format", "gguf"))
    assert str(model / "tokenizer.json") in line and "SentencePiece" in line
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.job").exists()


# DeepSeek-V3's published rope scaling (config.json's rope_scaling)
DEEPSEEK_YARN = {"type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                 "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 4096}
GEMMA2 = {"model_type": "gemma2", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
          "query_pre_attn_scalar": 16, "num_hidden_layers": 2}
GEMMA3 = {**GEMMA2, "model_type": "gemma3_text", "num_hidden_layers": 6}


@pytest.mark.parametrize("config,why", [
    (GEMMA2, None),
    ({**GEMMA2, "num_hidden_layers": 46, "query_pre_attn_scalar": 144, "hidden_size": 4608,
      "num_attention_heads": 32, "head_dim": 128}, None),  # Gemma 2 27B: hidden/heads
    ({**GEMMA2, "query_pre_attn_scalar": 256}, "scales this model's queries by 1/sqrt(16)"),
    ({**GEMMA2, "tie_word_embeddings": False}, "untied lm_head"),
    ({**GEMMA2, "final_logit_softcapping": None}, "always soft-caps the logits"),
    ({**GEMMA2, "layer_types": ["full_attention", "sliding_attention"]}, "one global layer in every 2"),
    ({**GEMMA2, "hidden_activation": "silu"}, "tanh GELU"),
    (GEMMA3, None),
    ({**GEMMA3, "final_logit_softcapping": 30.0}, "does not soft-cap the logits"),
    ({**GEMMA3, "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                    "full_attention": {"rope_type": "yarn", "factor": 8.0,
                                                       "rope_theta": 1e6}}}, "'yarn'"),
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                "long_factor": [1.0] * 47,
                                                "short_factor": [1.0] * 47}},
     "config class rejects it"),  # transformers' own check of the factors' length
    ({"model_type": "phi3", "max_position_embeddings": 131072,
      "original_max_position_embeddings": 4096,
      "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "attention_factor": 1.5,
                          "long_factor": [1.0] * 48, "short_factor": [1.0] * 48}},
     "longrope attention scale 1.5"),
    ({"model_type": "qwen3_moe", "norm_topk_prob": False}, "renormalizes"),
    ({"model_type": "qwen2_moe", "norm_topk_prob": False, "mlp_only_layers": [1],
      "num_hidden_layers": 2}, "dense MLP layers [1]"),
    ({"model_type": "gemma", "tie_word_embeddings": False}, "untied lm_head"),
    ({"model_type": "gemma", "attention_bias": True}, "no attention biases"),
    ({"model_type": "gemma"}, None),
    ({"model_type": "deepseek_v3"}, None),
    ({"model_type": "deepseek_v3", "rope_scaling": DEEPSEEK_YARN}, None),  # as published
    ({"model_type": "deepseek_v3", "rope_scaling": {**DEEPSEEK_YARN, "mscale": 0.707}},
     "yarn mscale 0.707 and mscale_all_dim 1.0"),
    ({"model_type": "deepseek_v3", "rope_scaling": {**DEEPSEEK_YARN, "attention_factor": 1.2}},
     "yarn attention_factor"),
    ({"model_type": "deepseek_v3", "rope_interleave": False}, "rope_interleave False"),
    ({"model_type": "deepseek_v3", "attention_bias": True}, "no attention biases"),
    ({"model_type": "dbrx"}, "'dbrx' has no GGUF export"),
])
def test_gguf_refuses_configs_llama_cpp_would_run_differently(config: dict, why: str | None):
    """What llama.cpp fixes for an architecture rather than reads from the file, checked against
    the config (transformers' class defaults filled in): a mismatch is one line, never a file."""
    from neuqi.formats.export.gguf_layout import check_family
    from neuqi.util.errors import UserError

    if why is None:
        check_family(config, "config.json")
        return
    with pytest.raises(UserError) as e:
        check_family(config, "config.json")
    assert why in str(e.value) and "\n" not in str(e.value)
    assert "compressed-tensors" in str(e.value) or "rejects it" in str(e.value)


def test_gguf_gemma3_linear_rope_scaling_is_written_for_the_global_layers():
    """Gemma 3 4B+ scale the global layers' rotary linearly (factor 8): llama.cpp reads the
    scaling keys for its global layers and fixes base 10000, no scaling, for the local ones."""
    import gguf

    from neuqi.formats.export.gguf_layout import LAYOUTS, resolved

    config = resolved({**GEMMA3, "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}})
    writer = gguf.GGUFWriter(None, "gemma3")
    LAYOUTS["gemma3_text"].keys(writer, config)
    kv = {k: v.value for k, v in writer.kv_data[0].items()}
    assert kv["gemma3.rope.freq_base"] == 1e6
    assert kv["gemma3.rope.scaling.type"] == "linear" and kv["gemma3.rope.scaling.factor"] == 8.0
    assert "gemma3.final_logit_softcapping" not in kv


def test_gguf_deepseek_yarn_keys_are_the_converters():
    """DeepSeek-V3's published YaRN as convert_hf_to_gguf writes it (TextModel's rope scaling,
    DeepseekV2Model's ``yarn_log_multiplier`` 0.1·mscale_all_dim), with which llama.cpp's
    deepseek2 scales q·k by (1 + 0.1·ln 40)² / sqrt(d) and leaves cos/sin unscaled, as
    transformers' DeepseekV3 does for mscale == mscale_all_dim."""
    import gguf

    from neuqi.formats.export.gguf_layout import LAYOUTS, resolved

    w = gguf.GGUFWriter(None, "deepseek2")
    LAYOUTS["deepseek_v3"].keys(w, resolved({"model_type": "deepseek_v3",
                                              "rope_scaling": DEEPSEEK_YARN}))
    kv = {k.format(arch="deepseek2"): v.value for shard in w.kv_data for k, v in shard.items()}
    r = gguf.Keys.Rope
    got = {key: kv[key.format(arch="deepseek2")] for key in (
        r.SCALING_TYPE, r.SCALING_FACTOR, r.SCALING_ORIG_CTX_LEN, r.SCALING_YARN_BETA_FAST,
        r.SCALING_YARN_BETA_SLOW, r.SCALING_YARN_LOG_MUL)}
    assert got == {r.SCALING_TYPE: "yarn", r.SCALING_FACTOR: 40.0, r.SCALING_ORIG_CTX_LEN: 4096,
                   r.SCALING_YARN_BETA_FAST: 32.0, r.SCALING_YARN_BETA_SLOW: 1.0,
                   r.SCALING_YARN_LOG_MUL: pytest.approx(0.1)}
    assert kv["deepseek2.expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
    assert kv["deepseek2.expert_weights_scale"] == pytest.approx(2.5)  # routed_scaling_factor


def test_gguf_deepseek_v3_pre_tokenizer_is_llama_cpps_deepseek_v3():
    """DeepSeek-V3's tokenizer.json splits digits (1-3), CJK runs, then words before the byte
    level: llama.cpp's ``deepseek-v3`` pre-tokenizer (the digit split alone reads as LLaMA 3's)."""
    from neuqi.formats.export.gguf import _pre_tokenizer

    splits = [{"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}"}, "behavior": "Isolated"},
              {"type": "Split", "pattern": {"Regex": "[一-龥\u3040-ゟ゠-ヿ]+"},
               "behavior": "Isolated"},
              {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]
    tj = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": splits}}
    assert _pre_tokenizer(tj, "deepseek_v3") == "deepseek-v3"
    assert _pre_tokenizer(tj, "llama") == "llama-bpe"
