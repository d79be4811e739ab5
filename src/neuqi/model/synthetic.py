"""Synthetic LLaMA-like checkpoints of any size: the benchmarks' and tests' stand-in for a real model.

:func:`build_checkpoint` writes ``config.json``, sharded safetensors with an index and a small
byte-level BPE tokenizer for a :class:`Shape` (any hidden / intermediate / head layout, family
``llama`` or ``qwen2``, whose q/k/v projections carry biases). The weights are seeded random
numbers, heavy-tailed (a Gaussian scaled by a log-normal factor) with a few outlier input channels
per linear, so a solver has real work to do; the same tensor name and seed give the same values
whatever the sharding.

The module imports torch only when it writes, so a measuring parent process can use
:class:`Shape` without loading it. Nothing is ever held whole: each shard's header is written first (the shapes are known), then each
tensor is generated and written a block of rows at a time, so a checkpoint of any size is written
with a few hundred MiB of memory. Shards are cut at ``max_shard_bytes`` (a tensor larger than that
gets a shard of its own), as published checkpoints are.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from neuqi.util.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

FAMILIES = ("llama", "qwen2")
DTYPES = {"bfloat16": ("BF16", 2), "float32": ("F32", 4)}  # safetensors name, bytes
BLOCK_ELEMENTS = 2**24  # values generated at once (64 MiB in float32)
OUTLIER_FRACTION = 1 / 256  # input channels per linear scaled up
OUTLIER_GAIN = 8.0
TAIL_SIGMA = 0.5  # log-normal scale mixture: kurtosis of about 3 * exp(4 * 0.5**2) = 8
TOKENIZER_VOCAB = 1024  # capped by the shape's vocabulary
TOKENIZER_TEXT_CHARS = 200_000
SPECIALS = ["<|endoftext|>", "<|pad|>"]
SHARD_BYTES = 5 * 10**9  # what the hub's large checkpoints use


@dataclass(frozen=True)
class Shape:
    """A decoder-only model's layer shapes (the vocabulary may be cut, the layers are exact)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    family: str = "llama"
    head_dim: int | None = None  # default hidden // heads

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UserError(f"family {self.family!r}: choose one of {', '.join(FAMILIES)}")
        if self.heads % self.kv_heads or (self.head_dim is None and self.hidden % self.heads):
            raise UserError("the hidden size must divide by the heads, the heads by the kv heads")

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def biases(self) -> bool:
        return self.family == "qwen2"

    def layer_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        """Name and shape of every tensor of decoder layer ``i``, in the checkpoint's order."""
        h, m = self.hidden, self.intermediate
        q, kv = self.heads * self.dim, self.kv_heads * self.dim
        p = f"model.layers.{i}."
        out: list[tuple[str, tuple[int, ...]]] = [(p + "input_layernorm.weight", (h,))]
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out.append((f"{p}self_attn.{name}.weight", (rows, h)))
            if self.biases:
                out.append((f"{p}self_attn.{name}.bias", (rows,)))
        out += [
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (m, h)),
            (p + "mlp.up_proj.weight", (m, h)),
            (p + "mlp.down_proj.weight", (h, m)),
        ]
        return out

    def tensors(self, layers: int) -> list[tuple[str, tuple[int, ...]]]:
        out: list[tuple[str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(layers):
            out += self.layer_tensors(i)
        out += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return out

    def layer_params(self) -> int:
        return sum(math.prod(s) for _, s in self.layer_tensors(0))

    def largest_linear_params(self) -> int:
        return max(math.prod(s) for n, s in self.layer_tensors(0) if n.endswith("proj.weight"))


#: Layer shapes of published models (vocabulary cut to 4096; `--vocab` changes it).
SHAPES = {
    "llama-3.1-70b": Shape(8192, 28672, 64, 8, 4096, "llama"),
    "qwen2.5-72b": Shape(8192, 29568, 64, 8, 4096, "qwen2"),
    "llama-3.1-405b": Shape(16384, 53248, 128, 8, 4096, "llama"),
    "small": Shape(1024, 4096, 8, 2, 1024, "llama"),  # quick checks of the pipeline's scaling
}
#: Their real depth and vocabulary, for projections to the full model.
FULL_MODELS = {"llama-3.1-70b": (80, 128256), "qwen2.5-72b": (80, 152064),
               "llama-3.1-405b": (126, 128256)}


def _blocks(name: str, shape: tuple[int, ...], seed: int) -> Iterator[torch.Tensor]:
    """The tensor's float32 values, a block of rows at a time; seeded per name and block."""
    import torch

    rows = shape[0]
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, BLOCK_ELEMENTS // cols)
    base = seed * 1_000_003 + zlib.crc32(name.encode())
    outliers = None
    if name.endswith("proj.weight"):
        g = torch.Generator().manual_seed(base)
        k = max(1, round(cols * OUTLIER_FRACTION))
        outliers = torch.randperm(cols, generator=g)[:k]
    for b, lo in enumerate(range(0, rows, step)):
        n = min(step, rows - lo)
        g = torch.Generator().manual_seed(base + 7919 * (b + 1))
        if name.endswith("norm.weight"):
            yield 1.0 + 0.1 * torch.randn(n, generator=g)
        elif name.endswith(".bias"):
            yield 0.02 * torch.randn(n, generator=g)
        elif "embed_tokens" in name or name == "lm_head.weight":
            yield torch.randn(n, cols, generator=g) * 0.02
        else:
            t = torch.randn(n, cols, generator=g)
            t.mul_(torch.randn(n, cols, generator=g).mul_(TAIL_SIGMA).exp_())
            t.mul_(1.0 / (cols**0.5 * math.exp(TAIL_SIGMA**2)))
            if outliers is not None:
                t[:, outliers] *= OUTLIER_GAIN
            yield t


def _write_shard(path: Path, items: list[tuple[str, tuple[int, ...]]], seed: int,
                 dtype: str, sparse: bool = False) -> None:
    """One safetensors file: the header, then every tensor streamed block by block (``sparse``:
    a hole of the right size instead, for planning only)."""
    import torch

    st_dtype, itemsize = DTYPES[dtype]
    torch_dtype = getattr(torch, dtype)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in items:
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        if sparse:
            f.truncate(8 + len(raw) + offset)
            return
        for name, shape in items:
            f.writelines(block.to(torch_dtype).contiguous().view(torch.uint8).numpy().tobytes() for block in _blocks(name, shape, seed))


def write_config(folder: Path, shape: Shape, layers: int, seqlen: int = 2048,
                 dtype: str = "bfloat16") -> None:
    from transformers import LlamaConfig, Qwen2Config

    cls, extra = ((Qwen2Config, {"use_sliding_window": False}) if shape.family == "qwen2"
                  else (LlamaConfig, {"head_dim": shape.dim}))
    config = cls(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=max(seqlen, 2048),
        rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=1,
        # transformers 5 calls it dtype (and maps torch_dtype to it); 4.x knows only torch_dtype
        tie_word_embeddings=False, torch_dtype=dtype, **extra,  # type: ignore[call-arg]
    )
    config.save_pretrained(str(folder))


def write_tokenizer(folder: Path, vocab: int, seqlen: int = 2048) -> None:
    """A byte-level BPE trained on the start of the shipped calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from neuqi.data.calib import load_calibration_text

    text = load_calibration_text(None)[:TOKENIZER_TEXT_CHARS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(TOKENIZER_VOCAB, vocab), special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    if tok.get_vocab_size() > vocab:
        raise UserError(f"tokenizer vocabulary {tok.get_vocab_size()} > the model's {vocab}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[0], pad_token=SPECIALS[1],
        model_max_length=max(seqlen, 2048),
    )
    fast.save_pretrained(str(folder))


def build_checkpoint(folder: Path, shape: Shape, layers: int, *, seqlen: int = 2048,
                     seed: int = 0, max_shard_bytes: int = SHARD_BYTES,
                     dtype: str = "bfloat16", sparse: bool = False) -> int:
    """Write the checkpoint into ``folder``; returns the bytes of tensor data written.

    ``sparse``: the shards are holes of the right size (zeros, no disk used) behind real headers:
    a full-depth model for ``neuqi plan``, which reads only the headers."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype}: choose one of {', '.join(DTYPES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    itemsize = DTYPES[dtype][1]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    total = 0
    for name, dims in shape.tensors(layers):
        nbytes = math.prod(dims) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
        total += nbytes
    weight_map: dict[str, str] = {}
    for k, items in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tmp = folder / (file + ".tmp")
        _write_shard(tmp, items, seed, dtype, sparse)
        tmp.rename(folder / file)
        weight_map.update({name: file for name, _ in items})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_config(folder, shape, layers, seqlen, dtype)
    write_tokenizer(folder, shape.vocab, seqlen)
    return total


def tiny_moe_config(family: str, *, layers: int = 3, experts: int = 4, vocab: int = 512,
                    seqlen: int = 256, **overrides: object) -> object:
    """A transformers config of an MoE ``family`` (mixtral, qwen2_moe, qwen3_moe, deepseek_v3):
    hidden 64, ``experts`` experts of width 32 (2 per token), 4 heads; DeepSeek-V3 with latent
    attention (q_lora_rank 32, kv_lora_rank 32), a shared expert and its first layer dense;
    Qwen2-MoE with a shared expert and layer 1 dense (``mlp_only_layers``)."""
    from transformers import AutoConfig

    base: dict[str, object] = {
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": seqlen, "rms_norm_eps": 1e-5, "bos_token_id": 0,
        "eos_token_id": 0, "pad_token_id": 1, "tie_word_embeddings": False,
        "num_experts_per_tok": 2,
    }
    if family == "mixtral":
        base.update(num_local_experts=experts, intermediate_size=32)
    elif family in ("qwen2_moe", "qwen3_moe"):
        base.update(num_experts=experts, moe_intermediate_size=32, norm_topk_prob=True)
        if family == "qwen2_moe":
            base.update(shared_expert_intermediate_size=48, mlp_only_layers=[1])
        else:
            base.update(head_dim=16)
    elif family == "deepseek_v3":
        base.update(n_routed_experts=experts, moe_intermediate_size=32, n_shared_experts=1,
                    first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
                    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
                    n_group=2, topk_group=1, num_key_value_heads=4, rope_interleave=True)
    else:
        raise UserError(f"family {family!r}: choose mixtral, qwen2_moe, qwen3_moe, deepseek_v3")
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def _fp8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` as float8_e4m3fn with one float32 ``scale_inv`` per ``block``x``block`` tile."""
    import torch

    out_f, in_f = w.shape
    rows, cols = -(-out_f // block), -(-in_f // block)
    scale = torch.empty(rows, cols)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    for r in range(rows):
        for c in range(cols):
            tile = w[r * block:(r + 1) * block, c * block:(c + 1) * block]
            s = float(tile.abs().max()) / 448.0 or 1.0
            scale[r, c] = s
            q[r * block:(r + 1) * block, c * block:(c + 1) * block] = (tile / s).to(q.dtype)
    return q, scale


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations and norms away from 1 (so layer mix-ups change the logits),
    drawn from ``seed`` in the order of ``model.named_parameters()``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))


def build_from_config(folder: Path, config: PretrainedConfig, *, seed: int = 0,
                      tokenizer_dir: Path | None = None, fp8_block: int = 0,
                      moe_block: str | None = None) -> Path:
    """A seeded random checkpoint of any supported ``config`` (transformers config object):
    config.json, one model.safetensors in the published checkpoints' names (an MoE layer's
    experts one tensor per expert and projection, Mixtral's MoE block as ``block_sparse_moe``)
    and a tokenizer (copied from ``tokenizer_dir``, else trained). ``fp8_block``: store every
    decoder-layer linear but the router as float8_e4m3fn with ``weight_scale_inv`` block scales,
    as DeepSeek-V3's checkpoints do. ``moe_block``: name the MoE block so instead (one of the
    family's names: ``"mlp"`` for a Mixtral re-saved in transformers' module names)."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from neuqi.model.architectures import arch_for
    from neuqi.model.moe import unfuse_experts

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    arch = arch_for(config)
    if moe_block is not None:
        arch = arch.with_block(moe_block)
    unfuse_experts(model, arch)  # the module names (and so the state dict's) are the checkpoint's
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    if getattr(config, "tie_word_embeddings", False):
        state.pop(arch.lm_head, None)
    if fp8_block:
        quantized = {f"{arch.layer_prefix(i)}{lin}.weight"
                     for i in range(config.num_hidden_layers) for lin in arch.linears_of(i)}
        for name in sorted(quantized):
            state[name], state[name[: -len("weight")] + "weight_scale_inv"] = _fp8_blocks(
                state[name], fp8_block)
        config.quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
                                      "activation_scheme": "dynamic",
                                      "weight_block_size": [fp8_block, fp8_block]}
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and (f.name.startswith("tokenizer") or f.name in (
                    "special_tokens_map.json", "vocab.json", "merges.txt")):
                shutil.copyfile(f, folder / f.name)
    else:
        write_tokenizer(folder, config.vocab_size, config.max_position_embeddings)
    return folder
