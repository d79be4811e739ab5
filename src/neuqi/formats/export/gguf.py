"""Export to a GGUF file that llama.cpp runs (written with the ``gguf`` package).

Quantized linears:

* ``Q4_1`` / ``Q5_1``: blocks of 32 weights with an fp16 scale ``d`` and an fp16 offset ``m``,
  ``ŵ = d·q + m``. That is NeUQI's ``ŵ = s·(q - z)`` with group 32 and ``m = -s·z``, float
  zero-point included: an output quantized with 4 (5) bits and groups of 32, 64, 128, ... (each
  group is blocks of 32 with its (s, z)) is written with its own codes, losing only the fp16
  rounding of ``s`` and ``-s·z``. Other outputs (other bits, groups of 16) are re-solved at
  group 32 with the same method and Hessian.
* ``Q4_K`` / ``Q5_K`` / ``Q2_K``: super-blocks of 256 with quantized sub-block scales and minimums,
  solved under that constraint (:mod:`neuqi.formats.export.kquants`). A row length that is not a multiple
  of 256 cannot be a K-quant: such tensors are written as Q4_1 (Q5_1 for Q5_K), as llama.cpp's own
  quantizer also falls back.

The other tensors are written as llama.cpp's converter writes them with ``--outtype q8_0``
(``convert_hf_to_gguf.py``): two-dimensional ones (the token embedding, an untied head) as
``Q8_0`` (blocks of 32 int8 with an fp16 scale; F16 when a row is not a multiple of 32), norms and
biases as F32. So the file is about the size of the native output or smaller (the token embedding
of a small model is a large part of it), not larger. Tensor names, metadata and
the tokenizer (``tokenizer.ggml.*``: a byte-level BPE tokenizer.json as ``gpt2``, a SentencePiece
tokenizer.model as ``llama``, :mod:`neuqi.formats.export.spm`) follow llama.cpp's
``convert_hf_to_gguf.py``, including its row permutation of LLaMA's q/k projections (llama.cpp
applies rotary embeddings to interleaved pairs, transformers to halves).

Families (:data:`neuqi.formats.export.gguf_layout.LAYOUTS`, the one table of what differs per family): LLaMA / Mistral / Mixtral
(``llama``), Qwen2 / Qwen3, Phi-3 (``phi3``: fused ``attn_qkv`` and ``ffn_up`` = gate | up), Gemma,
Gemma 2 / 3 (norms stored as 1 + w), Qwen2-MoE / Qwen3-MoE, DeepSeek-V3 (``deepseek2``: latent
attention with ``kv_b_proj`` split into ``attn_k_b`` / ``attn_v_b`` as the current converter does,
shared experts, the first dense layers, ``e_score_correction_bias`` as ``exp_probs_b``). A mixture
of experts' expert linears are stacked per layer and projection into 3-D
``ffn_{gate,up,down}_exps``; routers stay F32. What
llama.cpp fixes for an architecture instead of reading it from the file (Gemma's layer kinds and
query scale, Qwen-MoE's top-k renormalization, ...) is checked against the config, and a config
llama.cpp would run differently from transformers is refused (:func:`check_family`), as is a
tokenizer llama.cpp would tokenize differently (:func:`check_tokenizer`: a SentencePiece-style
tokenizer.json without its tokenizer.model, Unigram and normalizing SentencePiece models).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuqi.formats.export.common import AtomicTarget, ExportSource, NativeLinear
from neuqi.formats.export.gguf_layout import (
    LAYOUTS,
    check_family,
    experts_keys,
    head_dim,
    resolved,
    rope_parameters,
)
from neuqi.formats.export.kquants import KSPECS, SUPER, KQuantized, solve_kquant
from neuqi.formats.export.spm import check_model, processor, read_spec, vocabulary
from neuqi.quant.solver import quantize_tensor
from neuqi.util.errors import UserError

BLOCK = 32  # weights per Q4_1 / Q5_1 block
TYPES = ("Q4_1", "Q5_1", "Q4_K", "Q5_K", "Q2_K")
_FALLBACK = {"Q4_K": "Q4_1", "Q5_K": "Q5_1", "Q2_K": "Q4_1"}
_BLOCK_BITS = {"Q4_1": 4, "Q5_1": 5}


# an expert linear: model.layers.{bid}.mlp.experts.{e}.{proj}.weight (block_sparse_moe: Mixtral
# as published, before transformers renames it)
_EXPERT = re.compile(r"^(?P<layer>.+\.layers\.(?P<bid>\d+))\.(?:mlp|block_sparse_moe)\."
                     r"experts\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
_FLOAT_TENSORS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")  # routers: F32


def check_tokenizer(folder: Path, *, missing_ok: bool = False) -> tuple[str, dict[str, Any]]:
    """Which vocabulary the GGUF gets, and the tokenizer.json of ``folder`` (``{}`` if none):
    ``("gpt2", tj)`` for a byte-level BPE tokenizer.json, ``("llama", tj)`` for a SentencePiece
    tokenizer with its tokenizer.model (:mod:`neuqi.formats.export.spm`: a BPE model without
    normalization, the one tokenizer.json describes). UserError (one line) otherwise: a
    SentencePiece-style tokenizer.json (BPE with byte_fallback, Unigram) without tokenizer.model
    is refused, as llama.cpp's converter would write it (gguf's LlamaHfVocab) with the placeholder
    score -1000 for every token, with which llama.cpp merges pieces in another order than the
    tokenizer; written as gpt2 it would be mis-tokenized too."""
    tj_file, model_file = folder / "tokenizer.json", folder / "tokenizer.model"
    tj: dict[str, Any] = {}
    if tj_file.is_file():
        try:
            tj = json.loads(tj_file.read_text(encoding="utf-8"))
            model = tj.get("model") or {}
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise UserError(f"{tj_file}: not a tokenizer.json (unreadable JSON)") from None
        if model.get("type") == "BPE" and not model.get("byte_fallback"):
            return "gpt2", tj
        if model.get("type") != "BPE":
            raise UserError(f"{tj_file}: a {model.get('type')} tokenizer; llama.cpp's SentencePiece "
                            f"vocabulary merges pieces by score (BPE), so the GGUF export writes "
                            f"BPE tokenizers only; use --format compressed-tensors")
    elif not model_file.is_file():
        if missing_ok:
            return "", {}
        raise UserError(f"{tj_file}: missing; the GGUF export needs the Hugging Face "
                        f"tokenizer.json (byte-level BPE) or tokenizer.model (SentencePiece) "
                        f"beside the output")
    if not model_file.is_file():
        raise UserError(f"{tj_file}: a SentencePiece-style tokenizer (BPE with byte_fallback) "
                        f"without its tokenizer.model; the GGUF export needs tokenizer.model for "
                        f"the token scores (llama.cpp's converter would write -1000 for every "
                        f"token, and llama.cpp would merge pieces in another order)")
    check_model(model_file, tj)
    return "llama", tj


def default_type(source: ExportSource) -> str:
    """``--format gguf``: the block type that keeps the output's own codes."""
    bits = {int(i["bits"]) for i in source.output.quantized.values()}
    if bits == {4}:
        return "Q4_1"
    if bits == {5}:
        return "Q5_1"
    raise UserError(
        f"--format gguf: no GGUF block type stores {sorted(bits)}-bit codes with a float offset; "
        f"choose gguf-q4_1, gguf-q5_1, gguf-q4_k, gguf-q5_k or gguf-q2_k"
    )


