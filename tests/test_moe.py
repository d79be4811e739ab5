"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) on tiny random models
built from each family's transformers config class and saved as the published checkpoints store
them (one tensor per expert and projection; DeepSeek-V3's linears as FP8 with block scales).

For each family: the streamed forward equals transformers' whole forward; a real `neuqi quantize`
process is killed and resumed and must give the uninterrupted run's output bit for bit; the
output is evaluated and loaded (neuqi's loader through transformers' model classes, and the
compressed-tensors export unpacked by compressed-tensors itself). GGUF: Qwen2-MoE and Qwen3-MoE
are read back by transformers' own GGUF reader with the output's logits; Mixtral (llama.cpp's
``llama`` with experts, which transformers' reader loads as a dense LLaMA) is checked tensor by
tensor with the gguf package's reader; so is DeepSeek-V3 (llama.cpp's ``deepseek2``: latent
attention with kv_b_proj split, shared experts, the first dense layers, exp_probs_b).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import test_reliability as reliability
import torch
from helpers import (
    TINY,
    assert_same_output,
    gguf_in_transformers,
    neuqi,
    one_line_error,
    quantize_w4g32_gguf,
)
from test_reliability import Zygote

from neuqi.evaluate import OutputModel
from neuqi.formats.loader import NeuqiOutput, load_quantized
from neuqi.model.architectures import arch_for
from neuqi.model.checkpoint import Checkpoint
from neuqi.model.layers import (
    build_embedding,
    build_head,
    build_layer,
    build_rotary,
    layer_forward,
    position_embeddings_for,
)
from neuqi.model.moe import MOE_MIN_TOKENS, ExpertLinears
from neuqi.model.synthetic import build_from_config, tiny_moe_config
from neuqi.util import faults

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]
WARM = "".join(f"import transformers.models.{f}.modeling_{f}\n" for f in FAMILIES) + (
    "import torch\ntorch.set_num_threads(1)\n")
FP8_BLOCK = 8  # DeepSeek-V3's 128x128 blocks, scaled to the tiny shapes
LAYERS = 2  # DeepSeek-V3: dense then MoE; Qwen2-MoE: MoE then dense (mlp_only_layers [1])
OPTIONS = ["--bits", "4", "--group-size", "16", "--solver-backend", "numba", *TINY]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path
               ) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {f: build_from_config(root / f, tiny_moe_config(f, layers=LAYERS), seed=1,
                                 tokenizer_dir=tiny_tokenizer_dir,
                                 fp8_block=FP8_BLOCK if f == "deepseek_v3" else 0)
            for f in FAMILIES}


