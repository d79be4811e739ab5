"""Tests for neuqi.formats.output (atomic sharded writer) and neuqi.formats.loader (reading it back as a model)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from neuqi.formats.loader import DequantLinear, NeuqiOutput, load_quantized, read_dequantized
from neuqi.formats.output import FORMAT, INDEX_FILE, META_FILE, OutputWriter
from neuqi.model.checkpoint import Checkpoint
from neuqi.quant.packing import packed_size
from neuqi.util.errors import UserError

INPUT_IDS = torch.tensor([[3, 17, 250, 42, 99, 7, 300, 12, 5, 64, 128, 1]])


def rtn(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, ...]:
    """Min-max round-to-nearest with a float zero-point: (codes uint8, scale, zero, dequantized)."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    wg = w.to(torch.float32).reshape(out_f, in_f // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    zero = -lo / scale  # deliberately not rounded: float zero-points
    codes = torch.clamp(torch.round(wg / scale[..., None] + zero[..., None]), 0, levels)
    deq = (scale[..., None] * (codes - zero[..., None])).reshape(out_f, in_f)
    return codes.to(torch.uint8).reshape(out_f, in_f), scale, zero, deq


def layer_linear_names(ckpt: Checkpoint) -> list[str]:
    return [
        f"{ckpt.arch.layer_prefix(i)}{lin}.weight"
        for i in range(ckpt.layer_count)
        for lin in ckpt.arch.linears
    ]


def write_output(
    src: Path,
    out: Path,
    bits: int = 4,
    group_size: int = 16,
    max_shard_bytes: int = 2**30,
) -> dict[str, torch.Tensor]:
    """Quantize every layer linear of ``src`` with RTN into ``out``; return the dequantized ones."""
    ckpt = Checkpoint.open(src)
    quantized = set(layer_linear_names(ckpt))
    deq: dict[str, torch.Tensor] = {}
    info = {"bits": bits, "group_size": group_size, "method": "rtn-test", "seed": 0}
    with OutputWriter(out, ckpt, info, max_shard_bytes=max_shard_bytes) as w:
        for name in ckpt.names:
            t = ckpt.read(name)
            if name in quantized:
                codes, scale, zero, deq[name] = rtn(t, bits, group_size)
                w.add_quantized(name, codes, scale, zero, bits, group_size)
            else:
                w.add_tensor(name, t)
    return deq


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