# ------------------------------------------------------------------------------ block layouts
def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).numpy().view(np.uint8).reshape(*t.shape, 2)


def pack_q4_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Q4_1 blocks: codes uint8 ``[N, 32]``, d and m ``[N]`` -> uint8 ``[N, 20]``."""
    c = codes.numpy().astype(np.uint8)
    qs = (c[:, :16] & 0xF) | ((c[:, 16:] & 0xF) << 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), qs], axis=-1)


def pack_q5_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Q5_1 blocks -> uint8 ``[N, 24]``: d, m, the 32 fifth bits (little-endian), low nibbles."""
    c = codes.numpy().astype(np.uint8)
    qh = np.packbits((c >> 4) & 1, axis=-1, bitorder="little")
    qs = (c[:, :16] & 0xF) | ((c[:, 16:] & 0xF) << 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), qh, qs], axis=-1)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit minimums."""
    low = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return np.concatenate([low, mid, high], axis=-1).astype(np.uint8)


def pack_kquant(k: KQuantized) -> np.ndarray:
    """Super-blocks of ``k`` -> uint8 ``[out * in/256, bytes]`` in ggml's layout."""
    out_f, in_f = k.codes.shape
    n = out_f * in_f // SUPER
    c = k.codes.numpy().astype(np.uint8).reshape(n, SUPER)
    d, dmin = _f16_bytes(k.d.reshape(n)), _f16_bytes(k.dmin.reshape(n))
    sc = k.sc.numpy().reshape(n, -1).astype(np.uint8)
    mn = k.mn.numpy().reshape(n, -1).astype(np.uint8)
    if k.spec.name == "Q2_K":
        q = c.reshape(n, 2, 4, 32)
        qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
        scales = (sc & 0xF) | ((mn & 0xF) << 4)
        return np.concatenate([scales, qs.reshape(n, 64), d, dmin], axis=-1)
    q = c.reshape(n, 4, 2, 32)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(n, 128)
    parts = [d, dmin, _k_scales(sc, mn)]
    if k.spec.name == "Q5_K":
        bits = (c.reshape(n, 8, 32) >> 4) & 1  # sub-block j, element l -> bit j of byte l
        qh = np.zeros((n, 32), dtype=np.uint8)
        for j in range(8):
            qh |= (bits[:, j] << j).astype(np.uint8)
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=-1)