@pytest.fixture
def fast_tmp(tmp_path: Path):
    """A folder in memory (/dev/shm) where there is one: the job store's many fsyncs cost
    nothing there, which is most of a tiny job's time on a disk."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="neuqi-moe-", dir=shm))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def forked(tmp_path_factory: pytest.TempPathFactory):
    """test_reliability's warm `neuqi` process, also warm with the MoE modelling code, and with
    one torch thread: a tiny model's ops are microseconds, which a second thread on a busy
    2-core machine turns into milliseconds (``index_add_``: 1.2 ms against 5 µs)."""
    script = reliability._ZYGOTE
    reliability._ZYGOTE = script.replace('print("ready"', WARM + 'print("ready"')
    try:
        zygote = Zygote(tmp_path_factory.mktemp("moe-zygote"))
    finally:
        reliability._ZYGOTE = script
    yield zygote
    zygote.close()


def _ids() -> torch.Tensor:
    return torch.randint(2, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def _streamed(ckpt: Checkpoint, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        hidden = build_embedding(ckpt, "cpu", torch.float32)(ids)
        pe = position_embeddings_for(build_rotary(ckpt.config, "cpu"), hidden)
        for i in range(ckpt.layer_count):
            hidden = layer_forward(build_layer(ckpt, i, "cpu", torch.float32), hidden, pe)
        return build_head(ckpt, "cpu", torch.float32)(hidden)


# ------------------------------------------------------------------------------ the checkpoints


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_forward_equals_transformers(family: str, moe_models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    folder = moe_models[family]
    extra = {}
    if family == "deepseek_v3":  # transformers dequantizes the FP8 checkpoint on its own
        extra["quantization_config"] = FineGrainedFP8Config(
            dequantize=True, weight_block_size=(FP8_BLOCK, FP8_BLOCK))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                 attn_implementation="sdpa", **extra)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    got = _streamed(Checkpoint.open(folder), ids)
    assert expected.abs().max() > 1.0  # logits carry signal
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4


def test_layouts_of_the_families(moe_models: dict[str, Path]) -> None:
    mixtral = Checkpoint.open(moe_models["mixtral"]).arch
    # as the published checkpoints (and transformers' save_pretrained) name them
    assert mixtral.linears_of(0)[4:7] == ("block_sparse_moe.experts.0.w1",
                                          "block_sparse_moe.experts.0.w3",
                                          "block_sparse_moe.experts.0.w2")
    assert len(mixtral.linears_of(0)) == 4 + 4 * 3
    qwen2 = Checkpoint.open(moe_models["qwen2_moe"]).arch
    assert qwen2.moe is not None and qwen2.moe.sparse_layers == (0,)  # mlp_only_layers [1]
    assert "mlp.shared_expert.down_proj" in qwen2.linears_of(0)
    assert qwen2.linears_of(1)[-3:] == ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    deepseek = Checkpoint.open(moe_models["deepseek_v3"])
    arch = deepseek.arch
    assert not arch.is_moe_layer(0) and arch.is_moe_layer(1)  # first_k_dense_replace = 1
    assert arch.linears_of(1)[:4] == ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa",
                                      "self_attn.q_b_proj", "self_attn.kv_b_proj")
    assert "mlp.shared_experts.gate_proj" in arch.linears_of(1)
    for a in (mixtral, qwen2, arch):  # the routers (and Qwen2-MoE's shared gate) stay as stored
        assert not any(n.endswith((".gate", "shared_expert_gate"))
                       for i in range(LAYERS) for n in a.linears_of(i))
    layer = build_layer(deepseek, 1, "cpu", torch.float32)
    assert isinstance(layer.mlp.experts, ExpertLinears) and len(layer.mlp.experts) == 4


def test_mixtral_fixture_has_the_names_transformers_saves(
    moe_models: dict[str, Path], tmp_path: Path,
) -> None:
    """The fixture's Mixtral tensor names are those transformers' own ``save_pretrained`` writes
    for a MixtralForCausalLM (it reverses its ``block_sparse_moe`` -> ``mlp`` renaming and the
    fused experts on save): ``block_sparse_moe.gate`` and ``block_sparse_moe.experts.{e}.w1/w2/w3``,
    the names of the published Mixtral-8x7B / 8x22B checkpoints."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_moe_config("mixtral", layers=LAYERS))
    model.save_pretrained(tmp_path / "saved")
    names = []
    for folder in (tmp_path / "saved", moe_models["mixtral"]):
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            names.append(sorted(f.keys()))
    assert names[0] == names[1]
    assert "model.layers.1.block_sparse_moe.gate.weight" in names[0]
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names[0]
    assert not any(".mlp." in n for n in names[0])