def reference_logits(src: Path, deq: dict[str, torch.Tensor]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(
        str(src), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    state = ref.state_dict()
    with torch.no_grad():
        for name, w in deq.items():
            state[name].copy_(w)
        return ref(INPUT_IDS).logits


# ---------------------------------------------------------------------------- round trip
@pytest.mark.parametrize(("bits", "group_size"), [(4, 16), (3, -1), (2, 32), (8, 64)])
def test_round_trip_llama(tiny_llama: Path, tmp_path: Path, bits: int, group_size: int) -> None:
    out = tmp_path / "out"
    deq = write_output(tiny_llama, out, bits, group_size)
    model = load_quantized(out)

    # (a) every layer linear is a DequantLinear whose weight is exactly the dequantized one
    for name, w in deq.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(module, DequantLinear)
        assert module.bits == bits and module.group_size == group_size
        assert torch.equal(module.dequantized_weight(), w), name
        assert torch.equal(read_dequantized(out, name), w), name
    # unquantized tensors are bit-exact
    ckpt = Checkpoint.open(tiny_llama)
    state = model.state_dict()
    for name in ckpt.names:
        if name not in deq:
            assert torch.equal(state[name], ckpt.read(name)), name

    # (b) logits match transformers' own model carrying the same dequantized weights
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
    ref = reference_logits(tiny_llama, deq)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    # ... and quantization did change something (the test is not vacuous)
    if bits < 8:
        orig = reference_logits(tiny_llama, {})
        assert not torch.allclose(logits, orig, atol=1e-3)


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_qwen3", "tiny_mistral"])
def test_round_trip_other_families(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    src: Path = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    deq = write_output(src, out, 4, 32)
    model = load_quantized(out)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, DequantLinear)
    if fixture == "tiny_qwen2":  # q/k/v biases and a head tied to the embedding
        assert q.bias is not None
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
    torch.testing.assert_close(logits, reference_logits(src, deq), rtol=1e-5, atol=1e-5)


def test_bfloat16_load(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    deq = write_output(tiny_llama, out, 4, 16)
    model = load_quantized(out, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    q = model.get_submodule("model.layers.1.mlp.down_proj")
    assert q.scales.dtype == torch.float32  # scales and zeros stay exact
    w = deq["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(q.dequantized_weight(torch.bfloat16), w.to(torch.bfloat16))
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------- folder contents
def test_folder_contents(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_output(tiny_llama, out, 3, -1)
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        META_FILE,
        INDEX_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert "generation_config.json" in names
    assert "model.safetensors" not in names  # never the source weights
    assert [n for n in names if n.endswith(".safetensors")] == ["model-00001-of-00001.safetensors"]

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "neuqi" and qc["format"] == FORMAT
    assert (qc["bits"], qc["group_size"], qc["method"], qc["seed"]) == (3, -1, "rtn-test", 0)
    src_config = json.loads((tiny_llama / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == src_config

    meta = json.loads((out / META_FILE).read_text())
    assert meta["format"] == FORMAT and meta["format_version"] == 1
    assert meta["source"]["fingerprint"] == Checkpoint.open(tiny_llama).fingerprint()
    entry = meta["quantized"]["model.layers.2.mlp.down_proj.weight"]
    assert (entry["bits"], entry["group_size"], entry["shape"]) == (3, -1, [64, 128])
    assert meta["unquantized"]["model.norm.weight"] == {"dtype": "float32", "shape": [64]}

    with safe_open(str(out / "model-00001-of-00001.safetensors"), framework="pt") as f:
        qweight = f.get_tensor("model.layers.2.mlp.down_proj.qweight")
        scales = f.get_tensor("model.layers.2.mlp.down_proj.scales")
        zeros = f.get_tensor("model.layers.2.mlp.down_proj.zeros")
        stored = set(f.keys())
    assert "model.layers.2.mlp.down_proj.weight" not in stored
    assert qweight.dtype == torch.uint8 and qweight.shape == (64, packed_size(128, 3))
    assert scales.dtype == zeros.dtype == torch.float32 and scales.shape == (64, 1)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("hello world")["input_ids"]


# ---------------------------------------------------------------------------- atomicity
def test_refuses_foreign_folder(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not a neuqi output"):
        write_output(tiny_llama, out)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    assert siblings(out) == []


def test_refuses_file(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("x")
    with pytest.raises(UserError, match="not a neuqi output"):
        OutputWriter(out, Checkpoint.open(tiny_llama), {"bits": 4})
    assert out.read_text() == "x"


def test_exception_leaves_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ckpt = Checkpoint.open(tiny_llama)
    writer = OutputWriter(out, ckpt, {"bits": 4}, max_shard_bytes=10_000)
    with pytest.raises(RuntimeError, match="boom"), writer as w:
        for name in ckpt.names[:5]:
            w.add_tensor(name, ckpt.read(name))
        assert any(w.temp_dir.iterdir())  # shards were written
        raise RuntimeError("boom")
    assert not out.exists()
    assert siblings(out) == []


def test_exception_keeps_previous_output(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_output(tiny_llama, out, 4, 16)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ckpt = Checkpoint.open(tiny_llama)
    with pytest.raises(KeyboardInterrupt), OutputWriter(out, ckpt, {"bits": 2}) as w:
        w.add_tensor(ckpt.names[0], ckpt.read(ckpt.names[0]))
        raise KeyboardInterrupt
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert siblings(out) == []


def test_incomplete_output_is_not_published(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ckpt = Checkpoint.open(tiny_llama)
    with pytest.raises(RuntimeError, match="incomplete"), OutputWriter(out, ckpt, {"bits": 4}) as w:
        w.add_tensor(ckpt.names[0], ckpt.read(ckpt.names[0]))
    assert not out.exists() and siblings(out) == []


def test_rerun_replaces_previous_output(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_output(tiny_llama, out, 4, 16, max_shard_bytes=20_000)
    n_before = len(list(out.glob("model-*.safetensors")))
    (out / "stale.txt").write_text("from the first run")
    deq = write_output(tiny_llama, out, 3, -1)
    assert not (out / "stale.txt").exists()
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert n_before > 1 and shards == ["model-00001-of-00001.safetensors"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 3
    name = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(read_dequantized(out, name), deq[name])
    assert siblings(out) == []


def test_leftover_partial_is_removed(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = tmp_path / "out.partial-0123456789abcdef"
    killed.mkdir()
    (killed / "model-00001.safetensors").write_bytes(b"half")
    unrelated = tmp_path / "out.partial-mine"  # not our naming: left alone
    unrelated.mkdir()
    write_output(tiny_llama, out)
    assert not killed.exists()
    assert unrelated.exists()
    assert siblings(out) == ["out.partial-mine"]


def test_empty_existing_folder_is_used(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_output(tiny_llama, out)
    assert (out / META_FILE).is_file()


# ---------------------------------------------------------------------------- sharding
def test_small_shards_have_a_correct_index(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    limit = 20_000
    deq = write_output(tiny_llama, out, 4, 16, max_shard_bytes=limit)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    index = json.loads((out / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    assert set(weight_map.values()) == set(shards)
    total = 0
    seen: set[str] = set()
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            keys = set(f.keys())
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys]
        assert keys == {k for k, v in weight_map.items() if v == shard}
        assert not keys & seen
        seen |= keys
        total += sum(sizes)
        # a shard exceeds the limit only when it holds one tensor larger than the limit
        assert sum(sizes) <= limit or len(keys) == 1
    assert seen == set(weight_map)
    assert index["metadata"]["total_size"] == total

    ckpt = Checkpoint.open(tiny_llama)
    expected = {n for n in ckpt.names if n not in deq}
    for name in deq:
        prefix = name.removesuffix(".weight")
        expected |= {f"{prefix}.qweight", f"{prefix}.scales", f"{prefix}.zeros"}
    assert set(weight_map) == expected

    model = load_quantized(out)
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
    torch.testing.assert_close(logits, reference_logits(tiny_llama, deq), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- loader errors
def test_loader_refuses_non_output(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a neuqi output"):
        load_quantized(tiny_llama)
    with pytest.raises(UserError, match="does not exist"):
        load_quantized(tmp_path / "nowhere")


def test_loader_refuses_other_version(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_output(tiny_llama, out)
    meta = json.loads((out / META_FILE).read_text())
    meta["format_version"] = 99
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="not supported"):
        NeuqiOutput.open(out)


def test_loader_reports_missing_shard(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_output(tiny_llama, out, max_shard_bytes=20_000)
    os.remove(next(out.glob("model-00002-of-*.safetensors")))
    with pytest.raises(UserError, match="missing"):
        load_quantized(out)


def test_read_dequantized_unknown_name(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_output(tiny_llama, out)
    with pytest.raises(UserError, match="not a quantized weight"):
        read_dequantized(out, "model.norm.weight")
    assert NeuqiOutput.open(out).weight("model.norm.weight").shape == (64,)


def test_writer_rejects_bad_input(tiny_llama: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint.open(tiny_llama)
    w = OutputWriter(tmp_path / "out", ckpt, {"bits": 4})
    try:
        codes = torch.zeros(8, 32, dtype=torch.uint8)
        s = torch.ones(8, 2)
        with pytest.raises(ValueError, match="must end with"):
            w.add_quantized("x.bias", codes, s, s, 4, 16)
        with pytest.raises(ValueError, match="does not divide"):
            w.add_quantized("x.weight", codes, s, s, 4, 12)
        with pytest.raises(ValueError, match="shape"):
            w.add_quantized("x.weight", codes, torch.ones(8, 3), s, 4, 16)
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            w.add_quantized("x.weight", codes + 7, s, s, 2, 16)
        w.add_quantized("x.weight", codes, s, s, 4, 16)
        with pytest.raises(ValueError, match="already added"):
            w.add_tensor("x.weight", codes)
    finally:
        w.abort()
    assert siblings(tmp_path / "out") == []
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