def own_block_params(lin: NativeLinear, bits: int) -> tuple[torch.Tensor, ...] | None:
    """The output's own codes, with its scales and zero-points ``[out, in/32]`` per block of 32:
    a group of ``k·32`` weights with one (s, z) is ``k`` blocks with that (s, z), so an output with
    ``bits`` bits and groups of 32, 64, 128, ... (or per channel, rows a multiple of 32) is written
    as it is. None when it has other bits or groups (then the export re-solves)."""
    g = lin.group_length
    if lin.bits != bits or g % BLOCK:
        return None
    k = g // BLOCK
    return (lin.codes, lin.scale.repeat_interleave(k, dim=1),
            lin.zero_point.repeat_interleave(k, dim=1))


# ------------------------------------------------------------------------------ the model
def qk_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order of convert_hf_to_gguf's ``permute``: GGUF row ``r`` is transformers row
    ``idx[r]`` (each head's two halves interleaved)."""
    half = rows // n_head // 2
    return torch.arange(rows).view(n_head, 2, half).transpose(1, 2).reshape(-1)


def _pre_tokenizer(tokenizer_json: dict[str, Any], model_type: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (``tokenizer.ggml.pre``)."""
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        return "qwen2"
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if model_type == "deepseek_v3" and "一-龥" in json.dumps(pre, ensure_ascii=False):
        return "deepseek-v3"  # its digit, CJK and word splits (llama.cpp's LLAMA_VOCAB_PRE_TYPE)
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name for the plain GPT-2 byte-level split
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split" and "\\p{N}{1,3}" in json.dumps(steps[0]):
        return "llama-bpe"
    return "default"


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return path.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


class GGUFExporter:
    """Writes one GGUF file: tensors go to the gguf package's spooled temporary file as they come
    (one tensor in memory at a time), header and metadata at :meth:`finalize`."""

    def __init__(self, source: ExportSource, out: str | Path, qtype: str) -> None:
        import gguf

        if qtype not in TYPES:
            raise UserError(f"--format gguf-{qtype.lower()}: choose one of {', '.join(TYPES)}")
        self.source = source
        self.qtype = qtype
        self.format_name = f"gguf-{qtype.lower()}"
        config = source.config()
        model_type = str(config.get("model_type"))
        check_family(config, source.path / "config.json")
        self.config = resolved(config)
        self.model_type = model_type
        self.layout = LAYOUTS[model_type]
        self.arch, self.permute = self.layout.arch, self.layout.permute_qk
        self.n_head = int(self.config.num_attention_heads)
        self.n_kv = int(getattr(self.config, "num_key_value_heads", None) or self.n_head)
        self.n_layers = int(self.config.num_hidden_layers)
        from neuqi.model.architectures import arch_for

        moe = arch_for(self.config).moe
        self.expert_kinds: dict[str, Any] = {}  # checkpoint projection name -> MODEL_TENSOR
        if moe is not None:
            gate, up, down = moe.expert_linears
            self.expert_kinds = {gate: gguf.MODEL_TENSOR.FFN_GATE_EXP,
                                 up: gguf.MODEL_TENSOR.FFN_UP_EXP,
                                 down: gguf.MODEL_TENSOR.FFN_DOWN_EXP}
        self.n_experts = 0 if moe is None else moe.experts
        # stacked expert tensors being gathered: GGUF name -> (type, blocks by expert)
        self._experts: dict[str, tuple[str, list[np.ndarray | None]]] = {}
        self.names = gguf.get_tensor_name_map(
            next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.arch), self.n_layers
        )
        self.target = AtomicTarget(out, folder=False, is_ours=_is_gguf)
        self.writer = gguf.GGUFWriter(None, self.arch, use_temp_file=True)
        self._notes: list[str] = []
        self.types: dict[str, str] = {}
        self.plain_types: dict[str, str] = {}  # 2-D tensors that are not quantized linears
        self.re_solved: list[str] = []  # linears not written with the output's own codes
        self.re_solve_why: set[str] = set()
        self.fallback: list[str] = []
        self._metadata()  # only kept until finalize; a bad tokenizer fails before any solve

    @property
    def notes(self) -> list[str]:
        notes = list(self._notes)
        for name, kind in sorted(self.plain_types.items()):
            notes.append(f"note: {name} written as {kind}, as llama.cpp's convert_hf_to_gguf.py "
                         f"--outtype q8_0 does (not in the weighted loss, which covers the "
                         f"quantized linears)")
        if self.fallback:
            kinds = sorted({self.types[n] for n in self.fallback if n in self.types})
            notes.append(
                f"note: {len(self.fallback)} linear(s) written as {'/'.join(kinds)} at group 32 "
                f"(re-solved, or rows not a multiple of {SUPER} for {self.qtype})"
            )
        return notes

    # --------------------------------------------------------------------------- tensors
    def _gguf_name(self, name: str) -> str:
        import gguf

        m = _EXPERT.match(name)
        if m and m["proj"] in self.expert_kinds:
            kind = self.expert_kinds[m["proj"]]
            return f"{gguf.TENSOR_NAMES[kind].format(bid=int(m['bid']))}.weight"
        if name.endswith("e_score_correction_bias"):  # the converter's rename: exp_probs_b.bias
            name = name[: -len("_bias")] + ".bias"
        new = self.names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"{self.source.path}: tensor {name} has no GGUF name for {self.arch}")
        return new

    def _rows(self, name: str, rows: int) -> torch.Tensor | None:
        if not self.permute:
            return None
        if name.endswith("self_attn.q_proj.weight"):
            return qk_permutation(rows, self.n_head)
        if name.endswith("self_attn.k_proj.weight"):
            return qk_permutation(rows, self.n_kv)
        return None

    def add_linear(self, lin: NativeLinear) -> torch.Tensor:
        """Store ``lin``; return the weight llama.cpp will compute, float32 ``[out, in]`` in the
        transformers row order."""
        import gguf

        out_f, in_f = lin.codes.shape
        qtype = self.qtype
        if qtype in KSPECS and in_f % SUPER:
            qtype = _FALLBACK[qtype]
            self.fallback.append(lin.name)
        if qtype in KSPECS:
            weight = lin.require_weight(f"{qtype} (solved under its constraint)")
            k = solve_kquant(weight, lin.h_diag, KSPECS[qtype], method=lin.method or "neuqi",
                             device=self.source.device)
            k = KQuantized(k.codes.cpu(), k.d.cpu(), k.dmin.cpu(), k.sc.cpu(), k.mn.cpu(), k.spec)
            self.re_solved.append(lin.name)
            self.re_solve_why.add(f"{qtype}: solved under its quantized sub-block scales")
            approx = k.dequantize()
            blocks = pack_kquant(k).reshape(out_f, -1)
        else:
            codes, d, m = self._block_params(lin, _BLOCK_BITS[qtype])
            pack = pack_q4_1 if qtype == "Q4_1" else pack_q5_1
            blocks = pack(codes.reshape(-1, BLOCK), d.reshape(-1), m.reshape(-1))
            blocks = blocks.reshape(out_f, -1)
            d16, m16 = _fp16_t(d), _fp16_t(m)
            q = codes.to(torch.float32).view(out_f, -1, BLOCK)
            approx = (d16.unsqueeze(-1) * q + m16.unsqueeze(-1)).reshape(out_f, in_f)
        rows = self._rows(lin.name, out_f)
        if rows is not None:
            blocks = blocks[rows.numpy()]
        self.types[lin.name] = qtype
        if self.arch == "deepseek2" and lin.name.endswith("self_attn.kv_b_proj.weight"):
            self._add_kv_b(lin.name, qtype, blocks, approx)
            return approx
        expert = _EXPERT.match(lin.name)
        if expert and expert["proj"] in self.expert_kinds:
            self._add_expert(self._gguf_name(lin.name), int(expert["e"]), qtype, blocks)
        else:
            self.writer.add_tensor(self._gguf_name(lin.name), np.ascontiguousarray(blocks),
                                   raw_dtype=gguf.GGMLQuantizationType[qtype])
        return approx

    def _add_kv_b(self, name: str, qtype: str, blocks: np.ndarray, approx: torch.Tensor) -> None:
        """DeepseekV2Model's split of ``kv_b_proj`` ``[heads·(nope + v), kv_lora_rank]`` for
        llama.cpp's absorbed MLA: ``attn_v_b`` ``[heads, v, rank]`` keeps the linear's blocks
        (rows along its input, as quantized); ``attn_k_b`` is transposed to ``[heads, rank,
        nope]``, across the quantization groups, so no block type holds the codes: it is written
        as the linear's dequantized weights in F32 (exactly what the blocks would give)."""
        import gguf

        c = self.config
        nope, v = int(c.qk_nope_head_dim), int(c.v_head_dim)
        base = name[: -len("kv_b_proj.weight")]
        k_b = approx.view(self.n_head, nope + v, -1)[:, :nope].transpose(1, 2)
        self.writer.add_tensor(self._gguf_name(f"{base}k_b_proj.weight"),
                               np.ascontiguousarray(k_b.numpy()))
        note = ("note: attn_k_b (kv_b_proj's key rows, transposed for llama.cpp's absorbed MLA) "
                "written as F32 of the quantized weights: its rows cross the quantization groups")
        if note not in self._notes:
            self._notes.append(note)
        v_b = blocks.reshape(self.n_head, nope + v, -1)[:, nope:]
        self.writer.add_tensor(self._gguf_name(f"{base}v_b_proj.weight"),
                               np.ascontiguousarray(v_b), raw_dtype=gguf.GGMLQuantizationType[qtype])

    def _add_expert(self, gname: str, e: int, qtype: str, blocks: np.ndarray) -> None:
        """Gather expert ``e``'s blocks of one layer's projection; the 3-D ``[experts, out,
        blocks]`` tensor llama.cpp reads is written when the layer's last expert has come."""
        import gguf

        kind, stack = self._experts.setdefault(gname, (qtype, [None] * self.n_experts))
        if kind != qtype:
            raise UserError(f"{gname}: experts of one projection written as {kind} and {qtype}; "
                            f"a stacked GGUF tensor has one type")
        stack[e] = blocks
        ready = [b for b in stack if b is not None]
        if len(ready) == len(stack):
            self.writer.add_tensor(gname, np.ascontiguousarray(np.stack(ready)),
                                   raw_dtype=gguf.GGMLQuantizationType[qtype])
            del self._experts[gname]

    def _block_params(self, lin: NativeLinear, bits: int) -> tuple[torch.Tensor, ...]:
        """Codes ``[out, in]`` and per-block d, m ``[out, in/32]`` (float32) for a 32-block type:
        the output's own (:func:`own_block_params`) when it has ``bits`` and groups of a multiple
        of 32, else re-solved at group 32."""
        own = own_block_params(lin, bits)
        if own is not None:
            codes, scale, zero = own
        else:
            if lin.codes.shape[1] % BLOCK:
                raise UserError(f"{lin.name}: {lin.codes.shape[1]} inputs is not a multiple of 32; "
                                f"GGUF block types cannot store it")
            weight = lin.require_weight(f"{bits}-bit blocks of 32 (a re-solve)")
            q = quantize_tensor(weight, lin.h_diag, bits=bits, group_size=BLOCK,
                                method=lin.method or "neuqi", device=self.source.device)
            codes, scale, zero = q.codes.cpu(), q.scale.cpu(), q.zero_point.cpu()
            if lin.name not in self.fallback:
                self.fallback.append(lin.name)
            self.re_solved.append(lin.name)
            group = "per channel" if lin.group_size == -1 else f"groups of {lin.group_size}"
            self.re_solve_why.add(f"{bits}-bit blocks of {BLOCK}, NeUQI at group {BLOCK}; the "
                                  f"output has {lin.bits} bits, {group}")
        return codes, scale, -scale * zero

    def add_plain(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor that is not a quantized linear: Q8_0 (F16) if 2-D, else F32."""
        import gguf

        if name.endswith("rotary_emb.inv_freq"):
            return
        gname = self._gguf_name(name)
        t = tensor.to(torch.float32)
        if self.layout.norm_shift and name.endswith("norm.weight"):
            t = t + self.layout.norm_shift  # llama.cpp multiplies by the stored weight
        data = t.contiguous().numpy()
        if gname.endswith(_FLOAT_TENSORS):  # routers, as convert_hf_to_gguf keeps them
            self.writer.add_tensor(gname, data.reshape(-1) if data.shape[0] == 1 else data)
            self.plain_types[name] = "F32"
        elif data.ndim == 2 and data.shape[1] % BLOCK == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            self.writer.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            self.plain_types[name] = "Q8_0"
        elif data.ndim == 2:
            self.writer.add_tensor(gname, data.astype(np.float16))
            self.plain_types[name] = "F16"
        else:
            self.writer.add_tensor(gname, data)

    # --------------------------------------------------------------------------- metadata
    def _metadata(self) -> None:
        import gguf

        w, c = self.writer, self.config
        hidden = int(c.hidden_size)
        hdim = head_dim(c)
        rope = rope_parameters(c)
        w.add_name(str(getattr(c, "_name_or_path", None) or self.source.path.name))
        self.layout.keys(w, c)  # the family's own keys first: a key is written once
        if self.n_experts:
            experts_keys(w, c)
        written = _written(w)

        def put(key: str, add: Callable[[Any], None], value: Any) -> None:
            if key.format(arch=self.arch) not in written:
                add(value)

        k = gguf.Keys
        put(k.LLM.CONTEXT_LENGTH, w.add_context_length,
            int(getattr(c, "max_position_embeddings", None) or 2048))
        put(k.LLM.EMBEDDING_LENGTH, w.add_embedding_length, hidden)
        put(k.LLM.BLOCK_COUNT, w.add_block_count, self.n_layers)
        put(k.LLM.FEED_FORWARD_LENGTH, w.add_feed_forward_length, int(c.intermediate_size))
        put(k.Attention.HEAD_COUNT, w.add_head_count, self.n_head)
        put(k.Attention.HEAD_COUNT_KV, w.add_head_count_kv, self.n_kv)
        put(k.Attention.KEY_LENGTH, w.add_key_length, hdim)
        put(k.Attention.VALUE_LENGTH, w.add_value_length, hdim)
        put(k.Attention.LAYERNORM_RMS_EPS, w.add_layer_norm_rms_eps,
            float(getattr(c, "rms_norm_eps", None) or 1e-6))
        put(k.LLM.VOCAB_SIZE, w.add_vocab_size, int(c.vocab_size))
        put(k.Rope.DIMENSION_COUNT, w.add_rope_dimension_count, hdim)
        put(k.Rope.FREQ_BASE, w.add_rope_freq_base, float(rope.get("rope_theta", 10000.0)))
        ftype = {"Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
                 "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S, "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S,
                 "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K}[self.qtype]
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if self.layout.rope_warning and (rope.get("rope_type") or "default") != "default":
            self._notes.append(f"warning: rope_type {rope.get('rope_type')} is not written to the "
                              f"GGUF; llama.cpp will use plain RoPE")
        self._tokenizer()

    def _tokenizer(self) -> None:
        import gguf
        from transformers import AutoTokenizer

        folder = self.source.path
        kind, tj = check_tokenizer(folder)
        vocab_size = int(self.config.vocab_size)
        if kind == "llama":
            self._sentencepiece(folder, vocab_size)
            return
        tok = AutoTokenizer.from_pretrained(str(folder))
        reverse = {i: t for t, i in tok.get_vocab().items()}
        added = tok.added_tokens_decoder
        tokens: list[str] = []
        types: list[int] = []
        for i in range(vocab_size):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.CONTROL if added[i].special
                             else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.NORMAL)
        pre = _pre_tokenizer(tj, self.model_type)
        if pre == "default":
            self._notes.append("warning: unknown pre-tokenizer; llama.cpp will split text its "
                              "default way (token ids may differ from transformers')")
        self.writer.add_tokenizer_model("gpt2")
        self.writer.add_tokenizer_pre(pre)
        self.writer.add_token_list(tokens)
        self.writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
        special.add_to_gguf(self.writer, quiet=True)

    def _sentencepiece(self, folder: Path, vocab_size: int) -> None:
        """convert_hf_to_gguf's ``_set_vocab_sentencepiece`` (:mod:`neuqi.formats.export.spm`), with the
        space prefix llama.cpp adds: none for Gemma, Gemma 2 / 3 (their converter writes False), else
        tokenizer_config.json's ``add_prefix_space`` where it says (LlamaModel.set_vocab), else
        tokenizer.model's ``add_dummy_prefix``."""
        import gguf

        model_file = folder / "tokenizer.model"
        sp = processor(model_file)
        tokens, scores, types, notes = vocabulary(folder, sp, vocab_size)
        self._notes.extend(notes)
        w = self.writer
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
        special.add_to_gguf(w, quiet=True)
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")) if (
            folder / "tokenizer_config.json").is_file() else {}
        if self.arch in ("gemma", "gemma2", "gemma3"):
            w.add_add_space_prefix(False)
        elif isinstance(config.get("add_prefix_space"), bool):
            w.add_add_space_prefix(config["add_prefix_space"])
        else:
            w.add_add_space_prefix(read_spec(model_file).add_dummy_prefix)

    # --------------------------------------------------------------------------- finishing
    def finalize(self, report: dict[str, Any]) -> Path:
        if self._experts:
            missing = sorted(self._experts)
            raise UserError(f"{self.source.path}: experts missing from the output for "
                            f"{', '.join(missing)}; it is not a complete MoE output")
        self.writer.add_string("neuqi.formats.export", json.dumps(report))
        w = self.writer
        w.write_header_to_file(self.target.temp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return self.target.publish()

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.target.abort()


def _written(writer: Any) -> set[str]:
    """The metadata keys ``writer`` holds so far."""
    return {k for shard in writer.kv_data for k in shard}


def _fp16_t(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)
