"""The dense families beyond LLaMA: Gemma, Gemma 2, Gemma 3 (text) and Phi-3.

Tiny random models built from each family's transformers config class (3 layers, hidden 64,
float32 safetensors): the streamed layer-by-layer forward equals transformers' full forward;
`neuqi quantize` killed part-way resumes to a complete output (Gemma 3's: byte for byte the
uninterrupted run's);
the streamed eval of the output equals transformers running it; the compressed-tensors export
loads through ``AutoModelForCausalLM.from_pretrained`` with the output's logits. GGUF: Phi-3,
Gemma 2 and Gemma 3 are written in llama.cpp's layouts and read back by transformers' own GGUF
reader with the output's logits; Gemma (which transformers cannot read from GGUF) is checked
tensor by tensor and key by key with the gguf package's reader against llama.cpp's ``gemma``;
configs that llama.cpp would run differently from transformers are refused in one line.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TINY,
    assert_same_output,
    gguf_in_transformers,
    neuqi,
    one_line_error,
    output_tensors,
    quantize_w4g32_gguf,
)
from test_reliability import Zygote

from neuqi.evaluate import eval_windows, perplexity
from neuqi.formats.loader import load_quantized
from neuqi.model.checkpoint import Checkpoint, load_tokenizer
from neuqi.model.layers import (
    build_embedding,
    build_head,
    build_layer,
    build_rotary,
    layer_forward,
    position_embeddings_for,
)
from neuqi.quant.solver import quantize_tensor
from neuqi.util import faults

KINDS = ["sliding_attention", "full_attention"]
# model_type -> config overrides of the tiny model (conftest's: hidden 64, vocab 512; 2 layers)
FAMILIES: dict[str, dict] = {
    "gemma": {"head_dim": 16, "tie_word_embeddings": True, "num_hidden_layers": 2},
    # sliding window 8 < the inputs' length, so the local layers' mask matters; default
    # soft-capping (attention 50, logits 30)
    "gemma2": {"head_dim": 16, "tie_word_embeddings": True, "sliding_window": 8,
               "query_pre_attn_scalar": 16, "layer_types": KINDS, "num_hidden_layers": 2},
    # local layers rotate with base 10000, the global one with 1e6; logits soft-capped as Gemma 2
    "gemma3_text": {"head_dim": 16, "tie_word_embeddings": True, "sliding_window": 8,
                    "layer_types": KINDS, "final_logit_softcapping": 30.0,
                    "num_hidden_layers": 2},
    "phi3": {"partial_rotary_factor": 0.5, "num_hidden_layers": 2},  # fused qkv_proj / gate_up_proj, untied head
}
# The family whose resumed output is compared with an uninterrupted run (one full run more; the
# comparison is family-independent pipeline behaviour, which test_reliability.py covers in depth).
BITWISE = "gemma3_text"
OPTIONS = ["--bits", "4", "--group-size", "16", "--method", "neuqi-int", *TINY]
WIKITEXT = Path(__file__).resolve().parents[1] / "data" / "wikitext2-test.raw"


@pytest.fixture(scope="module")
def forked(tmp_path_factory: pytest.TempPathFactory):
    # each family's modelling imported once, not in every forked run (seconds each)
    warm = tuple(f"transformers.models.{m}.modeling_{m}" for m in ("gemma", "gemma2", "gemma3", "phi3"))
    zygote = Zygote(tmp_path_factory.mktemp("zygote-families"), (*warm, "neuqi.quant.solver_numba"))
    yield zygote
    zygote.close()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tiny_model_factory: Callable[..., Path]
           ) -> tuple[str, Path]:
    return request.param, tiny_model_factory(request.param, **FAMILIES[request.param])


def _ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def test_streamed_forward_equals_the_transformers_forward(family: tuple[str, Path]):
    from transformers import AutoModelForCausalLM

    model_type, folder = family
    ckpt = Checkpoint.open(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        want = ref(_ids()).logits
        hidden = build_embedding(ckpt, "cpu", torch.float32)(_ids())
        rotary = build_rotary(ckpt.config, "cpu")
        pos = position_embeddings_for(rotary, hidden)
        for i in range(ckpt.layer_count):
            hidden = layer_forward(build_layer(ckpt, i, "cpu", torch.float32), hidden, pos)
        got = build_head(ckpt, "cpu", torch.float32)(hidden)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    if model_type == "gemma3_text":  # two rotary tables, and they differ: the pick matters
        assert set(pos) == set(KINDS) and not torch.allclose(pos[KINDS[0]][0], pos[KINDS[1]][0])
    if model_type == "gemma2":  # soft-capped: eager attention, logits inside (-30, 30)
        assert ckpt.config._attn_implementation == "eager" and want.abs().max() < 30


def _nll_transformers(model: torch.nn.Module, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


def test_quantize_resume_eval_and_compressed_tensors(
    family: tuple[str, Path], forked: Zygote, tmp_path: Path
):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from neuqi.formats.export import export

    model_type, model = family
    out = tmp_path / "out"
    # killed after its 4th completion record (embed, hessian/0, then inside layer 0's solves)
    r = forked("quantize", str(model), "--out", str(out), *OPTIONS,
               env={faults.KILL_AFTER_RECORDS: "4"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not out.exists()
    r = forked("resume", str(tmp_path / "out.job"), "--device", "cpu")
    assert r.returncode == 0 and "resuming job" in r.stderr, r.stderr
    if model_type == BITWISE:  # byte for byte the uninterrupted run's output
        r = forked("quantize", str(model), "--out", str(tmp_path / "ref"), *OPTIONS)
        assert r.returncode == 0, r.stderr
        assert_same_output(out, tmp_path / "ref")

    stored = output_tensors(out)
    tied = FAMILIES[model_type].get("tie_word_embeddings", False)
    # a tied head is the embedding: written once, never a second lm_head copy
    assert ("lm_head.weight" in stored) is not tied and "model.embed_tokens.weight" in stored
    if model_type == "phi3":
        meta = json.loads((out / "neuqi.json").read_text())
        assert "model.layers.0.self_attn.qkv_proj.weight" in meta["quantized"]
        assert "model.layers.0.mlp.gate_up_proj.weight" in meta["quantized"]

    # the streamed eval of the output equals transformers running the same quantized weights
    text = tmp_path / "wiki.txt"
    text.write_bytes(WIKITEXT.read_bytes()[:8000])
    result = perplexity(str(out), text, seqlen=32, max_windows=3, batch_size=2, device="cpu")
    windows = eval_windows(load_tokenizer(out), text.read_text(encoding="utf-8"), 32, 3)
    native = load_quantized(out)
    assert result["nll"] == pytest.approx(_nll_transformers(native, windows), rel=1e-4)

    # compressed-tensors: loads through transformers, with the native output's logits
    ct = tmp_path / "ct"
    report = export(out, "compressed-tensors", ct, model=model)
    assert report.added_loss == pytest.approx(0.0, abs=1e-6 * report.native_loss)
    theirs = AutoModelForCausalLM.from_pretrained(
        ct, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert theirs.config.model_type == model_type
    if tied:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(theirs(_ids()).logits, native(_ids()).logits,
                                   rtol=1e-4, atol=1e-4)

    # GGUF (group 16: re-solved at group 32 from the source weights): this Gemma 3's layer kinds
    # (one local, one global) are not llama.cpp's (one global in six): refused in one line,
    # naming the family and the format that works. Phi-3, Gemma and Gemma 2 are written (checked
    # in test_gguf_export_runs_in_transformers... and test_gguf_gemma_...).
    r = forked("export", str(out), "--format", "gguf", "--out", str(tmp_path / "x.gguf"))
    if model_type == "gemma3_text":
        line = one_line_error(r)
        assert model_type in line and "compressed-tensors" in line
        if model_type == "gemma3_text":
            assert "layer_types" in line and "one global layer in every 6" in line
    else:
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "x.gguf").read_bytes()[:4] == b"GGUF"


UNTIED_GEMMA = {**FAMILIES["gemma"], "tie_word_embeddings": False}


@pytest.mark.parametrize("model_type,fmt", [("gemma", "gguf"), ("gemma3_text", "gguf-q4_k")])
def test_quantize_with_format_gguf_is_refused_before_any_work(
    model_type: str, fmt: str, tiny_model_factory: Callable[..., Path], forked: Zygote,
    tmp_path: Path
):
    """A Gemma with an untied head: llama.cpp's gemma has no output tensor (it reuses the token
    embedding). This Gemma 3: one local and one global layer, where llama.cpp's gemma3 fixes one
    global layer in every six (and its queries scaled by 1/sqrt(256), the query_pre_attn_scalar
    default, where llama.cpp's would be scaled by 1/sqrt(head_dim))."""
    model = tiny_model_factory(model_type, **(UNTIED_GEMMA if model_type == "gemma"
                                              else FAMILIES[model_type]))
    out = tmp_path / "out"
    line = one_line_error(forked("quantize", str(model), "--out", str(out), *OPTIONS,
                                 "--format", fmt))
    if model_type == "gemma":
        assert "gemma with an untied lm_head" in line
    else:
        assert "gemma3_text with layer_types" in line
    assert "compressed-tensors" in line
    assert not out.exists() and not (tmp_path / "out.job").exists()


# Configs llama.cpp runs as transformers does: Gemma 3 with one global layer in six, queries
# scaled by 1/sqrt(head_dim) and no logit soft-capping (llama.cpp fixes all three, as the
# published Gemma 3 configs have them); Phi-3 and Gemma 2 as above.
GGUF_FAMILIES: dict[str, dict] = {
    "phi3": FAMILIES["phi3"],
    # Phi-3 128k / 3.5 / Phi-4-mini: LongRoPE, context 256 over an original 64 (attention
    # factor sqrt(1 + log 4 / log 64)); the inputs (24 tokens) use the short factors
    "phi3-longrope": {**FAMILIES["phi3"], "max_position_embeddings": 256,
                      "original_max_position_embeddings": 64,
                      "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.5,
                                          "short_factor": [1.0, 1.5, 2.0, 3.0],
                                          "long_factor": [2.0, 3.0, 4.0, 8.0],
                                          "original_max_position_embeddings": 64}},
    "gemma2": FAMILIES["gemma2"],
    "gemma3_text": {"head_dim": 16, "tie_word_embeddings": True, "sliding_window": 8,
                    "query_pre_attn_scalar": 16, "num_hidden_layers": 6},
}