@pytest.mark.parametrize("block", ["block_sparse_moe", "mlp"])
def test_mixtral_in_either_block_name_quantizes_loads_and_exports(
    block: str, tiny_tokenizer_dir: Path, tmp_path: Path,
) -> None:
    """A Mixtral checkpoint as published (``block_sparse_moe``) or re-saved in transformers'
    module names (``mlp``): neuqi reads the experts and the router under the checkpoint's own
    name, writes the output in it (transformers' renaming then applies to the output as to the
    original), and the loader, the plan and both exports read it."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from neuqi.formats.export import export
    from neuqi.pipeline.config import QuantizeConfig
    from neuqi.pipeline.plan import read_shape
    from neuqi.pipeline.runner import quantize

    config = tiny_moe_config("mixtral", layers=LAYERS)
    model = build_from_config(tmp_path / "model", config, seed=1, tokenizer_dir=tiny_tokenizer_dir,
                              moe_block=block)
    ckpt = Checkpoint.open(model)
    assert ckpt.arch.moe is not None and ckpt.arch.moe.block == block
    assert ckpt.arch.linears_of(1)[-1] == f"{block}.experts.3.w2"
    ids = _ids()
    with torch.no_grad():  # transformers' own loading renames and fuses either naming
        theirs = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)(ids).logits
        original = _streamed(ckpt, ids)
    torch.testing.assert_close(original, theirs, rtol=1e-4, atol=1e-4)
    shape = read_shape(str(model))  # neuqi plan: the experts found under the checkpoint's name
    assert sum(n.startswith(f"{block}.experts.") for n, _, _ in shape.linears) == 3 * 4

    out = quantize(QuantizeConfig(model=str(model), out=str(tmp_path / "out"), nsamples=4,
                                  seqlen=32, batch_size=3, bits=4, group_size=32,
                                  method="neuqi-int"), None, "cpu")
    meta = json.loads((Path(out) / "neuqi.json").read_text())
    assert set(meta["quantized"]) == {f"model.layers.{i}.{lin}.weight"
                                      for i in range(LAYERS) for lin in ckpt.arch.linears_of(i)}
    assert f"model.layers.0.{block}.gate.weight" in meta["unquantized"]  # the router, as stored
    with torch.no_grad():
        loaded = load_quantized(out)(ids).logits
    assert loaded.isfinite().all()
    err = float((loaded - original).abs().mean() / original.abs().mean())
    assert 0 < err < 0.5

    ct = tmp_path / "ct"
    export(out, "compressed-tensors", ct)
    index = json.loads((ct / "model.safetensors.index.json").read_text())["weight_map"]
    assert f"model.layers.1.{block}.experts.3.w2.weight_packed" in index
    assert f"model.layers.1.{block}.gate.weight" in index
    report = export(out, "gguf", tmp_path / "m.gguf")
    assert report.re_solved == 0
    tensors = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}
    for i in range(LAYERS):
        assert tensors[f"blk.{i}.ffn_down_exps.weight"].tensor_type.name == "Q4_1"
        assert tensors[f"blk.{i}.ffn_gate_inp.weight"].tensor_type.name == "F32"


def test_mixtral_block_name_is_resolved_from_the_checkpoint(moe_models: dict[str, Path]) -> None:
    config = Checkpoint.open(moe_models["mixtral"]).config
    published = arch_for(config)
    assert published.moe is not None and published.moe.block == "block_sparse_moe"
    names = {"model.layers.0.mlp.experts.0.w1.weight"}
    assert arch_for(config, names).linears_of(0)[4] == "mlp.experts.0.w1"
    assert arch_for(config, set()).moe == published.moe  # neither: reported missing as published
    from neuqi.util.errors import UserError

    with pytest.raises(UserError, match="block_sparse_moe or mlp"):
        published.with_block("moe")
    qwen = arch_for(tiny_moe_config("qwen3_moe", layers=LAYERS))
    assert qwen.for_names({"model.layers.0.block_sparse_moe.experts.0.gate_proj.weight"}) is qwen


def test_expert_by_expert_streaming_gives_the_whole_layers_output(
    moe_models: dict[str, Path],
) -> None:
    """What the plan picks when a layer's experts do not fit: each expert projection read from
    the shards when it runs and dropped after it, the MoE block over chunks of tokens."""
    from neuqi.stages.layer import load_layer

    ckpt = Checkpoint.open(moe_models["deepseek_v3"])
    hidden = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(5))
    pe = position_embeddings_for(build_rotary(ckpt.config, "cpu"), hidden)
    reads = []
    read = ckpt.read

    def counting(name: str, *args, **kwargs):
        reads.append(name)
        return read(name, *args, **kwargs)

    with torch.no_grad():
        whole = layer_forward(build_layer(ckpt, 1, "cpu", torch.float32), hidden, pe)
        ckpt.read = counting  # type: ignore[method-assign]
        streamed_layer = load_layer(ckpt, 1, torch.device("cpu"), torch.float32,
                                    linear_at_a_time=True, mlp_chunk=16)
        assert not any(".experts." in n for n in reads)  # nothing of the experts held yet
        streamed = layer_forward(streamed_layer, hidden, pe)
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-5)
    assert sum(".experts." in n for n in reads) >= 3 * 4  # each expert read when it ran
    assert all(m.weight.is_meta for m in streamed_layer.mlp.experts.modules()
               if isinstance(m, torch.nn.Linear))  # and dropped after


def test_fp8_weights_are_dequantized_block_by_block(moe_models: dict[str, Path]) -> None:
    from safetensors import safe_open

    folder = moe_models["deepseek_v3"]
    ckpt = Checkpoint.open(folder)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # 40 rows: 5 blocks of 8
    assert ckpt.stored_dtype(name) == "F8_E4M3"
    assert name.replace("weight", "weight_scale_inv") not in ckpt.names  # part of the weight
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        q, s = f.get_tensor(name), f.get_tensor(name.replace("weight", "weight_scale_inv"))
    whole = q.float() * s.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    assert torch.equal(ckpt.read(name, dtype=torch.float32), whole)
    assert ckpt.read(name).dtype == torch.bfloat16  # no dtype: the model's compute dtype


# ------------------------------------------------------------------------------ quantize


@pytest.mark.parametrize("family", [
    *(pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES[:-1]), "deepseek_v3"])
def test_quantize_killed_and_resumed_then_eval_and_load(
    family: str, moe_models: dict[str, Path], fast_tmp: Path, forked: Zygote,
) -> None:
    model = moe_models[family]
    ref, out = fast_tmp / "ref", fast_tmp / "out"
    calibration = "all" if family == "qwen3_moe" else "routed"
    options = [*OPTIONS, "--moe-calibration", calibration]
    r = forked("quantize", str(model), "--out", str(ref), *options)
    assert r.returncode == 0, r.stderr
    assert f"calibration tokens ({calibration})" in r.stderr
    # killed after the 6th record (embed, hessian/0 and 4 solves of layer 0), then resumed
    r = forked("quantize", str(model), "--out", str(out), *options,
               env={faults.KILL_AFTER_RECORDS: "6"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    r = forked("resume", f"{out}.job", "--device", "cpu")
    assert r.returncode == 0 and "resuming job" in r.stderr, r.stderr
    assert_same_output(out, ref)

    arch = Checkpoint.open(model).arch
    meta = json.loads((out / "neuqi.json").read_text())
    moe = meta["quant_info"]["moe"]
    assert moe["calibration"] == calibration and moe["router"] == "full precision"
    sparse = arch.moe.sparse_layers if arch.moe else ()
    assert sorted(moe["layers"]) == [str(i) for i in sparse]
    for info in moe["layers"].values():
        assert len(info["expert_tokens"]) == 4
        # every token goes to 2 experts (to all 4 with --moe-calibration all)
        assert sum(info["expert_tokens"]) == 4 * 32 * (4 if calibration == "all" else 2)
    quantized = set(meta["quantized"])
    assert quantized == {f"{arch.layer_prefix(i)}{lin}.weight"
                         for i in range(LAYERS) for lin in arch.linears_of(i)}
    assert f"{arch.layer_prefix(sparse[0])}{arch.moe.router}.weight" in meta["unquantized"]
    assert not any(n.endswith("weight_scale_inv") for n in meta["unquantized"])

    # eval, streamed from the output; and the whole model through transformers' classes
    outm = OutputModel(out)
    ids = _ids()
    with torch.no_grad():
        hidden = outm.embedding("cpu")(ids)
        pe = position_embeddings_for(build_rotary(outm.config, "cpu"), hidden)
        for i in range(outm.layer_count):
            hidden = layer_forward(outm.layer(i, "cpu"), hidden, pe)
        streamed = outm.head("cpu")(hidden)
        whole = load_quantized(out)(ids).logits
        original = _streamed(Checkpoint.open(model), ids)
    torch.testing.assert_close(whole, streamed, rtol=1e-5, atol=1e-5)
    err = float((whole - original).abs().mean() / original.abs().mean())
    assert 0 < err < 0.5  # 4 bits: close to the original, not equal to it


@pytest.mark.parametrize("mode", ["routed", "all"])
def test_expert_hessian_is_its_routed_tokens_or_all(
    mode: str, moe_models: dict[str, Path], tmp_path: Path,
) -> None:
    """Each expert's stored diagonal is ``mean x_j²`` over the tokens transformers' router sends
    to it (``routed``) or over all tokens (``all``), recomputed here from the MoE block's input;
    an expert under MOE_MIN_TOKENS takes the router input's (all tokens) diagonal."""
    from neuqi.pipeline.store import JobStore
    from neuqi.stages.common import acts_name, h_name
    from neuqi.stages.hessian import DAMPING, batch_sums, write_hessian

    ckpt = Checkpoint.open(moe_models["qwen3_moe"])
    layer = build_layer(ckpt, 0, "cpu", torch.float32)
    rotary = build_rotary(ckpt.config, "cpu")
    store = JobStore.create_or_open(tmp_path / "job", {"test": mode})
    hidden = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(3))
    store.write_array(acts_name(0), hidden)
    seen = []
    handle = layer.mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, 64)))
    sums = batch_sums(store, 0, layer, ckpt.arch, rotary, 2, torch.device("cpu"), [0, 2],
                      moe_all=mode == "all")
    handle.remove()
    info: dict = {}
    write_hessian(store, 0, ckpt.arch, sums, info)
    x = torch.cat(seen).double()
    with torch.no_grad():
        chosen = layer.mlp.gate(x.float())[2]  # transformers' own top-k
    tokens = []
    for e in range(4):
        rows = x if mode == "all" else x[(chosen == e).any(-1)]
        tokens.append(rows.shape[0])
        if mode == "routed" and rows.shape[0] < MOE_MIN_TOKENS:
            rows = x  # fell back to the layer's all-token statistics
        want = (rows * rows).mean(0)
        want = want + DAMPING * want.mean()
        got = store.read_array(h_name(0, f"e{e}_in")).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert info["expert_tokens"] == tokens and sum(tokens) == (
        4 * 4 * 32 if mode == "all" else 2 * 4 * 32)
    fell = [e for e, n in enumerate(tokens) if n < MOE_MIN_TOKENS]
    assert info["experts_fallback"] == ([] if mode == "all" else fell)
    if mode == "routed":
        assert fell and len(fell) < 4  # the fixture's routing exercises both cases