@pytest.mark.parametrize("model_type", list(GGUF_FAMILIES))
def test_gguf_export_runs_in_transformers_with_the_native_logits(
    model_type: str, tiny_model_factory: Callable[..., Path], tmp_path: Path
):
    """Quantized (4 bits, groups of 32), written as Q4_1 with the output's own codes, and loaded
    by transformers' GGUF reader: Phi-3's fused attn_qkv / ffn_up (gate | up), Gemma's norms
    stored as 1 + w (llama.cpp's convention) and read back as w, soft-capping and sliding window
    from the file's keys. The logits are the native output's, up to the Q8_0 embedding (the
    head too where tied) and the fp16 block parameters; with the file's embedding and head put
    into the native model, up to the fp16 block parameters alone."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from neuqi.formats.export import export
    from neuqi.formats.export.common import ExportSource
    from neuqi.pipeline.config import QuantizeConfig
    from neuqi.pipeline.runner import quantize

    overrides = GGUF_FAMILIES[model_type]
    model_type = model_type.split("-")[0]
    model = tiny_model_factory(model_type, **overrides)
    out = quantize(QuantizeConfig(model=str(model), out=str(tmp_path / "out"), nsamples=4,
                                  seqlen=32, batch_size=3, bits=4, group_size=32,
                                  method="neuqi"), None, "cpu")
    file = tmp_path / "m.gguf"
    report = export(out, "gguf", file)
    assert report.re_solved == 0 and report.added_loss < 1e-3 * report.native_loss
    reader = GGUFReader(file)
    tensors = {t.name: t for t in reader.tensors}
    fields = {k: f.contents() for k, f in reader.fields.items()}
    source = ExportSource(out)
    config = json.loads((out / "config.json").read_text())
    if model_type == "phi3":
        assert fields["general.architecture"] == "phi3"
        assert fields["phi3.rope.dimension_count"] == 8  # half of head_dim 16 rotates
        qkv, up = tensors["blk.0.attn_qkv.weight"], tensors["blk.0.ffn_up.weight"]
        assert tuple(qkv.shape) == (64, 64 + 2 * 32) and tuple(up.shape) == (64, 2 * 128)
        assert "output.weight" in tensors
        if "rope_parameters" in overrides:  # as convert_hf_to_gguf writes LongRoPE
            assert fields["phi3.rope.scaling.original_context_length"] == 64
            assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(
                (1 + math.log(4) / math.log(64)) ** 0.5)
            assert tensors["rope_factors_short.weight"].data.tolist() == [1.0, 1.5, 2.0, 3.0]
            assert tensors["rope_factors_long.weight"].data.tolist() == [2.0, 3.0, 4.0, 8.0]
    else:
        arch = "gemma2" if model_type == "gemma2" else "gemma3"
        assert fields["general.architecture"] == arch
        assert fields[f"{arch}.attention.sliding_window"] == 8
        assert fields.get(f"{arch}.final_logit_softcapping") == (30.0 if arch == "gemma2"
                                                                 else None)
        assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
        norm = torch.from_numpy(tensors["blk.0.post_ffw_norm.weight"].data.copy())
        stored = source.plain("model.layers.0.post_feedforward_layernorm.weight")
        assert torch.equal(norm, stored.float() + 1)
        if arch == "gemma3":
            assert fields["gemma3.rope.freq_base"] == 1e6  # the global layers' (local: 10000)
            assert "blk.0.attn_q_norm.weight" in tensors
    theirs = gguf_in_transformers(file)
    native = load_quantized(out)
    with torch.no_grad():
        got, ours = theirs(_ids()).logits, native(_ids()).logits
        assert (got - ours).abs().max() < 0.05 * ours.abs().max()
        native.model.embed_tokens.weight.copy_(theirs.model.embed_tokens.weight)
        if not config.get("tie_word_embeddings", False):
            native.lm_head.weight.copy_(theirs.lm_head.weight)
        ours = native(_ids()).logits
    assert (got - ours).abs().max() < 0.01 * ours.abs().max()
    text = "The quick brown fox jumps over the lazy dog."
    mine = AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)(text)["input_ids"][-8:] == (
        mine[-8:])


def test_gguf_gemma_is_llama_cpp_gemma_tensor_by_tensor(
    tiny_model_factory: Callable[..., Path], tmp_path: Path
):
    """Gemma 1 as convert_hf_to_gguf's GemmaModel writes it (llama.cpp's ``gemma``; transformers
    cannot read it back): every tensor llama.cpp's gemma loads (gguf's MODEL_TENSORS) with its
    shape, no output tensor (tied), the quantized linears Q4_1 with the output's own codes and
    fp16 block parameters, the norms as 1 + w, the embedding Q8_0, and the keys of the config."""
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES
    from gguf.quants import dequantize, quantize

    from neuqi.formats.export.common import ExportSource

    model = tiny_model_factory("gemma", **FAMILIES["gemma"])
    out, tensors, fields = quantize_w4g32_gguf(model, tmp_path)
    config = json.loads((out / "config.json").read_text())
    source = ExportSource(out)
    layers, hidden, ffn = config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]
    heads, kv, head_dim = (config["num_attention_heads"], config["num_key_value_heads"],
                           config["head_dim"])
    # [out, in] in transformers' order; GGUFReader gives ggml's [in, out]
    shapes = {"token_embd": (config["vocab_size"], hidden), "output_norm": (hidden,),
              "attn_norm": (hidden,), "ffn_norm": (hidden,), "attn_q": (heads * head_dim, hidden),
              "attn_k": (kv * head_dim, hidden), "attn_v": (kv * head_dim, hidden),
              "attn_output": (hidden, heads * head_dim), "ffn_gate": (ffn, hidden),
              "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    expected = set()
    for kind in MODEL_TENSORS[MODEL_ARCH.GEMMA]:
        name = TENSOR_NAMES[kind]
        for bid in range(layers) if "{bid}" in name else [None]:
            full = f"{name.format(bid=bid)}.weight"
            expected.add(full)
            assert tuple(tensors[full].shape) == shapes[name.split(".")[-1]][::-1], full
    assert set(tensors) == expected  # the head is the token embedding: no output.weight
    assert fields["general.architecture"] == "gemma"
    for key, value in (("context_length", config["max_position_embeddings"]),
                       ("embedding_length", hidden), ("block_count", layers),
                       ("feed_forward_length", ffn), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv), ("attention.key_length", head_dim),
                       ("attention.value_length", head_dim),
                       ("rope.freq_base", config["rope_parameters"]["rope_theta"])):
        assert fields[f"gemma.{key}"] == value, key
    assert fields["gemma.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
    for name, gname in (("model.norm.weight", "output_norm.weight"),
                        *((f"model.layers.{i}.{n}.weight", f"blk.{i}.{g}.weight")
                          for i in range(layers)
                          for n, g in (("input_layernorm", "attn_norm"),
                                       ("post_attention_layernorm", "ffn_norm")))):
        assert tensors[gname].tensor_type.name == "F32"
        assert torch.equal(torch.from_numpy(tensors[gname].data.copy()),
                           source.plain(name).float() + 1), name
    embd = tensors["token_embd.weight"]
    assert embd.tensor_type.name == "Q8_0"
    assert (embd.data == quantize(source.plain("model.embed_tokens.weight").float().numpy(),
                                  embd.tensor_type)).all()  # the converter's --outtype q8_0
    checked = 0
    for name in source.output.quantized:
        i, module = name.split(".")[2], ".".join(name.split(".")[3:-1])
        gname = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}[module]
        t = tensors[f"blk.{i}.{gname}.weight"]  # rows as transformers' (llama.cpp: NeoX rope)
        assert t.tensor_type.name == "Q4_1"
        lin = source.linear(name)
        d = lin.scale.half().float().repeat_interleave(32, 1)
        m = (-lin.scale * lin.zero_point).half().float().repeat_interleave(32, 1)
        assert torch.equal(torch.from_numpy(dequantize(t.data, t.tensor_type).copy()),
                           d * lin.codes.float() + m), name
        checked += 1
    assert checked == 7 * layers


def test_quantize_with_format_gguf_refuses_a_hub_id_before_any_work(
    tiny_model_factory: Callable[..., Path], tmp_path: Path
):
    """A hub id's config.json is read on its own (here offline, from a hub cache laid out as
    huggingface_hub writes it), so the refusal comes before the download and the solve."""
    model = tiny_model_factory("gemma", **UNTIED_GEMMA)
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-gemma"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    shutil.copy(model / "config.json", repo / "snapshots" / ("0" * 40) / "config.json")
    out = tmp_path / "out"
    line = one_line_error(neuqi("quantize", "someone/tiny-gemma", "--out", str(out), *OPTIONS,
                                "--format", "gguf",
                                env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}))
    assert "gemma with an untied lm_head" in line
    assert not out.exists() and not (tmp_path / "out.job").exists()


def test_fused_projections_are_quantized_as_their_parts(tiny_model_factory: Callable[..., Path]):
    """Phi-3's qkv_proj [q | k | v rows, hidden] is quantized as stored. Groups run along the input
    dimension (the group size must divide it), each row has its own scales and zero-points, so
    no group crosses the q|k|v boundary: the fused result is row for row the parts' results."""
    ckpt = Checkpoint.open(tiny_model_factory("phi3", **FAMILIES["phi3"]))
    fused = ckpt.read("model.layers.0.self_attn.qkv_proj.weight", dtype=torch.float32)
    head_dim = ckpt.config.hidden_size // ckpt.config.num_attention_heads
    q_rows = ckpt.config.num_attention_heads * head_dim
    kv_rows = ckpt.config.num_key_value_heads * head_dim
    assert fused.shape == (q_rows + 2 * kv_rows, ckpt.config.hidden_size)
    h = torch.rand(fused.shape[1], generator=torch.Generator().manual_seed(0)) + 0.1
    whole = quantize_tensor(fused, h, bits=4, group_size=16, method="neuqi-int")
    start = 0
    for rows in (q_rows, kv_rows, kv_rows):
        part = quantize_tensor(fused[start:start + rows], h, bits=4, group_size=16,
                               method="neuqi-int")
        for field in ("codes", "scale", "zero_point"):
            assert torch.equal(getattr(whole, field)[start:start + rows], getattr(part, field))
        start += rows