# ------------------------------------------------------------------------------ exports


def test_compressed_tensors_export_unpacks_to_the_native_weights(
    moe_models: dict[str, Path], fast_tmp: Path, forked: Zygote,
) -> None:
    """transformers 5.25 cannot load an MoE compressed-tensors checkpoint with asymmetric
    (zero-point) weights: it fuses the experts and its dequantizer fails with "Asymmetric quant
    requires zero-point values" (README). The export is checked with compressed-tensors' own
    decompressor against neuqi's loader instead."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors import safe_open

    native, ct = fast_tmp / "native", fast_tmp / "ct"
    r = forked("quantize", str(moe_models["mixtral"]), "--out", str(native), *OPTIONS,
               "--format", "compressed-tensors", "--export-out", str(ct))
    assert r.returncode == 0, r.stderr
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"],
                                weights=QuantizationArgs(**qc["config_groups"]["group_0"]["weights"]))
    index = json.loads((ct / "model.safetensors.index.json").read_text())["weight_map"]
    out = NeuqiOutput.open(native)
    checked = 0
    for name in out.quantized:
        prefix = name[: -len(".weight")]
        state = {}
        for part in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
            with safe_open(str(ct / index[f"{prefix}.{part}"]), framework="pt") as f:
                state[part] = f.get_tensor(f"{prefix}.{part}")
        got = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        torch.testing.assert_close(got.float(), out.dequantized(name), rtol=0, atol=1e-6)
        checked += ".experts." in name
    assert checked == LAYERS * 4 * 3  # every expert's three projections of every layer


# llama.cpp's qwen2moe has experts in every layer and does not renormalize the top-k weights;
# the shared expert's width a multiple of the GGUF block (32)
GGUF_CONFIGS = {"mixtral": {}, "qwen3_moe": {},
                "qwen2_moe": {"mlp_only_layers": [], "norm_topk_prob": False,
                              "shared_expert_intermediate_size": 64}}


@pytest.mark.parametrize("family", list(GGUF_CONFIGS))
def test_gguf_export_stacks_the_experts(
    family: str, tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    """4 bits, groups of 32, written as Q4_1 with the output's own codes: each layer's experts
    stacked into ffn_{gate,up,down}_exps ``[experts, out, in]``, the routers (and Qwen2-MoE's
    shared expert gate) in F32 as stored. Qwen-MoE: transformers' GGUF reader gives the native
    logits (up to the Q8_0 embedding and head and the fp16 block parameters). Mixtral: every
    expert of the stacks is the output's codes with its fp16 block parameters, the router and
    the expert keys are llama.cpp's."""
    from gguf.quants import dequantize

    from neuqi.formats.export.common import ExportSource
    from neuqi.formats.export.gguf import qk_permutation

    config = tiny_moe_config(family, layers=LAYERS, **GGUF_CONFIGS[family])
    model = build_from_config(tmp_path / "model", config, seed=1, tokenizer_dir=tiny_tokenizer_dir)
    out, tensors, fields = quantize_w4g32_gguf(model, tmp_path)
    arch = fields["general.architecture"]
    assert arch == {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[family]
    assert (fields[f"{arch}.expert_count"], fields[f"{arch}.expert_used_count"]) == (4, 2)
    source = ExportSource(out)
    moe = Checkpoint.open(model).arch.moe
    names = moe.expert_linears
    for i in range(LAYERS):
        for kind, proj in zip(("gate", "up", "down"), names, strict=True):
            t = tensors[f"blk.{i}.ffn_{kind}_exps.weight"]
            assert t.tensor_type.name == "Q4_1"
            stack = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
            assert stack.shape[0] == 4
            for e in range(4):
                lin = source.linear(f"model.layers.{i}.{moe.expert(e, proj)}.weight")
                d = lin.scale.half().float().repeat_interleave(32, 1)
                m = (-lin.scale * lin.zero_point).half().float().repeat_interleave(32, 1)
                assert torch.equal(stack[e], d * lin.codes.float() + m), (i, kind, e)
        router = tensors[f"blk.{i}.ffn_gate_inp.weight"]
        assert router.tensor_type.name == "F32"
        assert torch.equal(torch.from_numpy(router.data.copy()),
                           source.plain(f"model.layers.{i}.{moe.router}.weight").float())
    if family == "qwen2_moe":
        assert tensors["blk.0.ffn_gate_inp_shexp.weight"].tensor_type.name == "F32"
        assert fields["qwen2moe.expert_shared_feed_forward_length"] == 64
    if family == "mixtral":  # q/k rows permuted as convert_hf_to_gguf does for LLaMA
        q = torch.from_numpy(dequantize(tensors["blk.0.attn_q.weight"].data, tensors[
            "blk.0.attn_q.weight"].tensor_type).copy())
        native = source.linear("model.layers.0.self_attn.q_proj.weight").dequantized()
        torch.testing.assert_close(q, native[qk_permutation(64, 4)], rtol=0, atol=2e-3)
        return
    theirs = gguf_in_transformers(tmp_path / "m.gguf")
    ours_model = load_quantized(out)
    with torch.no_grad():
        got, ours = theirs(_ids()).logits, ours_model(_ids()).logits
        assert (got - ours).abs().max() < 0.05 * ours.abs().max()
        ours_model.model.embed_tokens.weight.copy_(theirs.model.embed_tokens.weight)
        ours_model.lm_head.weight.copy_(theirs.lm_head.weight)
        ours = ours_model(_ids()).logits
    assert (got - ours).abs().max() < 0.01 * ours.abs().max()


def test_gguf_deepseek_v3_is_llama_cpp_deepseek2_tensor_by_tensor(
    moe_models: dict[str, Path], tmp_path: Path
) -> None:
    """DeepSeek-V3 (FP8 source, first layer dense) as convert_hf_to_gguf's DeepseekV2Model writes
    it for llama.cpp's ``deepseek2`` (transformers cannot read it back): exactly the tensors the
    arch loads (each in gguf's MODEL_TENSORS) with llama.cpp's shapes; kv_b_proj split into
    attn_v_b (its Q4_1 blocks) and attn_k_b (transposed, F32); every quantized linear the
    output's own codes with fp16 block parameters (experts stacked, shared experts as *_shexp);
    norms, router and e_score_correction_bias (as exp_probs_b.bias) in F32 as stored; the keys
    of the config, MLA written as one KV head of width kv_lora_rank + rope dims."""
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES
    from gguf.quants import dequantize

    from neuqi.formats.export.common import ExportSource

    model = moe_models["deepseek_v3"]
    out, tensors, fields = quantize_w4g32_gguf(model, tmp_path)
    c = json.loads((out / "config.json").read_text())
    source = ExportSource(out)
    embd, heads, experts = c["hidden_size"], c["num_attention_heads"], c["n_routed_experts"]
    rank, nope, rot, v = (c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                          c["v_head_dim"])
    ff_exp, shared, dense = c["moe_intermediate_size"], c["n_shared_experts"], c["first_k_dense_replace"]
    # llama.cpp's (llama-model.cpp, LLM_ARCH_DEEPSEEK2) shapes, ggml order (GGUFReader's)
    shapes = {"token_embd": (embd, c["vocab_size"]), "output_norm": (embd,),
              "output": (embd, c["vocab_size"])}
    for i in range(LAYERS):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm": (embd,), b + "ffn_norm": (embd,),
            b + "attn_q_a": (embd, c["q_lora_rank"]), b + "attn_q_a_norm": (c["q_lora_rank"],),
            b + "attn_q_b": (c["q_lora_rank"], heads * (nope + rot)),
            b + "attn_kv_a_mqa": (embd, rank + rot), b + "attn_kv_a_norm": (rank,),
            b + "attn_k_b": (nope, rank, heads), b + "attn_v_b": (rank, v, heads),
            b + "attn_output": (heads * v, embd)})
        if i < dense:
            shapes.update({b + "ffn_gate": (embd, c["intermediate_size"]),
                           b + "ffn_up": (embd, c["intermediate_size"]),
                           b + "ffn_down": (c["intermediate_size"], embd)})
        else:
            shapes.update({b + "ffn_gate_inp": (embd, experts), b + "exp_probs_b": (experts,),
                           b + "ffn_gate_exps": (embd, ff_exp, experts),
                           b + "ffn_up_exps": (embd, ff_exp, experts),
                           b + "ffn_down_exps": (ff_exp, embd, experts),
                           b + "ffn_gate_shexp": (embd, ff_exp * shared),
                           b + "ffn_up_shexp": (embd, ff_exp * shared),
                           b + "ffn_down_shexp": (ff_exp * shared, embd)})
    known = {TENSOR_NAMES[k] for k in MODEL_TENSORS[MODEL_ARCH.DEEPSEEK2]}
    for name in shapes:
        assert re.sub(r"^blk\.\d+\.", "blk.{bid}.", name) in known, name
    suffix = {n: ".bias" if n.endswith("exp_probs_b") else ".weight" for n in shapes}
    assert set(tensors) == {n + suffix[n] for n in shapes}
    for name, shape in shapes.items():
        assert tuple(int(d) for d in tensors[name + suffix[name]].shape) == shape, name

    def values(name: str) -> torch.Tensor:
        t = tensors[name]
        return torch.from_numpy(dequantize(t.data, t.tensor_type).copy())

    def own(lin_name: str) -> torch.Tensor:  # the output's codes with fp16 block parameters
        lin = source.linear(lin_name)
        d = lin.scale.half().float().repeat_interleave(32, 1)
        m = (-lin.scale * lin.zero_point).half().float().repeat_interleave(32, 1)
        return d * lin.codes.float() + m

    moe = Checkpoint.open(model).arch.moe
    plain = {"attn_q_a": "self_attn.q_a_proj", "attn_q_b": "self_attn.q_b_proj",
             "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
             "ffn_up_shexp": "mlp.shared_experts.up_proj",
             "ffn_down_shexp": "mlp.shared_experts.down_proj"}
    norms = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q_a_norm": "self_attn.q_a_layernorm",
             "attn_kv_a_norm": "self_attn.kv_a_layernorm"}
    checked = set()
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for g, n in plain.items():
            if f"blk.{i}.{g}" in shapes:
                assert tensors[f"blk.{i}.{g}.weight"].tensor_type.name == "Q4_1"
                assert torch.equal(values(f"blk.{i}.{g}.weight"), own(f"{p}{n}.weight")), (i, g)
                checked.add(f"{p}{n}.weight")
        kv_b = own(f"{p}self_attn.kv_b_proj.weight").view(heads, nope + v, rank)
        checked.add(f"{p}self_attn.kv_b_proj.weight")
        assert tensors[f"blk.{i}.attn_v_b.weight"].tensor_type.name == "Q4_1"
        assert torch.equal(values(f"blk.{i}.attn_v_b.weight"), kv_b[:, nope:])
        assert tensors[f"blk.{i}.attn_k_b.weight"].tensor_type.name == "F32"
        assert torch.equal(values(f"blk.{i}.attn_k_b.weight"), kv_b[:, :nope].transpose(1, 2))
        for g, n in norms.items():
            assert tensors[f"blk.{i}.{g}.weight"].tensor_type.name == "F32"
            assert torch.equal(values(f"blk.{i}.{g}.weight"), source.plain(f"{p}{n}.weight").float())
        if i < dense:
            continue
        for kind, proj in zip(("gate", "up", "down"), moe.expert_linears, strict=True):
            stack = values(f"blk.{i}.ffn_{kind}_exps.weight")
            for e in range(experts):
                name = f"{p}{moe.expert(e, proj)}.weight"
                assert torch.equal(stack[e], own(name)), (i, kind, e)
                checked.add(name)
        for g, n in (("ffn_gate_inp.weight", "mlp.gate.weight"),
                     ("exp_probs_b.bias", "mlp.gate.e_score_correction_bias")):
            assert tensors[f"blk.{i}.{g}"].tensor_type.name == "F32"
            assert torch.equal(values(f"blk.{i}.{g}"), source.plain(p + n).float()), g
    assert checked == set(source.output.quantized)  # every quantized linear, none left out

    a = "deepseek2"
    assert fields["general.architecture"] == a
    want = {"block_count": LAYERS, "embedding_length": embd, "vocab_size": c["vocab_size"],
            "feed_forward_length": c["intermediate_size"], "leading_dense_block_count": dense,
            "attention.head_count": heads, "attention.head_count_kv": 1,
            "attention.key_length": rank + rot, "attention.value_length": rank,
            "attention.key_length_mla": nope + rot, "attention.value_length_mla": v,
            "attention.q_lora_rank": c["q_lora_rank"], "attention.kv_lora_rank": rank,
            "rope.dimension_count": rot, "expert_count": experts,
            "expert_used_count": c["num_experts_per_tok"], "expert_shared_count": shared,
            "expert_feed_forward_length": ff_exp, "expert_group_count": c["n_group"],
            "expert_group_used_count": c["topk_group"], "expert_gating_func": 2,  # sigmoid
            "expert_weights_norm": True, "context_length": c["max_position_embeddings"]}
    for key, value in want.items():
        assert fields[f"{a}.{key}"] == value, key
    assert c["norm_topk_prob"] is True
    assert fields[f"{a}.expert_weights_scale"] == pytest.approx(c["routed_scaling_factor"])
    assert fields[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(c["rms_norm_eps"])
    assert f"{a}.rope.scaling.type" not in fields  # plain RoPE in this config


def test_gguf_refuses_moe_configs_llama_cpp_runs_differently(
    moe_models: dict[str, Path], tmp_path: Path
) -> None:
    """The fixture's Qwen2-MoE: a dense layer among the MoE ones and renormalized top-k weights,
    neither of which llama.cpp's qwen2moe has; a DeepSeek-V3 whose rotary runs on halves
    (rope_interleave false), where llama.cpp's deepseek2 rotates interleaved pairs. Refused by
    quantize --format gguf in one line before any work."""
    deepseek = tmp_path / "deepseek-halves"
    shutil.copytree(moe_models["deepseek_v3"], deepseek)
    config = json.loads((deepseek / "config.json").read_text())
    (deepseek / "config.json").write_text(json.dumps({**config, "rope_interleave": False}))
    for family, folder, words in (
            ("deepseek_v3", deepseek, "deepseek_v3 with rope_interleave False"),
            ("qwen2_moe", moe_models["qwen2_moe"], "qwen2_moe with norm_topk_prob True")):
        out = tmp_path / family
        line = one_line_error(neuqi("quantize", str(folder), "--out", str(out),
                                    *OPTIONS, "--format", "gguf"))
        assert words in line and "compressed-tensors" in line
        assert not out.exists() and not Path(f"{out}.job").exists()


def test_gptq_distillation_and_bad_calibration_refused_for_moe(
    moe_models: dict[str, Path], fast_tmp: Path, forked: Zygote
) -> None:
    model = str(moe_models["mixtral"])
    for extra in (["--gptq"], ["--distill-steps", "2"]):
        line = one_line_error(forked("quantize", model, "--out", str(fast_tmp / "x"),
                                     *OPTIONS, *extra))
        assert "mixture-of-experts" in line and extra[0] in line
    line = one_line_error(forked("quantize", model, "--out", str(fast_tmp / "x"), *OPTIONS,
                                 "--moe-calibration", "some"))
    assert "--moe-calibration some" in line


def test_unsupported_family_names_the_supported_ones(moe_models: dict[str, Path]) -> None:
    config = json.loads((moe_models["mixtral"] / "config.json").read_text())
    config["model_type"] = "dbrx"
    from neuqi.util.errors import UserError

    with pytest.raises(UserError) as e:
        arch_for(config)
    assert "dbrx" in str(e.value) and "deepseek_v3" in str(e.value) and "\n" not in str(e.value)


def test_deepseek_multi_token_prediction_layer_is_left_out(
    moe_models: dict[str, Path], fast_tmp: Path, forked: Zygote,
) -> None:
    """DeepSeek-V3's checkpoints carry a multi-token-prediction layer as ``model.layers.61.*``
    (one past ``num_hidden_layers``), which the causal model does not run and transformers
    ignores on load. The job says it leaves those tensors out, and the output loads."""
    from safetensors.torch import load_file, save_file

    model = fast_tmp / "deepseek-mtp"
    shutil.copytree(moe_models["deepseek_v3"], model)
    tensors = load_file(model / "model.safetensors")
    extra = {name.replace("model.layers.1.", f"model.layers.{LAYERS}.", 1): t.clone()
             for name, t in tensors.items() if name.startswith("model.layers.1.")}
    extra[f"model.layers.{LAYERS}.eh_proj.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)
    save_file({**tensors, **extra}, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert Checkpoint.open(model).beyond_layers == sorted(extra)

    out = fast_tmp / "out"
    r = forked("quantize", str(model), "--out", str(out), *OPTIONS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{len(extra)} tensors of decoder layers past num_hidden_layers={LAYERS}" in r.stderr
    meta = json.loads((out / "neuqi.json").read_text())
    assert meta["quant_info"]["left_out"]["tensors"] == len(extra)
    written = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(n.startswith(f"model.layers.{LAYERS}.") for n in written)
    assert load_quantized(out)(_ids()).logits.isfinite().all()