def test_multimodal_gemma3_is_refused_in_one_line(
    tiny_model_factory: Callable[..., Path], forked: Zygote, tmp_path: Path
):
    model = tmp_path / "gemma3"
    shutil.copytree(tiny_model_factory("gemma3_text", **FAMILIES["gemma3_text"]), model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"])
    (model / "config.json").write_text(json.dumps(config))
    line = one_line_error(forked("quantize", str(model), "--out", str(tmp_path / "o"), *OPTIONS))
    assert "'gemma3'" in line and "gemma3_text" in line and "phi3" in line


def test_each_family_maps_to_its_spec_and_others_are_refused_naming_them():
    from neuqi.model.architectures import GEMMA, GEMMA2, GEMMA3, PHI3, SUPPORTED_FAMILIES, arch_for
    from neuqi.util.errors import UserError

    specs = {"gemma": GEMMA, "gemma2": GEMMA2, "gemma3_text": GEMMA3, "phi3": PHI3}
    for model_type, spec in specs.items():
        assert arch_for({"model_type": model_type}) is spec and model_type in SUPPORTED_FAMILIES
    assert PHI3.linears == ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                            "mlp.down_proj")
    assert GEMMA3.module_of("gemma3_text") == "gemma3" and GEMMA2.module_of("gemma2") == "gemma2"
    # soft-capped attention needs the eager implementation; without a cap SDPA is kept
    assert GEMMA2.attn_implementation({"attn_logit_softcapping": 50.0}) == "eager"
    assert GEMMA3.attn_implementation({"attn_logit_softcapping": None}) == "sdpa"
    with pytest.raises(UserError, match="'falcon' is not supported.*gemma2, gemma3_text, phi3"):
        arch_for({"model_type": "falcon"})
    with pytest.raises(UserError, match="bidirectional attention"):
        arch_for({"model_type": "gemma3_text", "use_bidirectional_attention": True})


def test_the_embedding_scale_is_rounded_to_the_model_dtype():
    """As transformers computes it: sqrt(3072) = 55.4256 is 55.5 in bfloat16, the factor a
    bfloat16 Gemma was trained with; a float32 model keeps 55.4256."""
    from transformers import Gemma2Config

    from neuqi.model.architectures import GEMMA2, LLAMA_LIKE
    from neuqi.model.families import embedding_scale

    assert embedding_scale(Gemma2Config(hidden_size=3072, dtype="bfloat16"), GEMMA2) == 55.5
    assert embedding_scale(Gemma2Config(hidden_size=3072, dtype="float32"), GEMMA2) == (
        pytest.approx(3072**0.5, rel=1e-7))
    assert embedding_scale(Gemma2Config(hidden_size=3072), LLAMA_LIKE) is None
